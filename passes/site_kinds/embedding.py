"""``embedding_dense_backward(grad (..., d), indices (...), V, padding_idx, by_freq)``: an embedding table's
gradient. Ghost norm by index equality: rows that hit the same entry add up."""

from __future__ import annotations

import math

import sympy
import torch
import torch.fx
from bkcompile.passes.emit import Emitter, static_shape
from bkcompile.passes.facts import Batched, Replicated, product, shape_exprs, to_expr
from bkcompile.passes.joint import JointGraph
from bkcompile.passes.ops.embedding import mask_padding, per_sample_tables
from bkcompile.passes.site_kinds.common import (
    B,
    Cost,
    Kernel,
    SiteKind,
    Size,
    T,
    V,
    d,
    on_dim0,
    passes,
    reweight_operand,
    rows,
)

aten = torch.ops.aten


def rows_per_sample(value: torch.fx.Node, batch: Size) -> int:
    """n where ``value`` (..., d) holds B * n rows, when the sizes make it a constant; else -1.

    A reshape to [B, -1, d] would guard on B * d != 0, which an unbacked batch size cannot decide.
    """
    total = math.prod(to_expr(s) for s in value.meta["val"].shape[:-1])
    count = sympy.simplify(total / to_expr(batch.meta["val"] if isinstance(batch, torch.fx.Node) else batch))
    return int(count) if count.is_Integer else -1


def _embedding_rows(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype):
    """Per-sample rows (B, T, d) with padding rows zeroed, and their indices (B, T)."""
    grad, indices, _, padding_idx = node.args[:4]
    count = rows_per_sample(grad, batch)
    dim = joint.facts[grad].dim
    grad = emit.to_dtype(grad, dtype)
    if dim != 0:  # time-major indices (T, B): each sample's rows brought to the front
        order = [dim, *(i for i in range(indices.meta["val"].dim()) if i != dim)]
        grad = emit(aten.permute.default, grad, [*order, len(order)])
        indices = emit(aten.permute.default, indices, order)
    values = emit(aten.reshape.default, grad, [batch, count, grad.meta["val"].shape[-1]])
    # a dense copy: the gradient of a pooled embedding is often an expand (stride 0), slow for the Gram bmm
    values = emit(aten.clone.default, values, memory_format=torch.contiguous_format)
    index = emit(aten.reshape.default, indices, [batch, count])
    return mask_padding(emit, values, index, padding_idx), index


def embedding_sq_norm(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype) -> torch.fx.Node:
    """``||G_i||^2 = sum_{t,s} [idx_t = idx_s] <g_t, g_s>``: rows that hit the same entry add up."""
    rows, index = _embedding_rows(emit, joint, node, batch, dtype)
    gram = emit(aten.bmm.default, rows, emit(aten.permute.default, rows, [0, 2, 1]))  # (B, T, T)
    equal = emit(aten.eq.Tensor, emit(aten.unsqueeze.default, index, 2), emit(aten.unsqueeze.default, index, 1))
    return emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, gram, emit.to_dtype(equal, dtype)), [1, 2])


def embedding_per_sample(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype) -> torch.fx.Node:
    """(B, V, d): each sample's rows scattered (added) into its own copy of the table."""
    rows, index = _embedding_rows(emit, joint, node, batch, dtype)
    return per_sample_tables(emit, rows, index, static_shape(node)[0], batch)


def _batch_dim(joint: JointGraph, value: torch.fx.Node) -> int | None:
    """The dim of ``value`` whose rows are whole samples, in order (dim 0, or any dim of time-major indices), or
    None."""
    fact = joint.facts.get(value)
    if not isinstance(fact, Batched) or fact.outer != 1 or (fact.dim != 0 and not fact.plain):
        return None
    return fact.dim


def _embedding_matches(joint: JointGraph, node: torch.fx.Node) -> bool:
    """Per-sample rows with per-sample indices (the batch on one dim of both alike), or with indices the samples
    share (an expanded buffer; the batch on dim 0)."""
    if node.target != aten.embedding_dense_backward.default:
        return False
    grad, indices = node.args[:2]
    dim = _batch_dim(joint, grad)
    if dim is None or dim >= indices.meta["val"].dim():
        return False
    shared = isinstance(joint.facts.get(indices), Replicated)
    if tuple(indices.meta["val"].shape) != tuple(grad.meta["val"].shape[:-1]):
        return not shared and dim == 0 and on_dim0(joint, indices)  # flat rows of one size, e.g. (B*T, d), (B, T)
    return dim == 0 if shared else _batch_dim(joint, indices) == dim


def _embedding_cost(joint: JointGraph, node: torch.fx.Node):
    vocab, width = shape_exprs(node.meta["val"])
    sizes = {B: joint.batch, T: rows(product(shape_exprs(node.args[1].meta["val"])), joint.batch), V: vocab, d: width}
    ghost_kernels = (
        Kernel("bmm", 2 * B * T**2 * d, B * (T * d + T**2), shape=(T, d, T)),  # the output gradient's Grams
        *passes(B * T**2, 2 * B * T**2, 2 * B * T * d),  # the ids' equality, the product summed, the weighting
    )
    explicit_kernels = (
        Kernel("pass", B * T * d, B * V * d + 2 * B * T * d),  # B tables, zeroed and scattered into
        Kernel("pass", B * T * d, V * d + 2 * B * T * d, count=-1),  # in place of the one table
        *passes(B * V * d, B * V * d + V * d),  # the norms, the weighted sum
    )
    return (
        sizes,
        Cost(B * (2 * T**2 * d + 2 * T**2), 2 * B * T**2, ghost_kernels),
        Cost(B * (T * d + 3 * V * d), B * V * d, explicit_kernels),
    )


KIND = SiteKind(
    "embedding",
    _embedding_matches,
    embedding_per_sample,
    _embedding_cost,
    sq_norm=embedding_sq_norm,
    reweight=reweight_operand,
    keep=(aten.embedding_dense_backward.default,),
)
