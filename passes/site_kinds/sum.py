"""Sums over the sample axis, ``sum(x, dims)`` with the batch dim among dims: biases, norm-layer affine
weights, elementwise scales. The norm is the direct per-sample sum (no per-sample gradient is larger)."""

from __future__ import annotations

import torch
import torch.fx
from bkcompile.passes.emit import Emitter, static_shape
from bkcompile.passes.facts import Batched, product, shape_exprs
from bkcompile.passes.joint import JointGraph
from bkcompile.passes.ops.table import norm_dims
from bkcompile.passes.site_kinds.common import (
    B,
    SiteKind,
    Size,
    T,
    direct_cost,
    p,
    reduces_samples,
    reweight_operand,
    rows,
    split_batch,
)

aten = torch.ops.aten


def _sum_per_sample_keepdim(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype):
    x = node.args[0]
    fact: Batched = joint.facts[x]
    ndim = x.meta["val"].dim()
    dims = norm_dims(node.args[1] if node.target == aten.sum.dim_IntList else None, ndim)
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


def _sum_matches(joint: JointGraph, node: torch.fx.Node) -> bool:
    return node.target in (aten.sum.dim_IntList, aten.sum.default) and reduces_samples(joint, node)


def _sum_cost(joint: JointGraph, node: torch.fx.Node):
    out = product(shape_exprs(node.meta["val"]))
    sizes = {B: joint.batch, T: rows(product(shape_exprs(node.args[0].meta["val"])), joint.batch, out), p: out}
    direct = direct_cost()  # ghost and explicit are the same per-sample sum
    return sizes, direct, direct


KIND = SiteKind("sum", _sum_matches, sum_per_sample, _sum_cost, sq_norm=sum_sq_norm, reweight=reweight_operand)
