"""Per-sample norms, clip factors and the book-keeping rewrite (passes 4-6 of the pipeline).

For a matmul site ``G = a @ b`` contracting over K = B*m rows, sample i owns rows ``[i*m, (i+1)*m)``:
``G_i = a_i @ b_i`` with a_i (n x m), b_i (m x p). Its ghost norm needs no G_i:
``||G_i||^2 = sum_{t,s} (a_i^T a_i)_{ts} (b_i b_i^T)_{ts}``  (and ``||a_i||^2 ||b_i||^2`` when m = 1).
For a sum site ``sum(x, dims)`` the per-sample gradient is the sum of sample i's rows, formed directly.

Clipping: ``n_i = s * sqrt(sum over sites ||G_i||^2)`` (s: the loss scale), ``C_i = min(1, R / (n_i + 1e-6))``,
``w_i = s * C_i``. Book-keeping: each site reduces ``w``-weighted operands instead::

    before:  grad = mm(t(grad_out), act)
    after:   grad = mm(t(grad_out) * w[rows], act)     # = sum_i w_i G_i, the sum of clipped gradients

Norms are accumulated in float32 (float64 when the model is float64).
"""

from __future__ import annotations

import torch
import torch.fx

import bkcompile.norms  # noqa: F401  (registers bkcompile::record_norms)
from bkcompile.options import BKOptions
from bkcompile.passes.batch_axis import JointGraph
from bkcompile.passes.emit import Emitter
from bkcompile.passes.facts import Batched, exact_quotient, to_expr
from bkcompile.passes.loss import LossScale
from bkcompile.passes.rules import _dims
from bkcompile.passes.sites import Site

aten = torch.ops.aten
EPS = 1e-6


def _acc_dtype(sites: list[Site]) -> torch.dtype:
    dtypes = {a.meta["val"].dtype for s in sites for a in s.node.all_input_nodes}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _inner(emit: Emitter, joint: JointGraph, value: torch.fx.Node, fact: Batched, batch) -> int | torch.fx.Node:
    """m: the rows per sample on the batch dim of ``value`` (its size over B)."""
    inner = exact_quotient(to_expr(value.meta["val"].shape[fact.dim]), joint.batch)
    if inner is not None and inner.is_Integer:
        return int(inner)
    return emit.floordiv(emit.size(value, fact.dim), batch)


def _split_batch(emit: Emitter, value: torch.fx.Node, dim: int, inner) -> torch.fx.Node:
    """View dim ``dim`` (size B*m) of ``value`` as (B, m)."""
    sizes = emit.sizes(value)
    return emit(aten.reshape.default, value, sizes[:dim] + [-1, inner] + sizes[dim + 1 :])


def matmul_sq_norms(emit: Emitter, joint: JointGraph, site: Site, batch, dtype) -> torch.fx.Node:
    """Ghost norms ||G_i||^2 of a matmul site ``a (L, n, K) @ b (L, K, p)`` (mm: L = 1), shape (B,)."""
    a, b = site.node.args[0], site.node.args[1]
    operand = a if isinstance(joint.facts[a], Batched) else b
    inner = _inner(emit, joint, operand, joint.facts[operand], batch)
    a, b = emit.to_dtype(a, dtype), emit.to_dtype(b, dtype)
    if site.node.target == aten.mm.default:
        a, b = emit(aten.unsqueeze.default, a, 0), emit(aten.unsqueeze.default, b, 0)
    a4 = emit(aten.permute.default, _split_batch(emit, a, 2, inner), [2, 0, 3, 1])  # (B, L, m, n)
    b4 = emit(aten.permute.default, _split_batch(emit, b, 1, inner), [1, 0, 2, 3])  # (B, L, m, p)
    if isinstance(inner, int) and inner == 1:
        na = emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, a4, a4), [2, 3])  # (B, L)
        nb = emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, b4, b4), [2, 3])
        return emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, na, nb), [1])
    a3 = emit(aten.reshape.default, a4, [-1, inner, emit.size(a4, 3)])  # (B*L, m, n)
    b3 = emit(aten.reshape.default, b4, [-1, inner, emit.size(b4, 3)])  # (B*L, m, p)
    gram_a = emit(aten.bmm.default, a3, emit(aten.permute.default, a3, [0, 2, 1]))
    gram_b = emit(aten.bmm.default, b3, emit(aten.permute.default, b3, [0, 2, 1]))
    products = emit(aten.mul.Tensor, gram_a, gram_b)  # (B*L, m, m)
    per_sample = emit(aten.reshape.default, products, [emit.size(a4, 0), -1])
    return emit(aten.sum.dim_IntList, per_sample, [1])


def sum_sq_norms(emit: Emitter, joint: JointGraph, site: Site, batch, dtype) -> torch.fx.Node:
    """||G_i||^2 of a sum site: sum sample i's rows over the reduced dims, then square and add."""
    x = site.node.args[0]
    fact: Batched = joint.facts[x]
    ndim = x.meta["val"].dim()
    dims = _dims(site.node.args[1] if site.node.target == aten.sum.dim_IntList else None, ndim)
    split = _split_batch(emit, emit.to_dtype(x, dtype), fact.dim, _inner(emit, joint, x, fact, batch))
    reduce_dims = [d + (d > fact.dim) for d in dims if d != fact.dim] + [fact.dim + 1]
    per_sample = emit(aten.sum.dim_IntList, split, reduce_dims, True)
    rest = [d for d in range(ndim + 1) if d != fact.dim]
    return emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, per_sample, per_sample), rest)


def _row_weights(emit: Emitter, joint: JointGraph, weights: torch.fx.Node, value: torch.fx.Node, fact: Batched, batch):
    """``weights`` (B,) broadcast over dim ``fact.dim`` (size B*m) of ``value``."""
    ndim = value.meta["val"].dim()
    w = emit.to_dtype(weights, value.meta["val"].dtype)
    inner = _inner(emit, joint, value, fact, batch)
    if not (isinstance(inner, int) and inner == 1):
        w = emit(aten.expand.default, emit(aten.unsqueeze.default, w, 1), [-1, inner])
        w = emit(aten.reshape.default, w, [-1])
    shape = [1] * ndim
    shape[fact.dim] = -1
    return emit(aten.view.default, w, shape)


def clip_factors(emit: Emitter, norms: torch.fx.Node, max_grad_norm: float) -> torch.fx.Node:
    """C_i = min(1, R / (n_i + 1e-6)), emitted as min(1, 1 / ((n_i + 1e-6) / R))."""
    scaled = emit(aten.div.Scalar, emit(aten.add.Scalar, norms, EPS), max_grad_norm)
    return emit(aten.clamp_max.default, emit(aten.reciprocal.default, scaled), 1.0)


def batch_size_value(emit: Emitter, joint: JointGraph) -> int | torch.fx.Node:
    if joint.batch.is_Integer:
        return int(joint.batch)
    source, dim = joint.batch_source
    return emit.size(source, dim)


def insert_clipping(joint: JointGraph, sites: list[Site], scale: LossScale, options: BKOptions, fake_mode) -> None:
    """Insert norms, clip factors and the weighted reductions; leaves the graph topologically sorted."""
    graph = joint.gm.graph
    emit = Emitter(graph, fake_mode)
    if not sites:
        return
    dtype = _acc_dtype(sites)
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first_op):
        batch = batch_size_value(emit, joint)
    squares = []
    for site in sites:
        with graph.inserting_before(site.node):
            norm_fn = matmul_sq_norms if site.kind == "matmul" else sum_sq_norms
            squares.append(norm_fn(emit, joint, site, batch, dtype))
    with graph.inserting_before(graph.output_node()):
        total = squares[0]
        for square in squares[1:]:
            total = emit(aten.add.Tensor, total, square)
        norms = emit(aten.sqrt.default, total)
        if scale.kind == "mean":
            factor = emit(aten.scalar_tensor.default, batch, dtype=dtype)
        elif scale.kind == "weight":
            factor = emit.to_dtype(scale.node, dtype)
        else:
            factor = None
        if factor is not None:
            norms = emit(aten.mul.Tensor, norms, factor)
        norms = emit(torch.ops.bkcompile.record_norms.default, norms)
        clip = clip_factors(emit, norms, options.max_grad_norm)
        weights = emit(aten.mul.Tensor, clip, factor) if factor is not None else clip
        for site in sites:
            args = list(site.node.args)
            position = next(i for i, a in enumerate(args[:2]) if isinstance(joint.facts.get(a), Batched))
            operand = args[position]
            fact = joint.facts[operand]
            args[position] = emit(aten.mul.Tensor, operand, _row_weights(emit, joint, weights, operand, fact, batch))
            weighted = emit(site.node.target, *args, **site.node.kwargs)
            weighted.meta.update({k: v for k, v in site.node.meta.items() if k != "val"})
            site.node.replace_all_uses_with(weighted)
            graph.erase_node(site.node)


def clip_single_sample(joint: JointGraph, options: BKOptions, fake_mode) -> None:
    """A graph compiled for a batch of exactly one sample: its gradient is that sample's gradient.

    Nothing can mix samples, so no sites are needed: ``n = ||grad||`` over all trainable parameters
    and every gradient output is scaled by ``C = min(1, R / (n + 1e-6))``.
    """
    graph = joint.gm.graph
    emit = Emitter(graph, fake_mode)
    grads = [(i, g) for i, (g, t) in enumerate(zip(joint.gradient_outputs, joint.trainable)) if g is not None and t]
    if not grads:
        return
    dtype = torch.float64 if any(g.meta["val"].dtype == torch.float64 for _, g in grads) else torch.float32
    with graph.inserting_before(graph.output_node()):
        total = None
        for _, grad in grads:
            g = emit.to_dtype(grad, dtype)
            square = emit(aten.sum.default, emit(aten.mul.Tensor, g, g))
            total = square if total is None else emit(aten.add.Tensor, total, square)
        norms = emit(torch.ops.bkcompile.record_norms.default, emit(aten.view.default, emit(aten.sqrt.default, total), [1]))
        clip = clip_factors(emit, norms, options.max_grad_norm)
        outputs = joint.outputs
        for index, grad in grads:
            factor = emit(aten.view.default, emit.to_dtype(clip, grad.meta["val"].dtype), [])
            outputs[joint.num_fwd_outputs + index] = emit(aten.mul.Tensor, grad, factor)
    graph.output_node().args = (outputs,)
