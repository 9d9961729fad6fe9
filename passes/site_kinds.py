"""Site kinds: one row per kind of op that reduces per-sample values into a parameter gradient.

Each kind says how to recognise its node and how to get, for sample i, the part G_i of the reduction:

- ``sq_norm``    ||G_i||^2 without forming G_i (ghost norm; for sums, the direct per-sample sum), or None;
- ``per_sample`` the explicit per-sample values, shape (B, *shape of the site's value);
- ``reweight``   the site re-emitted with its per-sample operand scaled by w_i: sum_i w_i G_i
                 (book-keeping: one reduction, no second backward), or None when only explicit works.

Kinds: ``matmul`` (``mm``/``bmm`` contracting over the samples: linear and einsum weights), ``sum``
(biases, norm-layer affine weights, elementwise scales), ``embedding`` (``embedding_dense_backward``,
ghost norm by index equality) and ``conv`` (``convolution_backward`` weight and bias outputs).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable

import torch
import torch.fx
from bkcompile.passes.emit import Emitter
from bkcompile.passes.facts import Batched, Reduced, Replicated
from bkcompile.passes.joint import JointGraph
from bkcompile.passes.rules import _dims

from bkcompile.errors import NotSupportedYetError, node_error

aten = torch.ops.aten
Size = int | torch.fx.Node


@dataclasses.dataclass(frozen=True)
class SiteKind:
    matches: Callable[[JointGraph, torch.fx.Node], bool]
    per_sample: Callable[..., torch.fx.Node]
    sq_norm: Callable[..., torch.fx.Node] | None = None
    reweight: Callable[..., torch.fx.Node] | None = None
    has_ghost: Callable[[torch.fx.Node], bool] = lambda node: True  # whether sq_norm and reweight apply

    def ghost_ok(self, node: torch.fx.Node) -> bool:
        return self.sq_norm is not None and self.reweight is not None and self.has_ghost(node)


# --- shared helpers -------------------------------------------------------------------------------------


def layout(emit: Emitter, value: torch.fx.Node, fact: Batched, dim: int, batch: Size) -> tuple[Size, Size]:
    """(outer, inner) of the batch dim ``dim`` of ``value`` (laid out as ``fact``): ints, or size nodes."""
    if fact.outer.is_Integer and fact.inner.is_Integer:
        return int(fact.outer), int(fact.inner)
    rows = emit.floordiv(emit.size(value, dim), batch)  # outer * inner
    if fact.outer.is_Integer:
        return int(fact.outer), emit.floordiv(rows, int(fact.outer))
    if fact.inner.is_Integer:
        return emit.floordiv(rows, int(fact.inner)), int(fact.inner)
    raise node_error(
        NotSupportedYetError,
        value,
        "the sample axis of this value has symbolic sizes both before and after it",
        "keep the batch the leading dim of per-sample inputs",
    )


def split_batch(emit: Emitter, value: torch.fx.Node, fact: Batched, dim: int, batch: Size) -> torch.fx.Node:
    """View the batch dim ``dim`` (size outer*B*inner) of ``value`` as (B, m): m = outer*inner rows per sample."""
    outer, inner = layout(emit, value, fact, dim, batch)
    sizes = emit.sizes(value)
    if isinstance(outer, int) and outer == 1:
        return emit(aten.reshape.default, value, sizes[:dim] + [batch, inner] + sizes[dim + 1 :])
    grouped = emit(aten.reshape.default, value, sizes[:dim] + [outer, batch, inner] + sizes[dim + 1 :])
    order = list(range(len(sizes) + 2))
    order[dim], order[dim + 1] = dim + 1, dim
    moved = emit(aten.permute.default, grouped, order)  # (..., B, outer, inner, ...)
    return emit(aten.reshape.default, moved, sizes[:dim] + [batch, -1] + sizes[dim + 1 :])


def static_shape(value: torch.fx.Node) -> list[int]:
    return [int(s) for s in value.meta["val"].shape]


def row_weights(emit: Emitter, joint: JointGraph, weights: torch.fx.Node, value: torch.fx.Node, batch: Size):
    """``weights`` (B,) broadcast over the batch dim (size outer*B*inner) of ``value``."""
    fact: Batched = joint.facts[value]
    ndim = value.meta["val"].dim()
    w = emit.to_dtype(weights, value.meta["val"].dtype)
    if not fact.plain:
        outer, inner = layout(emit, value, fact, fact.dim, batch)
        w = emit(aten.expand.default, emit(aten.view.default, w, [1, -1, 1]), [outer, -1, inner])
        w = emit(aten.reshape.default, w, [-1])
    shape = [1] * ndim
    shape[fact.dim] = -1
    return emit(aten.view.default, w, shape)


def _reweight_operand(emit: Emitter, joint: JointGraph, node: torch.fx.Node, weights, batch) -> torch.fx.Node:
    """Re-emit ``node`` with its first per-sample operand (of the first two) scaled by the row weights."""
    args = list(node.args)
    position = next(i for i, a in enumerate(args[:2]) if isinstance(joint.facts.get(a), Batched))
    args[position] = emit(aten.mul.Tensor, args[position], row_weights(emit, joint, weights, args[position], batch))
    weighted = emit(node.target, *args, **node.kwargs)
    weighted.meta.update({k: v for k, v in node.meta.items() if k != "val"})
    return weighted


def reduces_samples(joint: JointGraph, node: torch.fx.Node) -> bool:
    """A sum over samples: a reduced value computed from per-sample ones (the weight and bias outputs of a
    convolution_backward too)."""
    conv = node.target is operator.getitem and node.args[0].target == aten.convolution_backward.default
    source = node.args[0] if conv else node
    return isinstance(joint.facts.get(node), Reduced) and any(
        isinstance(joint.facts.get(a), Batched) for a in source.all_input_nodes
    )


# --- matmul: G = a (L, n, K) @ b (L, K, p), K = B*m (mm: L = 1) --------------------------------------


def _matmul_operands(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype: torch.dtype):
    """(B, L, m, n) and (B, L, m, p) views of the operands, and m."""
    a, b = node.args[0], node.args[1]
    fact = joint.facts[a] if isinstance(joint.facts[a], Batched) else joint.facts[b]
    a, b = emit.to_dtype(a, dtype), emit.to_dtype(b, dtype)
    if node.target == aten.mm.default:
        a, b = emit(aten.unsqueeze.default, a, 0), emit(aten.unsqueeze.default, b, 0)
    a4 = emit(aten.permute.default, split_batch(emit, a, fact, 2, batch), [2, 0, 3, 1])
    b4 = emit(aten.permute.default, split_batch(emit, b, fact, 1, batch), [1, 0, 2, 3])
    return a4, b4, emit.size(a4, 2)


def matmul_sq_norm(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype) -> torch.fx.Node:
    """``||a_i^T b_i||^2 = sum_{t,s} (a_i a_i^T)_{ts} (b_i b_i^T)_{ts}``; ``||a_i||^2 ||b_i||^2`` when m = 1."""
    a4, b4, inner = _matmul_operands(emit, joint, node, batch, dtype)
    if isinstance(inner, int) and inner == 1:
        na = emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, a4, a4), [2, 3])  # (B, L)
        nb = emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, b4, b4), [2, 3])
        return emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, na, nb), [1])
    a3 = emit(aten.reshape.default, a4, [-1, inner, emit.size(a4, 3)])  # (B*L, m, n)
    b3 = emit(aten.reshape.default, b4, [-1, inner, emit.size(b4, 3)])  # (B*L, m, p)
    gram_a = emit(aten.bmm.default, a3, emit(aten.permute.default, a3, [0, 2, 1]))
    gram_b = emit(aten.bmm.default, b3, emit(aten.permute.default, b3, [0, 2, 1]))
    products = emit(aten.mul.Tensor, gram_a, gram_b)  # (B*L, m, m)
    return emit(aten.sum.dim_IntList, emit(aten.reshape.default, products, [emit.size(a4, 0), -1]), [1])


def matmul_per_sample(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype) -> torch.fx.Node:
    """G_i = a_i^T b_i for every sample: (B, n, p) for mm, (B, L, n, p) for bmm."""
    a4, b4, inner = _matmul_operands(emit, joint, node, batch, dtype)
    a3 = emit(aten.reshape.default, a4, [-1, inner, emit.size(a4, 3)])
    b3 = emit(aten.reshape.default, b4, [-1, inner, emit.size(b4, 3)])
    grads = emit(aten.bmm.default, emit(aten.permute.default, a3, [0, 2, 1]), b3)  # (B*L, n, p)
    return emit(aten.reshape.default, grads, [-1, *static_shape(node)])


# --- sum: sum(x, dims) with the sample axis among dims ------------------------------------------------------


def _sum_per_sample_keepdim(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype):
    x = node.args[0]
    fact: Batched = joint.facts[x]
    ndim = x.meta["val"].dim()
    dims = _dims(node.args[1] if node.target == aten.sum.dim_IntList else None, ndim)
    split = split_batch(emit, emit.to_dtype(x, dtype), fact, fact.dim, batch)
    reduce_dims = [d + (d > fact.dim) for d in dims if d != fact.dim] + [fact.dim + 1]
    return emit(aten.sum.dim_IntList, split, reduce_dims, True), fact.dim  # batch on fact.dim, ones elsewhere


def sum_sq_norm(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype) -> torch.fx.Node:
    per_sample, dim = _sum_per_sample_keepdim(emit, joint, node, batch, dtype)
    rest = [d for d in range(per_sample.meta["val"].dim()) if d != dim]
    return emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, per_sample, per_sample), rest)


def sum_per_sample(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype) -> torch.fx.Node:
    per_sample, dim = _sum_per_sample_keepdim(emit, joint, node, batch, dtype)
    ndim = per_sample.meta["val"].dim()
    moved = emit(aten.permute.default, per_sample, [dim] + [d for d in range(ndim) if d != dim])
    return emit(aten.reshape.default, moved, [-1, *static_shape(node)])


# --- embedding: embedding_dense_backward(grad (..., d), indices (...), V, padding_idx, by_freq) -----------


def _embedding_rows(emit: Emitter, node: torch.fx.Node, batch: Size, dtype):
    """Per-sample rows (B, T, d) with padding rows zeroed, and their indices (B, T)."""
    grad, indices, _, padding_idx = node.args[:4]
    rows = emit(aten.reshape.default, emit.to_dtype(grad, dtype), [batch, -1, grad.meta["val"].shape[-1]])
    # a dense copy: the gradient of a pooled embedding is often an expand (stride 0), slow for the Gram bmm
    rows = emit(aten.clone.default, rows, memory_format=torch.contiguous_format)
    index = emit(aten.reshape.default, indices, [batch, -1])
    return mask_padding(emit, rows, index, padding_idx), index


def mask_padding(emit: Emitter, rows: torch.fx.Node, index: torch.fx.Node, padding_idx: int | None) -> torch.fx.Node:
    """``rows`` (B, n, d) with the rows whose ``index`` (B or 1, n) is ``padding_idx`` zeroed."""
    if padding_idx is None or padding_idx < 0:
        return rows
    keep = emit.to_dtype(emit(aten.ne.Scalar, index, padding_idx), rows.meta["val"].dtype)
    return emit(aten.mul.Tensor, rows, emit(aten.unsqueeze.default, keep, 2))


def per_sample_tables(emit: Emitter, rows: torch.fx.Node, index: torch.fx.Node, vocab: int, batch: Size):
    """(B, V, d): rows (B, n, d) added at ``index`` (B or 1, n) into a zero table of each sample."""
    width = rows.meta["val"].shape[-1]
    table = emit(
        aten.zeros.default, [batch, vocab, width], dtype=rows.meta["val"].dtype, device=rows.meta["val"].device
    )
    where = emit(aten.expand.default, emit(aten.unsqueeze.default, index, 2), [batch, -1, width])
    return emit(aten.scatter_add.default, table, 1, where, rows)


def embedding_sq_norm(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype) -> torch.fx.Node:
    """``||G_i||^2 = sum_{t,s} [idx_t = idx_s] <g_t, g_s>``: rows that hit the same entry add up."""
    rows, index = _embedding_rows(emit, node, batch, dtype)
    gram = emit(aten.bmm.default, rows, emit(aten.permute.default, rows, [0, 2, 1]))  # (B, T, T)
    equal = emit(aten.eq.Tensor, emit(aten.unsqueeze.default, index, 2), emit(aten.unsqueeze.default, index, 1))
    return emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, gram, emit.to_dtype(equal, dtype)), [1, 2])


def embedding_per_sample(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype) -> torch.fx.Node:
    """(B, V, d): each sample's rows scattered (added) into its own copy of the table."""
    rows, index = _embedding_rows(emit, node, batch, dtype)
    return per_sample_tables(emit, rows, index, static_shape(node)[0], batch)


def _on_dim0(joint: JointGraph, value: torch.fx.Node) -> bool:
    fact = joint.facts.get(value)
    return isinstance(fact, Batched) and fact.dim == 0 and fact.outer == 1


def _embedding_matches(joint: JointGraph, node: torch.fx.Node) -> bool:
    """Per-sample rows with per-sample indices, or with indices the samples share (an expanded buffer)."""
    if node.target != aten.embedding_dense_backward.default or not _on_dim0(joint, node.args[0]):
        return False
    grad, indices = (v.meta["val"] for v in node.args[:2])
    shared = isinstance(joint.facts.get(node.args[1]), Replicated) and tuple(indices.shape) == tuple(grad.shape[:-1])
    return shared or _on_dim0(joint, node.args[1])


# --- conv: getitem(convolution_backward(grad_out, input, weight, ...), 1 = weight | 2 = bias) ---------------


def _conv_matches(joint: JointGraph, node: torch.fx.Node) -> bool:
    if node.target is not operator.getitem or node.args[1] not in (1, 2):
        return False
    conv = node.args[0]
    if conv.target != aten.convolution_backward.default:
        return False
    inputs = conv.args[:2] if node.args[1] == 1 else conv.args[:1]
    return all(_on_dim0(joint, v) and (joint.facts[v].plain or joint.batch == 1) for v in inputs)


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


def _matmul_matches(joint: JointGraph, node: torch.fx.Node) -> bool:
    return node.target in (aten.mm.default, aten.bmm.default) and reduces_samples(joint, node)


def _sum_matches(joint: JointGraph, node: torch.fx.Node) -> bool:
    return node.target in (aten.sum.dim_IntList, aten.sum.default) and reduces_samples(joint, node)


SITE_KINDS: dict[str, SiteKind] = {
    "matmul": SiteKind(_matmul_matches, matmul_per_sample, matmul_sq_norm, _reweight_operand),
    "sum": SiteKind(_sum_matches, sum_per_sample, sum_sq_norm, _reweight_operand),
    "embedding": SiteKind(_embedding_matches, embedding_per_sample, embedding_sq_norm, _reweight_operand),
    "conv": SiteKind(_conv_matches, conv_per_sample, conv_sq_norm, conv_reweight, _conv_has_ghost),
}


def kind_of(joint: JointGraph, node: torch.fx.Node) -> str | None:
    return next((name for name, kind in SITE_KINDS.items() if kind.matches(joint, node)), None)
