"""What every site kind shares: the :class:`SiteKind` record, the cost vocabulary, and helpers to view a
per-sample operand by sample and to weight its rows.

A site kind says, for a node that reduces per-sample values into a parameter gradient, how to get for
sample i the part G_i of the reduction:

- ``matches``    whether a node is a site of this kind;
- ``sq_norm``    ||G_i||^2 without forming G_i (ghost norm; for sums, the direct per-sample sum), or None;
- ``per_sample`` the explicit per-sample values, shape (B, *shape of the site's value);
- ``reweight``   the site re-emitted with its per-sample operand scaled by w_i: sum_i w_i G_i
                 (book-keeping: one reduction, no second backward), or None when only explicit works;
- ``cost``       the sizes of the cost symbols at the site and each strategy's :class:`Cost`;
- ``keep``       the ops the analysis must see whole (the backend does not decompose them before the pass).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable

import sympy
import torch
import torch.fx
from bkcompile.passes.emit import Emitter
from bkcompile.passes.facts import Batched, Reduced, exact_quotient, product
from bkcompile.passes.joint import JointGraph
from torch.fx.experimental.symbolic_shapes import optimization_hint

from bkcompile.errors import NotSupportedYetError, node_error

aten = torch.ops.aten
Size = int | torch.fx.Node

# The cost symbols: B the batch size, T the rows each sample has at the site (tokens, output positions),
# p and d the two dims of the gradient (out and in features), V an embedding's table size, G groups.
B, T, p, d, V, G = sympy.symbols("B T p d V G", positive=True, integer=True)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel a strategy runs, for the time model: at a calibrated rate (``bkcompile.compiler.calibration``)
    "mm" (one large product), "bmm" (a small product per sample) or "pass" (elementwise or a reduction: the
    bandwidth alone), its FLOPs and the values it reads and writes; ``count`` -1: a kernel of the ordinary
    backward that the strategy runs in its place (the product the per-sample products replace). Small products
    give the ``shape`` (rows, inner, columns) of each: their rate depends on it (``Rates.small_rate``). A Gram
    matrix of one site operand names it (``gram_of``): sites reading one value (the query, key and value
    projections of one input) share its Gram matrix, which the graph's common-subexpression elimination leaves
    once."""

    rate: str
    flops: sympy.Expr
    values: sympy.Expr
    count: int = 1
    shape: tuple[sympy.Expr, sympy.Expr, sympy.Expr] | None = None
    gram_of: torch.fx.Node | None = None


@dataclasses.dataclass(frozen=True)
class Cost:
    time: sympy.Expr  # FLOPs
    memory: sympy.Expr  # values held (times the norm dtype's size: bytes)
    kernels: tuple[Kernel, ...] = ()  # what the FLOPs run as, for the predicted seconds


def passes(*values: sympy.Expr) -> tuple[Kernel, ...]:
    """Elementwise passes or reductions reading and writing ``values`` each."""
    return tuple(Kernel("pass", sympy.Integer(0), v) for v in values)


def direct_cost() -> Cost:
    """A per-sample sum over T rows of width p (a bias, a norm layer's affine weight): the sum, in place of the
    ordinary one over all B T rows, its norms and its weighted sum; the same for either strategy."""
    kernels = (
        Kernel("pass", B * T * p, B * T * p + B * p),
        Kernel("pass", B * T * p, B * T * p + p, count=-1),
        *passes(B * p, B * p + p),
    )
    return Cost(B * T * p + 2 * B * p, B * p, kernels)


Sizes = dict[sympy.Symbol, sympy.Expr]  # what the symbols stand for at one site
CostFn = Callable[[JointGraph, torch.fx.Node], tuple[Sizes, Cost, Cost]]  # (sizes, ghost, explicit)
PerSample = Callable[[Emitter, JointGraph, torch.fx.Node, Size, torch.dtype], torch.fx.Node]
Reweight = Callable[[Emitter, JointGraph, torch.fx.Node, torch.fx.Node, Size], torch.fx.Node]


def _always(node: torch.fx.Node) -> bool:
    return True


@dataclasses.dataclass(frozen=True, eq=False)
class SiteKind:
    name: str  # what the report calls it
    matches: Callable[[JointGraph, torch.fx.Node], bool]
    per_sample: PerSample
    cost: CostFn
    sq_norm: PerSample | None = None
    reweight: Reweight | None = None
    has_ghost: Callable[[torch.fx.Node], bool] = _always  # whether sq_norm and reweight apply to a node
    keep: tuple[torch._ops.OpOverload, ...] = ()

    def ghost_ok(self, node: torch.fx.Node) -> bool:
        return self.sq_norm is not None and self.reweight is not None and self.has_ghost(node)


def rows(total: sympy.Expr, batch: sympy.Expr, *others: sympy.Expr) -> sympy.Expr:
    """The rows T of one sample: ``total / (batch * others)``, 1 when it does not divide."""
    return exact_quotient(total, batch * product(list(others))) or sympy.Integer(1)


# --- views of per-sample operands ------------------------------------------------------------------------


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
    # the rows per sample by their size, not -1: inferring -1 divides by the other sizes, a guard that they are
    # not 0, which an unbacked batch (mark_batch_dynamic) cannot answer
    return emit(aten.reshape.default, moved, sizes[:dim] + [batch, emit.mul(outer, inner)] + sizes[dim + 1 :])


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


def reweight_operand(emit: Emitter, joint: JointGraph, node: torch.fx.Node, weights, batch) -> torch.fx.Node:
    """Re-emit ``node`` with one per-sample floating operand (of the first two) scaled by the row weights: the
    smaller one (of ``mm(t(g), a)``, the narrower of g and a), so that the scaling reads and writes the least."""
    args = list(node.args)
    scalable = [
        i
        for i, a in enumerate(args[:2])
        if isinstance(joint.facts.get(a), Batched) and a.meta["val"].dtype.is_floating_point
    ]
    # on a tie the second: of mm(t(g), a), the activation, which layers reading one input share (the graph's
    # common-subexpression elimination then leaves one weighted copy for them)
    position = min(reversed(scalable), key=lambda i: optimization_hint(args[i].meta["val"].numel(), fallback=1))
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


def on_dim0(joint: JointGraph, value: torch.fx.Node) -> bool:
    fact = joint.facts.get(value)
    return isinstance(fact, Batched) and fact.dim == 0 and fact.outer == 1
