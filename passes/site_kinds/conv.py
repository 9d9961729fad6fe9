"""``getitem(convolution_backward(grad_out, input, weight, ...), 1 = weight | 2 = bias)``: convolution
weights and biases. Linear after unfolding (T = output positions, d = C_in/groups * kernel, p = C_out/groups):
ghost norms by Gram matrices (1-d and 2-d forward convolutions: the input's read off the padded input's own
Gram matrices for stride-1 and 1x1 convolutions, else from im2col); per-sample gradients by one grouped
convolution_backward with the samples as groups."""

from __future__ import annotations

import dataclasses
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
    Kernel,
    SiteKind,
    Size,
    T,
    d,
    direct_cost,
    on_dim0,
    p,
    passes,
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


@torch.library.custom_op("bkcompile::conv_weight_per_sample", mutates_args=())
def conv_weight_per_sample(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    transposed: bool,
    output_padding: list[int],
    groups: int,
) -> torch.Tensor:
    """(B, *weight.shape): each sample's weight gradient, by one grouped convolution_backward with the samples as
    groups (input (1, B*C_in, ...), groups B*g).

    An opaque op for the compiler: Inductor's lowering of convolution_backward needs its groups as an int, which a
    dynamic batch (groups B*g) is not, so it would specialise B or fail on the unbacked batch of
    ``mark_batch_dynamic``; called here, the kernel is the one its fallback would call."""
    batch, shape = x.shape[0], list(weight.shape)
    if batch == 0:
        return grad_out.new_zeros([0, *shape])
    flat_out = grad_out.reshape(1, -1, *grad_out.shape[2:])
    flat_in = x.reshape(1, -1, *x.shape[2:])
    # the weight gradient reads the weight's shape alone: its B copies are one zero-stride view
    stacked = weight.as_strided([shape[0] * batch, *shape[1:]], [0] * len(shape))
    _, grads, _ = torch.ops.aten.convolution_backward.default(
        flat_out,
        flat_in,
        stacked,
        None,
        stride,
        padding,
        dilation,
        transposed,
        output_padding,
        groups * batch,
        [False, True, False],
    )
    return grads.reshape(batch, *shape)


@conv_weight_per_sample.register_fake
def _conv_weight_per_sample_fake(grad_out, x, weight, stride, padding, dilation, transposed, output_padding, groups):
    return grad_out.new_empty([x.shape[0], *weight.shape])


def conv_per_sample(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype) -> torch.fx.Node:
    """Bias: grad_out summed over positions. Weight: :func:`conv_weight_per_sample`."""
    conv = node.args[0]
    grad_out, x, weight, _, stride, padding, dilation, transposed, output_padding, groups = conv.args[:10]
    grad_out = emit.to_dtype(grad_out, dtype)
    if node.args[1] == 2:
        return emit(aten.sum.dim_IntList, grad_out, list(range(2, grad_out.meta["val"].dim())))
    return emit(
        torch.ops.bkcompile.conv_weight_per_sample.default,
        grad_out,
        emit.to_dtype(x, dtype),
        emit.to_dtype(weight, dtype),
        stride,
        padding,
        dilation,
        transposed,
        output_padding,
        groups,
    )


def _conv_has_ghost(node: torch.fx.Node) -> bool:
    """Bias: always (a per-sample sum). Weight: 1-d and 2-d forward convolutions (unfolded by im2col)."""
    conv = node.args[0]
    return node.args[1] == 2 or (not conv.args[7] and conv.args[0].meta["val"].dim() in (3, 4))


def _as_2d(conv: torch.fx.Node, values, fill: int) -> list[int]:
    """A 1-d convolution is a 2-d one of height one: its kernel, stride, padding or dilation in two dims."""
    return [fill, *values] if conv.args[0].meta["val"].dim() == 3 else list(values)


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """A convolution's static spatial sizes, each in two dims (a 1-d convolution is 2-d of height one)."""

    padded: list[int]  # the input's height and width with padding
    kernel: list[int]
    stride: list[int]
    dilation: list[int]
    out: list[int]  # the output's height and width


def _geometry(conv: torch.fx.Node) -> _Geometry | None:
    """The geometry of a convolution whose spatial sizes are static, else None."""
    spatial = list(conv.args[1].meta["val"].shape[2:])
    if not all(isinstance(size, int) for size in spatial):
        return None
    kernel = _as_2d(conv, static_shape(conv.args[2])[2:], 1)
    stride, dilation = _as_2d(conv, conv.args[4], 1), _as_2d(conv, conv.args[6], 1)
    padded = [size + 2 * q for size, q in zip(_as_2d(conv, spatial, 1), _as_2d(conv, conv.args[5], 0))]
    out = [(size - d * (k - 1) - 1) // s + 1 for size, k, s, d in zip(padded, kernel, stride, dilation)]
    return _Geometry(padded, kernel, stride, dilation, out)


def _gram_of_padded(conv: torch.fx.Node) -> bool:
    """Whether the unfolded input's Gram matrices are cheaper read off the padded input's own Gram matrices
    (P x P, C_in/g channels) than formed from the unfolded input (L x L, C_in/g * k each, and the im2col
    copy): P^2 <= k L^2, so for stride-1 convolutions (P ~ L) and 1x1 ones without stride."""
    shape = _geometry(conv)
    if shape is None:
        return False
    return math.prod(shape.padded) ** 2 <= math.prod(shape.kernel) * math.prod(shape.out) ** 2


def _by_group(emit: Emitter, value: torch.fx.Node, groups: int, lead: Size, positions: Size) -> torch.fx.Node:
    """``value`` (B, C, ...) as (B*g, C/g, L), L = ``positions``, by one plain merge or split at a time: Inductor
    lowers a view that splits and merges in one step by guards on the sizes, which an unbacked batch cannot
    answer."""
    batch, channels = emit.size(value, 0), int(value.meta["val"].shape[1])
    flat = emit(aten.reshape.default, value, [batch, channels, positions])
    if groups == 1:
        return flat
    split = emit(aten.reshape.default, flat, [batch, groups, channels // groups, positions])
    return emit(aten.reshape.default, split, [lead, channels // groups, positions])


def _output_rows(emit: Emitter, conv: torch.fx.Node, lead: Size, dtype) -> torch.fx.Node:
    """grad_out by sample and group: (B*g, C_out/g, L), L output positions; lead = B*g."""
    grad_out, groups = conv.args[0], conv.args[9]
    spatial = list(grad_out.meta["val"].shape[2:])
    positions = math.prod(spatial) if all(isinstance(size, int) for size in spatial) else -1
    return _by_group(emit, emit.to_dtype(grad_out, dtype), groups, lead, positions)


def _unfolded_gram(emit: Emitter, conv: torch.fx.Node, lead: Size, dtype) -> torch.fx.Node:
    """U^T U of each sample and group, (B*g, L, L), from the unfolded input U (B*g, C_in/g * k, L) (im2col); lead
    = B*g (given, not inferred: inferring divides by the other sizes, a guard an unbacked batch cannot answer)."""
    x, weight, _, stride, padding, dilation = conv.args[1:7]
    one_d = x.meta["val"].dim() == 3
    kernel = static_shape(weight)[2:]
    x = emit.to_dtype(x, dtype)
    unfolded = emit(
        aten.im2col.default,
        emit(aten.unsqueeze.default, x, 2) if one_d else x,
        _as_2d(conv, kernel, 1),
        _as_2d(conv, dilation, 1),
        _as_2d(conv, padding, 0),
        _as_2d(conv, stride, 1),
    )  # (B, Cin*k, L)
    positions = emit.size(unfolded, 2)
    columns = _by_group(emit, unfolded, conv.args[9], lead, positions)  # (B*g, C_in/g * k, L)
    return emit(aten.bmm.default, emit(aten.permute.default, columns, [0, 2, 1]), columns)


def _position_table(emit: Emitter, shape: _Geometry, device) -> torch.fx.Node:
    """(k, L) int64: the padded-input position (flat over the padded H x W) that kernel offset o reads for
    output position t."""
    width = shape.padded[1]

    def ramp(n: int, step: int) -> torch.fx.Node:
        return emit(aten.arange.start_step, 0, n * step, step, dtype=torch.int64, device=device)

    rows = emit(aten.unsqueeze.default, ramp(shape.out[0], shape.stride[0] * width), 1)
    base = emit(aten.reshape.default, emit(aten.add.Tensor, rows, ramp(shape.out[1], shape.stride[1])), [1, -1])
    offsets = emit(aten.unsqueeze.default, ramp(shape.kernel[0], shape.dilation[0] * width), 1)
    offsets = emit(aten.add.Tensor, offsets, ramp(shape.kernel[1], shape.dilation[1]))
    offsets = emit(aten.reshape.default, offsets, [-1, 1])
    return emit(aten.add.Tensor, offsets, base)


def _padded_gram_products(
    emit: Emitter, conv: torch.fx.Node, gram_out: torch.fx.Node, lead: Size, dtype
) -> torch.fx.Node:
    """sum_{t,t'} (go go^T)_{tt'} (U^T U)_{tt'} per sample and group, (B*g,), without unfolding:
    (U^T U)_{tt'} = sum_o Xp_{pos(o,t)}^T Xp_{pos(o,t')}, the padded input's Gram matrix (B*g, P, P) read at
    the positions each kernel offset o maps the output positions to."""
    x, padding = conv.args[1], conv.args[5]
    x = emit.to_dtype(x, dtype)
    if x.meta["val"].dim() == 3:
        x = emit(aten.unsqueeze.default, x, 2)
    shape = _geometry(conv)
    pad = _as_2d(conv, padding, 0)
    padded = emit(aten.constant_pad_nd.default, x, [pad[1], pad[1], pad[0], pad[0]], 0.0)
    flat = _by_group(emit, padded, conv.args[9], lead, math.prod(shape.padded))
    gram_in = emit(aten.bmm.default, emit(aten.permute.default, flat, [0, 2, 1]), flat)  # (B*g, P, P)
    table = _position_table(emit, shape, x.meta["val"].device)
    read = emit(
        aten.index.Tensor,
        gram_in,
        [None, emit(aten.unsqueeze.default, table, 2), emit(aten.unsqueeze.default, table, 1)],
    )  # (B*g, k, L, L)
    products = emit(aten.mul.Tensor, read, emit(aten.unsqueeze.default, gram_out, 1))
    return emit(aten.sum.dim_IntList, products, [1, 2, 3])


def conv_sq_norm(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype) -> torch.fx.Node:
    """Bias: the per-sample sum over positions. Weight: the ghost norm of G_i = sum_g go_ig U_ig^T over the
    output positions, ``sum_g <go_ig^T go_ig, U_ig^T U_ig>`` (L x L Gram matrices of each group; U^T U from
    the padded input's Gram matrices where that is cheaper than unfolding, see ``_gram_of_padded``)."""
    conv = node.args[0]
    if node.args[1] == 2:
        sums = conv_per_sample(emit, joint, node, batch, dtype)
        return emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, sums, sums), [1])
    groups = conv.args[9]
    lead = emit.mul(batch, groups)
    rows = _output_rows(emit, conv, lead, dtype)
    gram_out = emit(aten.bmm.default, emit(aten.permute.default, rows, [0, 2, 1]), rows)  # (B*g, L, L)
    if _gram_of_padded(conv):
        products = _padded_gram_products(emit, conv, gram_out, lead, dtype)  # (B*g,)
    else:
        products = emit(aten.mul.Tensor, gram_out, _unfolded_gram(emit, conv, lead, dtype))
        products = emit(aten.sum.dim_IntList, products, [1, 2])
    return emit(aten.sum.dim_IntList, emit(aten.reshape.default, products, [batch, groups]), [1])


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
        direct = direct_cost()
        return {B: joint.batch, T: positions, p: grad_out[1]}, direct, direct
    weight = shape_exprs(conv.args[2].meta["val"])
    groups = sympy.Integer(conv.args[9])
    sizes = {B: joint.batch, T: positions, G: groups, p: weight[0] / groups, d: product(weight[1:])}
    # Gram matrices of each group: the input's from the unfolded input (2T^2 d), or from the padded input's
    # P x P Gram matrices over its d/k channels and a read of k T^2 of their entries
    shape = _geometry(conv) if _gram_of_padded(conv) else None
    if shape is None:
        gram_in = 2 * T**2 * d
        gram_in_kernels = (
            Kernel("pass", 0, G * B * T * d),
            Kernel("bmm", G * B * gram_in, G * B * (T * d + T**2), shape=(T, d, T)),
        )
    else:
        kernel, padded = math.prod(shape.kernel), math.prod(shape.padded)
        gram_in = 2 * padded**2 * d / kernel + kernel * T**2
        gram_in_kernels = (
            Kernel(
                "bmm",
                G * B * 2 * padded**2 * d / kernel,
                G * B * (padded * d / kernel + padded**2),
                shape=(padded, d / kernel, padded),
            ),
            *passes(G * B * (kernel * T**2 + T**2)),  # the kernel offsets' entries read and summed
        )
    ghost_kernels = (
        Kernel("bmm", G * B * 2 * T**2 * p, G * B * (T * p + T**2), shape=(T, p, T)),  # the output gradient's Grams
        *gram_in_kernels,
        *passes(2 * G * B * T**2, 2 * G * B * T * p),  # the Grams' product summed; the weighting
    )
    ghost = Cost(G * B * (2 * T**2 * p + gram_in + T**2), 2 * G * B * T**2, ghost_kernels)
    explicit_kernels = (
        Kernel("bmm", 2 * G * B * T * p * d, G * B * (T * p + T * d + p * d), shape=(p, T, d)),  # per-sample
        Kernel("mm", 2 * G * B * T * p * d, G * (B * T * p + B * T * d + p * d), count=-1),  # in place of this
        *passes(G * B * p * d, G * B * p * d + G * p * d),  # the norms, the weighted sum
    )
    return sizes, ghost, Cost(3 * G * B * p * d, G * B * p * d, explicit_kernels)


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
