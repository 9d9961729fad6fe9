"""Matrix products contracting over the samples: ``G = a (L, n, K) @ b (L, K, p)`` with K = B*m rows
(``mm``: L = 1); linear and einsum weights. Ghost norm by Gram matrices of each sample's m rows."""

from __future__ import annotations

import sympy
import torch
import torch.fx
from bkcompile.passes.emit import Emitter, static_shape
from bkcompile.passes.facts import Batched, shape_exprs
from bkcompile.passes.joint import JointGraph
from bkcompile.passes.site_kinds.common import (
    B,
    Cost,
    Kernel,
    SiteKind,
    Size,
    T,
    d,
    p,
    passes,
    reduces_samples,
    reweight_operand,
    rows,
    split_batch,
)

aten = torch.ops.aten


def product_operands(emit: Emitter, a, b, fact: Batched, batch: Size, dtype: torch.dtype, batched: bool):
    """(B*L, m, n) and (B*L, m, p) views of a (L, n, K) and b (L, K, p) (without L unless ``batched``), whose
    K = outer*B*inner rows are laid out as ``fact``, m = outer*inner (the rows of sample i, layer l at i*L + l),
    and L."""
    a, b = emit.to_dtype(a, dtype), emit.to_dtype(b, dtype)
    if not batched:  # (n, B, m) and (B, m, p): one view and one transpose
        b3 = split_batch(emit, b, fact, 0, batch)
        return emit(aten.permute.default, split_batch(emit, a, fact, 1, batch), [1, 2, 0]), b3, emit.size(b3, 1), 1
    a4 = emit(aten.permute.default, split_batch(emit, a, fact, 2, batch), [2, 0, 3, 1])  # (B, L, m, n)
    b4 = emit(aten.permute.default, split_batch(emit, b, fact, 1, batch), [1, 0, 2, 3])  # (B, L, m, p)
    inner = emit.size(a4, 2)
    a3 = emit(aten.reshape.default, a4, [-1, inner, emit.size(a4, 3)])
    return a3, emit(aten.reshape.default, b4, [-1, inner, emit.size(b4, 3)]), inner, emit.size(a4, 1)


def gram_sq_norm(emit: Emitter, a3, b3, inner: Size, layers: Size, batch: Size) -> torch.fx.Node:
    """``||a_i^T b_i||^2 = sum_{t,s} (a_i a_i^T)_{ts} (b_i b_i^T)_{ts}``; ``||a_i||^2 ||b_i||^2`` when m = 1
    (summed over the L products of a sample)."""
    if isinstance(inner, int) and inner == 1:
        na = emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, a3, a3), [1, 2])  # (B*L,)
        nb = emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, b3, b3), [1, 2])
        squares = emit(aten.mul.Tensor, na, nb)
    else:
        gram_a = emit(aten.bmm.default, a3, emit(aten.permute.default, a3, [0, 2, 1]))
        gram_b = emit(aten.bmm.default, b3, emit(aten.permute.default, b3, [0, 2, 1]))
        squares = emit(aten.sum.dim_IntList, emit(aten.mul.Tensor, gram_a, gram_b), [1, 2])  # (B*L,)
    if isinstance(layers, int) and layers == 1:
        return squares
    return emit(aten.sum.dim_IntList, emit(aten.view.default, squares, [batch, layers]), [1])  # sizes of an empty batch


def per_sample_products(emit: Emitter, a3, b3, inner: Size, layers: Size, shape: list[int]) -> torch.fx.Node:
    """G_i = a_i^T b_i for every sample, (B, *shape): ``shape`` (n, p), or (L, n, p) for bmm."""
    grads = emit(aten.bmm.default, emit(aten.permute.default, a3, [0, 2, 1]), b3)  # (B*L, n, p)
    return emit(aten.reshape.default, grads, [-1, *shape])


def product_cost(joint: JointGraph, a: list[sympy.Expr], columns: sympy.Expr, operands=(None, None)):
    """Costs of a (L, n, K) @ b (L, K, ``columns``) (a without L for mm): ghost, the two Gram matrices and
    their product; explicit, the per-sample gradients, their norms and sum. ``operands``: the nodes of a and b,
    which the Grams are of."""
    lead = a[0] if len(a) == 3 else sympy.Integer(1)
    sizes = {B: joint.batch, T: rows(a[-1], joint.batch), p: a[-2], d: columns}
    L = lead
    grams = (
        Kernel("bmm", 2 * L * B * T**2 * p, L * B * (T * p + T**2), shape=(T, p, T), gram_of=operands[0]),
        Kernel("bmm", 2 * L * B * T**2 * d, L * B * (T * d + T**2), shape=(T, d, T), gram_of=operands[1]),
    )
    # the Grams' product summed, and the narrower operand scaled by the clip weights
    ghost_kernels = grams + passes(2 * L * B * T**2, 2 * L * B * T * sympy.Min(p, d))
    ghost = Cost(L * B * (2 * T**2 * (p + d) + T**2), L * 2 * B * T**2, ghost_kernels)
    explicit_kernels = (
        Kernel("bmm", 2 * L * B * T * p * d, L * B * (T * p + T * d + p * d), shape=(p, T, d)),  # per-sample products
        Kernel("mm", 2 * L * B * T * p * d, L * (B * T * p + B * T * d + p * d), count=-1),  # in place of this one
        *passes(L * B * p * d, L * B * p * d + L * p * d),  # the norms, the weighted sum
    )
    return sizes, ghost, Cost(L * 3 * B * p * d, L * B * p * d, explicit_kernels)


def _operands(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype: torch.dtype):
    a, b = node.args[0], node.args[1]
    fact = joint.facts[a] if isinstance(joint.facts[a], Batched) else joint.facts[b]
    return product_operands(emit, a, b, fact, batch, dtype, batched=node.target == aten.bmm.default)


def matmul_sq_norm(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype) -> torch.fx.Node:
    return gram_sq_norm(emit, *_operands(emit, joint, node, batch, dtype), batch)


def matmul_per_sample(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype) -> torch.fx.Node:
    return per_sample_products(emit, *_operands(emit, joint, node, batch, dtype), static_shape(node))


def _matmul_matches(joint: JointGraph, node: torch.fx.Node) -> bool:
    return node.target in (aten.mm.default, aten.bmm.default) and reduces_samples(joint, node)


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default, aten.permute.default)


def _viewed(node: torch.fx.Node) -> torch.fx.Node:
    """The value ``node`` views (through views, transposes and permutes): what its Gram matrices are of."""
    while isinstance(node, torch.fx.Node) and node.target in _VIEWS:
        node = node.args[0]
    return node


def _matmul_cost(joint: JointGraph, node: torch.fx.Node):
    a, b = (shape_exprs(v.meta["val"]) for v in node.args[:2])
    return product_cost(joint, a, b[-1], tuple(_viewed(v) for v in node.args[:2]))


KIND = SiteKind(
    "matmul", _matmul_matches, matmul_per_sample, _matmul_cost, sq_norm=matmul_sq_norm, reweight=reweight_operand
)
