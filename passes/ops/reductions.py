"""Reductions and ops along one dim (softmax, cumulative sums, norms, GLU, sorting) or on the last two (triu,
tril).

Over a per-sample dim they keep samples apart. Over the sample axis a sum or mean is a sum over samples
(a parameter-gradient site, or the loss); any other reduction over it (max, variance, a norm) mixes samples.
A sum over per-sample dims of a sum over samples is a linear map of it, applied alike to each sample's part.
"""

from __future__ import annotations

import torch
import torch.fx
from bkcompile.passes.emit import Emitter
from bkcompile.passes.facts import REDUCED, REPLICATED, Batched, Fact, Reduced
from bkcompile.passes.ops.pointwise import pointwise
from bkcompile.passes.ops.table import FactOut, RuleInput, agree, batched_facts, law, norm_dim, norm_dims

aten = torch.ops.aten


def _reduce(r: RuleInput, dims_name: str | None, keepdim_name: str | None, linear: bool) -> Fact:
    source = r.arg("self")
    fact = r.fact(source)
    ndim = source.meta["val"].dim()
    dims = norm_dims(r.arg(dims_name) if dims_name else None, ndim)
    keepdim = bool(r.arg(keepdim_name, False)) if keepdim_name else False
    if isinstance(fact, Reduced):
        if linear:
            return REDUCED
        raise r.mixing("it is a non-linear function of a sum over the batch", "reduce each sample on its own")
    if not isinstance(fact, Batched):
        return fact
    if fact.dim in dims:
        if linear:
            return REDUCED
        raise r.mixing(
            "it reduces over the sample axis non-linearly (a max, a variance or batch statistics across samples)",
            "reduce over per-sample dimensions only; use GroupNorm/LayerNorm instead of BatchNorm",
        )
    if keepdim:
        return fact
    return fact.at(fact.dim - sum(d < fact.dim for d in dims))


def _lift_sum(emit: Emitter, node: torch.fx.Node, term: torch.fx.Node, value: torch.fx.Node, batch) -> torch.fx.Node:
    """A sum over dims of a sum over samples: the same sum of each sample's part (one leading dim more)."""
    ndim = node.args[0].meta["val"].dim()
    dims = [d % ndim + 1 for d in node.args[1]]
    return emit(aten.sum.dim_IntList, value, dims, *node.args[2:])


# a sum is linear: over the sample axis it is a sum over samples, over other dims a linear map
@law(aten.sum.dim_IntList, lift_linear=_lift_sum, loss="sum")
def sum_dims(r: RuleInput) -> Fact:
    """A sum (or mean) over dims: over the sample axis it is a sum over samples (a site or the loss)."""
    return _reduce(r, "dim", "keepdim", linear=True)


law(aten.mean.dim, loss="mean")(sum_dims)


@law(aten.sum.default, loss="sum")
def sum_all(r: RuleInput) -> Fact:
    return _reduce(r, None, None, linear=True)


law(aten.mean.default, loss="mean")(sum_all)


# non-linear reductions: per-sample unless over the sample axis
@law(
    [
        aten.amax.default,
        aten.amin.default,
        aten.logsumexp.default,
        aten.var.correction,
        aten.std.correction,
        aten.linalg_vector_norm.default,
    ]
)
def nonlinear_reduce_dims(r: RuleInput) -> Fact:
    return _reduce(r, "dim", "keepdim", linear=False)


@law(aten.var_mean.correction)
def var_mean(r: RuleInput) -> tuple:
    """Variance and mean over dims (LayerNorm's statistics): per-sample unless the sample axis is reduced."""
    fact = _reduce(r, "dim", "keepdim", linear=False)
    return (fact, fact)


@law([aten.argmax.default, aten.argmin.default, aten.max.dim, aten.min.dim])
def nonlinear_reduce_dim(r: RuleInput) -> FactOut:
    fact = _reduce(r, "dim", "keepdim", linear=False)
    return (fact, fact) if r.node.target in (aten.max.dim, aten.min.dim) else fact


@law([aten.max.default, aten.min.default, aten.prod.default])
def nonlinear_reduce_all(r: RuleInput) -> Fact:
    return _reduce(r, None, None, linear=False)


_ASSERTS = {aten._assert_async.default, aten._assert_async.msg}


def _only_asserted(node: torch.fx.Node) -> bool:
    """Every use of ``node`` is a runtime assertion, directly or through ``logical_not`` (Inductor spells
    ``all(x)`` as ``not any(not x)``)."""
    return bool(node.users) and all(
        user.target in _ASSERTS or (user.target is aten.logical_not.default and _only_asserted(user))
        for user in node.users
    )


# all/any: non-linear reductions, except as a runtime check of the inputs over the whole batch
@law([aten.all.default, aten.any.default, aten.all.dim, aten.any.dim, aten.all.dims, aten.any.dims])
def all_any(r: RuleInput) -> Fact:
    """Over the sample axis ``all``/``any`` mixes samples, unless assertions alone read it: a check of the
    inputs (F.one_hot's ``all(ids >= 0)`` and ``all(ids < num_classes)``) gives no value to any computation, and
    a failed check stops the step. Such a check is sample-independent for the rest of the graph, which never
    reads it."""
    whole = r.node.target in (aten.all.default, aten.any.default)
    fact = r.fact(r.arg("self"))
    if isinstance(fact, Batched) and _only_asserted(r.node):
        dims = norm_dims(None if whole else r.arg("dim"), r.arg("self").meta["val"].dim())
        if fact.dim in dims:
            return REPLICATED
    return _reduce(r, None if whole else "dim", None if whole else "keepdim", linear=False)


# softmax (and its masked-row-safe form), cumulative sums and their backwards work along one dim
@law(
    [
        aten._softmax.default,
        aten._safe_softmax.default,
        aten._log_softmax.default,
        aten._softmax_backward_data.default,
        aten._log_softmax_backward_data.default,
        aten.cumsum.default,
    ]
)
def along_dim(r: RuleInput) -> Fact:
    """Softmax normalises along ``dim``: per-sample unless ``dim`` is the sample axis."""
    fact = pointwise(r)
    if isinstance(fact, Batched) and norm_dim(r.arg("dim"), len(r.out_shape())) == fact.dim:
        raise r.mixing("it normalises along the sample axis", "apply softmax over a per-sample dimension")
    return fact


def _along(r: RuleInput, what: str) -> Fact:
    """The common fact of the operands of an op along ``dim`` (which may change that dim's size): per sample
    unless ``dim`` is the sample axis; a non-linear function of a sum over samples is refused."""
    if any(isinstance(r.fact(a), Reduced) for a in r.tensor_args()):
        raise r.mixing("it is a non-linear function of a sum over the batch", "apply it to per-sample values")
    batched = batched_facts(r, r.tensor_args())
    if not batched:
        return REPLICATED
    fact = agree(r, batched)
    if norm_dim(r.arg("dim"), r.arg("self").meta["val"].dim()) == fact.dim:
        raise r.mixing(f"it {what} along the sample axis", "apply it along a per-sample dimension")
    return fact


# GLU multiplies the two halves of ``dim``; its backward maps the halves back
@law([aten.glu.default, aten.glu_backward.default])
def glu(r: RuleInput) -> Fact:
    return _along(r, "splits values into halves")


# sorting permutes the values along ``dim`` (values and the indices of the permutation)
@law([aten.sort.default, aten.sort.stable])
def sort(r: RuleInput) -> tuple:
    fact = _along(r, "sorts values")
    return (fact, fact)


def _lift_triangle(emit: Emitter, node: torch.fx.Node, term: torch.fx.Node, value: torch.fx.Node, batch):
    """The same triangle of each sample's part (one leading dim more; the op works on the last two dims)."""
    return emit(node.target, value, *node.args[1:])


# triu/tril keep one side of a diagonal of the last two dims: a linear mask, fixed by position
@law([aten.triu.default, aten.tril.default], lift_linear=_lift_triangle)
def triangle(r: RuleInput) -> Fact:
    """Which elements stay depends on their position in the last two dims: per sample when the samples are on
    a leading dim (on one of the last two, sample i's rows would be masked by i, its place in the batch)."""
    fact = r.fact(r.arg("self"))
    if isinstance(fact, Batched) and fact.dim >= len(r.out_shape()) - 2:
        raise r.mixing(
            "it masks a triangle of its last two dims, one of which holds the samples, so what a sample keeps "
            "depends on its place in the batch",
            "keep the batch on a leading dim, the triangle on the last two",
        )
    return fact
