"""Views and data movement: reshapes, permutes, slices, selects, scatters, padding, joins and splits.

They keep the row-major order of elements or move whole dims, so a sample's rows stay its own unless the
op slices, pads or broadcasts the sample axis itself. Reshapes, transposes and the gradients of slices
and selects (rows put back in place, zeros elsewhere) keep a gradient's per-sample norm.
"""

from __future__ import annotations

import sympy
import torch
import torch.fx
from bkcompile.passes.emit import Emitter, static_shape
from bkcompile.passes.facts import REDUCED, REPLICATED, Batched, Fact, Reduced, exact_quotient, product, same
from bkcompile.passes.ops.table import (
    RuleInput,
    agree,
    define,
    first_operand,
    index_on_batch,
    is_zeros,
    law,
    norm_dim,
)

from bkcompile.errors import NotSupportedYetError, node_error

aten = torch.ops.aten

_RESHAPES = [
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
]


def _lift_reshape(emit: Emitter, node: torch.fx.Node, value: torch.fx.Node) -> torch.fx.Node:
    return emit(aten.reshape.default, value, [-1, *static_shape(node)])


def _lift_permute(order: list[int]):
    def lift(emit: Emitter, node: torch.fx.Node, value: torch.fx.Node) -> torch.fx.Node:
        return emit(aten.permute.default, value, [0] + [d + 1 for d in order])

    return lift


# a reshape keeps the row-major order of elements: the norm is kept, a scalar loss passes through
@law(_RESHAPES + [aten.flatten.using_ints, aten.unflatten.int])
def view(r: RuleInput) -> Fact:
    """A reshape keeps the samples apart when one output dim holds the whole sample factor B of the flat
    index: (B, T, d) -> (B*T, d) (inner T), (T, B, d) -> (T*B, d) (outer T), and back."""
    source = r.arg("self")
    fact = r.fact(source)
    if not isinstance(fact, Batched):
        return fact
    before = product(r.shape(source)[: fact.dim]) * fact.outer  # flat positions in front of the sample factor
    prefix = sympy.Integer(1)
    for dim, size in enumerate(r.out_shape()):
        outer = exact_quotient(before, prefix)
        if outer is not None:
            inner = exact_quotient(size, outer * r.batch)
            if inner is not None and (size != 1 or r.batch == 1):
                return Batched(dim, inner, outer)
        prefix = prefix * size
    if r.batch == 1 and r.out_shape():
        return Batched(0, r.out_shape()[0])  # a batch of one owns every element, whatever the layout
    raise node_error(
        NotSupportedYetError,
        r.node,
        "this reshape splits the sample axis or moves it behind another dimension",
        "reshape so that the batch stays the leading factor of its dimension, e.g. (B, T, d) -> (B*T, d)",
    )


define(_RESHAPES, keeps_norm=first_operand, lift=_lift_reshape, loss="pass")


def _lift_expand(emit: Emitter, node: torch.fx.Node, term: torch.fx.Node, value: torch.fx.Node, batch):
    """A broadcast of a sum over samples: each sample's part broadcast alike (behind its leading dim)."""
    out = static_shape(node)
    source = static_shape(term)
    aligned = emit(aten.reshape.default, value, [-1] + [1] * (len(out) - len(source)) + source)
    return emit(aten.expand.default, aligned, [emit.size(value, 0), *out])


# a broadcast copies values: a linear map of a sum over samples
@law(aten.expand.default, lift_linear=_lift_expand)
def expand(r: RuleInput) -> Fact:
    source = r.arg("self")
    fact = r.fact(source)
    if not isinstance(fact, Batched):
        return fact
    dim = fact.dim + len(r.out_shape()) - source.meta["val"].dim()
    if not same(r.out_shape()[dim], r.shape(source)[fact.dim]):
        raise r.mixing("it expands the sample axis", "do not expand the batch dimension")
    return fact.at(dim)


def _moved(r: RuleInput, order: list[int]) -> Fact:
    fact = r.fact(r.arg("self"))
    if not isinstance(fact, Batched):
        return fact
    return fact.at(order.index(fact.dim))


def _permute_order(node: torch.fx.Node) -> list[int]:
    ndim = node.meta["val"].dim()
    return [d % ndim for d in node.args[1]]


def _transpose_order(node: torch.fx.Node) -> list[int]:
    ndim = node.meta["val"].dim()
    order = list(range(ndim))
    if ndim < 2:
        return order
    if node.target == aten.t.default:
        return order[::-1]
    a, b = (d % ndim for d in node.args[1:3])
    order[a], order[b] = order[b], order[a]
    return order


# a permutation of dims keeps every element, so the norm
@law(aten.permute.default, keeps_norm=first_operand)
def permute(r: RuleInput) -> Fact:
    return _moved(r, _permute_order(r.node))


@law([aten.t.default, aten.transpose.int], keeps_norm=first_operand)
def transpose(r: RuleInput) -> Fact:
    return _moved(r, _transpose_order(r.node))


def _lift_permuted(order_of):
    def lift(emit: Emitter, node: torch.fx.Node, value: torch.fx.Node) -> torch.fx.Node:
        return _lift_permute(order_of(node))(emit, node, value)

    return lift


define(aten.permute.default, lift=_lift_permuted(_permute_order))
define([aten.t.default, aten.transpose.int], lift=_lift_permuted(_transpose_order))


@law(aten.select.int)
def select(r: RuleInput) -> Fact:
    source = r.arg("self")
    fact = r.fact(source)
    if not isinstance(fact, Batched):
        return fact
    dim = norm_dim(r.arg("dim"), source.meta["val"].dim())
    if dim == fact.dim:
        raise index_on_batch(r)
    return fact.at(fact.dim - (dim < fact.dim))


def _lift_into_sizes(emit: Emitter, node: torch.fx.Node, value: torch.fx.Node) -> torch.fx.Node:
    """slice_backward / select_backward on per-sample values: one more leading dim in the sizes."""
    _, sizes, dim, *rest = node.args
    return emit(node.target, value, [emit.size(value, 0), *sizes], dim % len(sizes) + 1, *rest)


# the gradient of a select puts the rows back at ``index`` of a new dim: zeros elsewhere keep the norm
@law(aten.select_backward.default, keeps_norm=first_operand, lift=_lift_into_sizes)
def select_backward(r: RuleInput) -> Fact:
    fact = r.fact(r.arg("grad_output"))
    if not isinstance(fact, Batched):
        return fact
    dim = norm_dim(r.arg("dim"), len(r.arg("input_sizes")))
    return fact.at(fact.dim + (dim <= fact.dim))


@law(aten.slice_backward.default, keeps_norm=first_operand, lift=_lift_into_sizes)
def slice_backward(r: RuleInput) -> Fact:
    fact = r.fact(r.arg("grad_output"))
    if isinstance(fact, Batched) and norm_dim(r.arg("dim"), len(r.arg("input_sizes"))) == fact.dim:
        if not same(r.shape(r.arg("grad_output"))[fact.dim], r.out_shape()[fact.dim]):
            raise index_on_batch(r)
    return fact


def _scatter(r: RuleInput, inserted: bool) -> Fact:
    """``self`` with ``src`` written into a slice (or at an index: ``inserted`` dim) of ``dim``; on the sample
    axis only a slice that is the whole axis keeps the samples in their rows."""
    base, src = r.fact(r.arg("self")), r.fact(r.arg("src"))
    if isinstance(base, Reduced) or isinstance(src, Reduced):
        if isinstance(base, Batched) or isinstance(src, Batched):
            raise r.mixing("it writes a sum over the batch into per-sample values", "keep batch sums apart")
        return REDUCED
    ndim = len(r.out_shape())
    dim = norm_dim(r.arg("dim"), ndim)
    facts = [base] if isinstance(base, Batched) else []
    if isinstance(src, Batched):
        facts.append(src.at(src.dim + (inserted and dim <= src.dim)))
    if not facts:
        return REPLICATED
    fact = agree(r, facts)
    if dim == fact.dim and (inserted or not _covers(r, r.arg("src"), dim)):
        raise index_on_batch(r)
    return fact


def _covers(r: RuleInput, src: torch.fx.Node, dim: int) -> bool:
    """``src`` is as long as the result along ``dim``: the slice it is written into is the whole dim, in order
    (a slice of n rows with n elements has start 0 and step 1), so row i stays row i. This is the gradient of
    ``x[:, 0]`` with a symbolic batch, whose ``x[:]`` on the batch dim Inductor's decompositions turn into a
    ``slice_scatter`` over the batch dim."""
    return same(r.shape(src)[dim], r.out_shape()[dim])


def _scattered_source(node: torch.fx.Node) -> torch.fx.Node | None:
    """A slice or select gradient decomposed: the source keeps its norm when written into zeros."""
    return node.args[1] if is_zeros(node.args[0]) else None


def _lift_scatter(emit: Emitter, node: torch.fx.Node, value: torch.fx.Node) -> torch.fx.Node:
    _, _, dim, *rest = node.args
    out = node.meta["val"]
    zeros = emit(
        aten.zeros.default, [emit.size(value, 0), *out.shape], dtype=value.meta["val"].dtype, device=out.device
    )
    return emit(node.target, zeros, value, dim % out.dim() + 1, *rest)


@law(aten.select_scatter.default, keeps_norm=_scattered_source, lift=_lift_scatter)
def select_scatter(r: RuleInput) -> Fact:
    return _scatter(r, inserted=True)


@law(aten.slice_scatter.default, keeps_norm=_scattered_source, lift=_lift_scatter)
def slice_scatter(r: RuleInput) -> Fact:
    return _scatter(r, inserted=False)


@law(aten.constant_pad_nd.default)
def constant_pad(r: RuleInput) -> Fact:
    """Padding adds constant rows to per-sample dims; padding the sample axis would add fake samples."""
    source = r.arg("self")
    fact = r.fact(source)
    if isinstance(fact, Batched):
        pad = list(r.arg("pad"))
        ndim = source.meta["val"].dim()
        dims = {ndim - 1 - i // 2 for i, amount in enumerate(pad) if amount}
        if fact.dim in dims:
            raise index_on_batch(r)
    return fact


@law(aten.slice.Tensor)
def slice_(r: RuleInput) -> Fact:
    source = r.arg("self")
    fact = r.fact(source)
    if isinstance(fact, Batched) and norm_dim(r.arg("dim", 0), source.meta["val"].dim()) == fact.dim:
        if not same(r.shape(source)[fact.dim], r.out_shape()[fact.dim]):
            raise index_on_batch(r)
    return fact


@law([aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int])
def split(r: RuleInput) -> tuple:
    source = r.arg("self")
    fact = r.fact(source)
    count = len(r.node.meta["val"])
    if not isinstance(fact, Batched):
        return tuple([fact] * count)
    dim = norm_dim(r.arg("dim", 0), source.meta["val"].dim())
    if dim == fact.dim:
        raise index_on_batch(r)
    if r.node.target == aten.unbind.int:
        return tuple([fact.at(fact.dim - (dim < fact.dim))] * count)
    return tuple([fact] * count)


def _join(r: RuleInput, stacked: bool) -> Fact:
    tensors = r.arg("tensors")
    facts = [r.fact(t) for t in tensors]
    if any(isinstance(f, Reduced) for f in facts):
        if all(isinstance(f, Reduced) for f in facts):
            return REDUCED
        raise r.mixing(
            "it joins a sum over the batch with other values", "keep per-sample values apart from batch sums"
        )
    batched = [f for f in facts if isinstance(f, Batched)]
    if not batched:
        return REPLICATED
    fact = agree(r, batched)
    dim = norm_dim(r.arg("dim", 0), len(r.out_shape()))
    if not stacked:
        if dim == fact.dim:
            return _blocks(r, fact, len(batched) == len(facts))
        return fact
    return fact.at(fact.dim + (dim <= fact.dim))


def _blocks(r: RuleInput, fact: Batched, all_batched: bool) -> Batched:
    """A cat along the sample axis of n operands that all hold the whole batch alike, each (outer, B, inner) on
    that dim: the result is (n * outer, B, inner), sample i's rows those of sample i in every block. This is
    ``stack`` over a new leading dim, flattened: the gradient of ``unbind`` (an RNN's time steps) as Inductor
    decomposes it, ``cat([g_0, ..., g_{T-1}])`` of (B, d) blocks viewed as (T, B, d)."""
    if r.batch == 1:  # a batch of one owns every row
        return Batched(fact.dim, r.out_shape()[fact.dim])
    if not all_batched:
        raise index_on_batch(r)
    return Batched(fact.dim, fact.inner, fact.outer * len(r.arg("tensors")))


@law(aten.cat.default)
def cat(r: RuleInput) -> Fact:
    return _join(r, stacked=False)


@law(aten.stack.default)
def stack(r: RuleInput) -> Fact:
    return _join(r, stacked=True)


# a flip reverses the order along per-sample dims (a bidirectional RNN's time axis); along the sample axis it
# would hand sample i's rows to sample B - 1 - i
@law([aten.flip.default, torch.ops.prims.rev.default])
def flip(r: RuleInput) -> Fact:
    source = r.arg("self" if r.node.target is aten.flip.default else "a")
    fact = r.fact(source)
    if not isinstance(fact, Batched):
        return fact
    ndim = source.meta["val"].dim()
    if fact.dim not in {norm_dim(d, ndim) for d in r.arg("dims")}:
        return fact
    if r.batch == 1:  # a batch of one owns every row, in any order
        return Batched(fact.dim, r.out_shape()[fact.dim])
    raise index_on_batch(r)
