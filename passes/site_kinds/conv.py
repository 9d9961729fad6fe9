"""``getitem(convolution_backward(grad_out, input, weight, ...), 1 = weight | 2 = bias)``: convolution
weights and biases. Linear after unfolding (T = output positions, d = C_in/groups * kernel, p = C_out/groups):
ghost norms by im2col Gram matrices (1-d and 2-d forward convolutions); per-sample gradients by one grouped
convolution_backward with the samples as groups."""

from __future__ import annotations

import math
import operator

import sympy
import torch
import torch.fx
from bkcompile.passes.emit import Emitter, static_shape
from bkcompile.passes.facts import product, shape_exprs
from bkcompile.passes.joint import JointGraph
from bkcompile.passes.site_kinds.common import (
    B,
    Cost,
    G,
    SiteKind,
    Size,
    T,
    d,
    on_dim0,
    p,
    row_weights,
    rows,
)

aten = torch.ops.aten


def _conv_matches(joint: JointGraph, node: torch.fx.Node) -> bool:
    if node.target is not operator.getitem or node.args[1] not in (1, 2):
        return False
    conv = node.args[0]
    if conv.target != aten.convolution_backward.default:
        return False
    inputs = conv.args[:2] if node.args[1] == 1 else conv.args[:1]
    return all(on_dim0(joint, v) and (joint.facts[v].plain or joint.batch == 1) for v in inputs)


def conv_per_sample(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype) -> torch.fx.Node:
    """Bias: grad_out summed over positions. Weight: one grouped convolution_backward with the samples as
    groups (input (1, B*C_in, ...), groups B*g), so every sample gets its own weight gradient."""
    conv = node.args[0]
    grad_out, x, weight, _, stride, padding, dilation, transposed, output_padding, groups = conv.args[:10]
    grad_out = emit.to_dtype(grad_out, dtype)
    if node.args[1] == 2:
        return emit(aten.sum.dim_IntList, grad_out, list(range(2, grad_out.meta["val"].dim())))
    shape = static_shape(weight)
    flat_out = emit(aten.reshape.default, grad_out, [1, -1, *emit.sizes(grad_out)[2:]])
    flat_in = emit(aten.reshape.default, emit.to_dtype(x, dtype), [1, -1, *emit.sizes(x)[2:]])
    stacked = emit(aten.expand.default, emit(aten.unsqueeze.default, emit.to_dtype(weight, dtype), 0), [batch, *shape])
    stacked = emit(aten.reshape.default, stacked, [-1, *shape[1:]])
    sample_groups = groups * batch if isinstance(batch, int) else emit(operator.mul, batch, groups)
    grads = emit(
        aten.convolution_backward.default,
        flat_out,
        flat_in,
        stacked,
        None,
        stride,
        padding,
        dilation,
        transposed,
        output_padding,
        sample_groups,
        [False, True, False],
    )
    return emit(aten.reshape.default, emit(operator.getitem, grads, 1), [-1, *shape])


def _conv_has_ghost(node: torch.fx.Node) -> bool:
    """Bias: always (a per-sample sum). Weight: 1-d and 2-d forward convolutions (unfolded by im2col)."""
    conv = node.args[0]
    return node.args[1] == 2 or (not conv.args[7] and conv.args[0].meta["val"].dim() in (3, 4))


def _conv_groups(emit: Emitter, conv: torch.fx.Node, batch: Size, dtype):
    """Per group: grad_out rows (B*g, Cout/g, L) and the unfolded input (B*g, Cin/g*k, L), L output positions."""
    grad_out, x, weight, _, stride, padding, dilation, _, _, groups = conv.args[:10]
    one_d = conv.args[0].meta["val"].dim() == 3

    def as_2d(values, fill: int) -> list[int]:  # a 1-d conv is a 2-d conv of height one
        return [fill, *values] if one_d else list(values)

    kernel = static_shape(weight)[2:]
    x = emit.to_dtype(x, dtype)
    unfolded = emit(
        aten.im2col.default,
        emit(aten.unsqueeze.default, x, 2) if one_d else x,
        as_2d(kernel, 1),
        as_2d(dilation, 1),
        as_2d(padding, 0),
        as_2d(stride, 1),
    )  # (B, Cin*k, L)
    positions = emit.size(unfolded, 2)
    rows = emit(
        aten.reshape.default, emit.to_dtype(grad_out, dtype), [-1, static_shape(weight)[0] // groups, positions]
    )
    columns = emit(aten.reshape.default, unfolded, [-1, static_shape(weight)[1] * math.prod(kernel), positions])
    return rows, columns, groups


def conv_sq_norm(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype) -> torch.fx.Node:
    """Bias: the per-sample sum over positions. Weight: the ghost norm of G_i = sum_g go_ig U_ig^T over the
    output positions, ``sum_g <go_ig^T go_ig, U_ig^T U_ig>`` (L x L Gram matrices of each group)."""
    conv = node.args[0]
    if node.args[1] == 2:
        sums = conv_per_sample(emit, joint, node, batch, dtype)
        return emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, sums, sums), [1])
    rows, columns, groups = _conv_groups(emit, conv, batch, dtype)
    gram_out = emit(aten.bmm.default, emit(aten.permute.default, rows, [0, 2, 1]), rows)  # (B*g, L, L)
    gram_in = emit(aten.bmm.default, emit(aten.permute.default, columns, [0, 2, 1]), columns)
    products = emit(aten.mul.Tensor, gram_out, gram_in)
    return emit(aten.sum.dim_IntList, emit(aten.reshape.default, products, [batch, -1]), [1])


def conv_reweight(emit: Emitter, joint: JointGraph, node: torch.fx.Node, weights, batch) -> torch.fx.Node:
    """sum_i w_i G_i: the weight gradient of the w-scaled grad_out (one convolution_backward), or its sum."""
    conv = node.args[0]
    grad_out = conv.args[0]
    scaled = emit(aten.mul.Tensor, grad_out, row_weights(emit, joint, weights, grad_out, batch))
    if node.args[1] == 2:
        return emit(aten.sum.dim_IntList, scaled, [0, *range(2, grad_out.meta["val"].dim())])
    args = list(conv.args)
    args[0], args[3], args[10] = scaled, None, [False, True, False]
    return emit(operator.getitem, emit(aten.convolution_backward.default, *args), 1)


def _conv_cost(joint: JointGraph, node: torch.fx.Node):
    conv = node.args[0]
    grad_out = shape_exprs(conv.args[0].meta["val"])
    positions = rows(product(grad_out), joint.batch, grad_out[1])
    if node.args[1] == 2:  # bias: a per-sample sum over positions
        direct = Cost(B * T * p + 2 * B * p, B * p)
        return {B: joint.batch, T: positions, p: grad_out[1]}, direct, direct
    weight = shape_exprs(conv.args[2].meta["val"])
    groups = sympy.Integer(conv.args[9])
    sizes = {B: joint.batch, T: positions, G: groups, p: weight[0] / groups, d: product(weight[1:])}
    ghost = Cost(G * B * (2 * T**2 * (p + d) + T**2), 2 * G * B * T**2)  # Gram matrices of each group
    return sizes, ghost, Cost(3 * G * B * p * d, G * B * p * d)


KIND = SiteKind(
    "conv",
    _conv_matches,
    conv_per_sample,
    _conv_cost,
    sq_norm=conv_sq_norm,
    reweight=conv_reweight,
    has_ghost=_conv_has_ghost,
    keep=(aten.convolution_backward.default,),
)
