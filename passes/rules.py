"""Batch-axis rules: one table keyed by aten overload, one small pure function per op family.

A rule receives a :class:`RuleInput` (the node, the facts of its arguments, their shapes) and
returns the fact of the node's output (a tuple of facts for ops with several outputs). A rule never
mutates the graph. A rule raises :class:`PrivacyError` when the op mixes samples; an op without a
rule is refused by the analysis. Register a rule for a custom op with :func:`register_batch_rule`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sympy
import torch
import torch.fx
from bkcompile.passes.facts import (
    REDUCED,
    REPLICATED,
    Batched,
    Fact,
    Reduced,
    Replicated,
    exact_quotient,
    product,
    same,
    shape_exprs,
)

from bkcompile.errors import (
    LossReductionError,
    NotSupportedYetError,
    SampleMixingError,
    node_error,
)

aten = torch.ops.aten
FactOut = Fact | tuple
Rule = Callable[["RuleInput"], FactOut]
RULES: dict[torch._ops.OpOverload, Rule] = {}


@dataclasses.dataclass
class RuleInput:
    """What a rule may read: the node, the batch size B, and the facts of the node's arguments."""

    node: torch.fx.Node
    batch: sympy.Expr
    facts: dict[torch.fx.Node, FactOut]

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        if index < len(self.node.args):
            return self.node.args[index]
        return self.node.kwargs.get(name, default)

    def fact(self, value: Any) -> FactOut:
        return self.facts[value] if isinstance(value, torch.fx.Node) else REPLICATED

    def shape(self, value: torch.fx.Node) -> list[sympy.Expr]:
        return shape_exprs(value.meta["val"])

    def out_shape(self) -> list[sympy.Expr]:
        return shape_exprs(self.node.meta["val"])

    def tensor_args(self) -> list[torch.fx.Node]:
        flat = torch.fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: n)
        found: list[torch.fx.Node] = []
        torch.fx.node.map_arg(flat, lambda n: found.append(n) if isinstance(n.meta.get("val"), torch.Tensor) else None)
        return found

    def mixing(self, why: str, fix: str) -> SampleMixingError:
        return node_error(SampleMixingError, self.node, why, fix)


def register_batch_rule(ops: torch._ops.OpOverload | Iterable[torch._ops.OpOverload]) -> Callable[[Rule], Rule]:
    """Decorator: make ``rule`` the batch-axis rule of one op overload or a list of them.

    Public: a custom op (``torch.library.custom_op``) gets a rule this way, e.g. an elementwise one::

        bkcompile.register_batch_rule(torch.ops.mylib.scaled_tanh.default)(bkcompile.rules.pointwise)
    """
    op_list = [ops] if isinstance(ops, torch._ops.OpOverload) else list(ops)

    def install(rule: Rule) -> Rule:
        for op in op_list:
            RULES[op] = rule
        return rule

    return install


def reads_batch_sums(rule: Rule) -> Rule:
    """``rule``, marked as proving harmless the sums over the batch (``Reduced`` operands) that it lets
    reach per-sample outputs; without the mark the analysis refuses any such op (default-deny). A copy
    is marked, so marking a shared combinator exempts only the ops registered with the copy."""

    @functools.wraps(rule)
    def exempt(r: RuleInput) -> FactOut:
        return rule(r)

    exempt.reads_batch_sums = True
    return exempt


def _dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _dims(dims: Sequence[int] | int | None, ndim: int) -> list[int]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return sorted(_dim(d, max(ndim, 1)) for d in dims)


def _same_layout(r: RuleInput, a: Batched, b: Batched) -> bool:
    # a batch of one owns every row, however they are grouped
    return r.batch == 1 or (same(a.inner, b.inner) and same(a.outer, b.outer))


def _agree(r: RuleInput, batched: list[Batched]) -> Batched:
    first = batched[0]
    for other in batched[1:]:
        if other.dim != first.dim or not _same_layout(r, other, first):
            raise r.mixing(
                "its operands hold samples on different axes, so the result combines different samples",
                "keep the batch on the same axis of every operand (check transposes and reshapes)",
            )
    return first


# --- pointwise: each output element depends on the elements at the same (broadcast) position ---------

_LINEAR_IN_ALL = {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.neg.default}
_LINEAR_IN_ONE = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}


def pointwise(r: RuleInput) -> Fact:
    """Elementwise with broadcasting: samples stay apart; a sum over samples may only be scaled or added."""
    out_ndim = len(r.out_shape())
    batched: list[Batched] = []
    reduced: list[int] = []
    for position, arg in enumerate(r.tensor_args()):
        fact = r.fact(arg)
        if isinstance(fact, Batched):
            ndim = arg.meta["val"].dim()
            dim = fact.dim + out_ndim - ndim
            if not same(r.shape(arg)[fact.dim], r.out_shape()[dim]):
                raise r.mixing("it broadcasts the sample axis", "do not broadcast over the batch dimension")
            batched.append(fact.at(dim))
        elif isinstance(fact, Reduced):
            reduced.append(position)
    if reduced:
        if batched:
            raise r.mixing(
                "it combines a sum over the batch with per-sample values, so every sample's output depends on "
                "all samples (a mean or normaliser over the batch inside the model, or batch statistics)",
                "compute statistics per sample (e.g. LayerNorm/GroupNorm instead of BatchNorm); a loss "
                "normaliser must not depend on other samples: reduce each sample's loss on its own, then "
                "sum or mean over the batch",
            )
        target = r.node.target
        linear_in_one = (
            target in _LINEAR_IN_ONE and reduced == [0]
            if target in (aten.div.Tensor, aten.div.Scalar)
            else (target in _LINEAR_IN_ONE and len(reduced) == 1)
        )
        if target in _LINEAR_IN_ALL or linear_in_one or target in _COPIES:
            return REDUCED
        raise r.mixing(
            "it is a non-linear function of a sum over the batch (e.g. a normaliser computed from all samples)",
            "make each sample's loss depend on that sample only (a per-sample loss), then sum or mean it",
        )
    return _agree(r, batched) if batched else REPLICATED


_COPIES = {
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
    aten._to_copy.default,
    aten.lift_fresh_copy.default,
    torch.ops.prims.convert_element_type.default,
}
register_batch_rule(_COPIES)(pointwise)


def rule_for(op: object) -> Rule | None:
    """The rule of ``op``: from the table, else ``pointwise`` for any overload tagged pointwise.

    Tags are read when an op is met, so ops registered late (Inductor's ``prims.fma``) are covered.
    """
    rule = RULES.get(op)
    if rule is None and isinstance(op, torch._ops.OpOverload) and torch.Tag.pointwise in op.tags:
        return pointwise  # elementwise by its schema tag: samples stay apart
    return rule


@register_batch_rule([aten.native_dropout.default])
def dropout(r: RuleInput) -> tuple:
    """Dropout draws an independent mask per element: the output and the mask keep the input's fact."""
    fact = r.fact(r.arg(0, "input"))
    return (fact, fact)


@register_batch_rule([aten.rand_like.default, aten.randn_like.default, aten.bernoulli.p, aten.bernoulli.default])
def random_like(r: RuleInput) -> Fact:
    """Fresh random values shaped like a per-sample tensor carry no sample data: batched on the same axis."""
    fact = r.fact(r.arg(0, "self"))
    return fact if isinstance(fact, Batched) else REPLICATED


# --- views: the row-major order of elements is kept ------------------------------------------------------


@register_batch_rule(
    [
        aten.view.default,
        aten._unsafe_view.default,
        aten.reshape.default,
        aten.squeeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.unsqueeze.default,
        aten.flatten.using_ints,
        aten.unflatten.int,
    ]
)
def view(r: RuleInput) -> Fact:
    """A reshape keeps the samples apart when one output dim holds the whole sample factor B of the flat
    index: (B, T, d) -> (B*T, d) (inner T), (T, B, d) -> (T*B, d) (outer T), and back."""
    source = r.arg(0, "self")
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


@register_batch_rule(aten.expand.default)
def expand(r: RuleInput) -> Fact:
    source = r.arg(0, "self")
    fact = r.fact(source)
    if not isinstance(fact, Batched):
        return fact
    dim = fact.dim + len(r.out_shape()) - source.meta["val"].dim()
    if not same(r.out_shape()[dim], r.shape(source)[fact.dim]):
        raise r.mixing("it expands the sample axis", "do not expand the batch dimension")
    return fact.at(dim)


def _moved(r: RuleInput, order: list[int]) -> Fact:
    fact = r.fact(r.arg(0, "self"))
    if not isinstance(fact, Batched):
        return fact
    return fact.at(order.index(fact.dim))


@register_batch_rule(aten.permute.default)
def permute(r: RuleInput) -> Fact:
    ndim = r.arg(0, "self").meta["val"].dim()
    return _moved(r, [_dim(d, ndim) for d in r.arg(1, "dims")])


@register_batch_rule([aten.t.default, aten.transpose.int])
def transpose(r: RuleInput) -> Fact:
    ndim = r.arg(0, "self").meta["val"].dim()
    if ndim < 2:
        return r.fact(r.arg(0, "self"))
    a, b = (0, 1) if r.node.target == aten.t.default else (_dim(r.arg(1, "dim0"), ndim), _dim(r.arg(2, "dim1"), ndim))
    order = list(range(ndim))
    order[a], order[b] = order[b], order[a]
    return _moved(r, order)


def _index_on_batch(r: RuleInput) -> SampleMixingError:
    return r.mixing(
        "it indexes or slices the sample axis, so one sample's values reach other samples' outputs",
        "index only non-batch dimensions inside the model (the batch is dim 0 of every input)",
    )


@register_batch_rule(aten.select.int)
def select(r: RuleInput) -> Fact:
    source = r.arg(0, "self")
    fact = r.fact(source)
    if not isinstance(fact, Batched):
        return fact
    dim = _dim(r.arg(1, "dim"), source.meta["val"].dim())
    if dim == fact.dim:
        raise _index_on_batch(r)
    return fact.at(fact.dim - (dim < fact.dim))


@register_batch_rule(aten.select_backward.default)
def select_backward(r: RuleInput) -> Fact:
    """The gradient of a select puts the rows back at ``index`` of a new dim ``dim``."""
    fact = r.fact(r.arg(0, "grad_output"))
    if not isinstance(fact, Batched):
        return fact
    dim = _dim(r.arg(2, "dim"), len(r.arg(1, "input_sizes")))
    return fact.at(fact.dim + (dim <= fact.dim))


def _scatter(r: RuleInput, inserted: bool) -> Fact:
    """``self`` with ``src`` written into a slice (or at an index: ``inserted`` dim) of ``dim``."""
    base, src = r.fact(r.arg(0, "self")), r.fact(r.arg(1, "src"))
    if isinstance(base, Reduced) or isinstance(src, Reduced):
        if isinstance(base, Batched) or isinstance(src, Batched):
            raise r.mixing("it writes a sum over the batch into per-sample values", "keep batch sums apart")
        return REDUCED
    ndim = len(r.out_shape())
    dim = _dim(r.arg(2, "dim"), ndim)
    facts = [base] if isinstance(base, Batched) else []
    if isinstance(src, Batched):
        facts.append(src.at(src.dim + (inserted and dim <= src.dim)))
    if not facts:
        return REPLICATED
    fact = _agree(r, facts)
    if dim == fact.dim:
        raise _index_on_batch(r)
    return fact


@register_batch_rule(aten.select_scatter.default)
def select_scatter(r: RuleInput) -> Fact:
    return _scatter(r, inserted=True)


@register_batch_rule(aten.slice_scatter.default)
def slice_scatter(r: RuleInput) -> Fact:
    return _scatter(r, inserted=False)


@register_batch_rule(aten.constant_pad_nd.default)
def constant_pad(r: RuleInput) -> Fact:
    """Padding adds constant rows to per-sample dims; padding the sample axis would add fake samples."""
    source = r.arg(0, "self")
    fact = r.fact(source)
    if isinstance(fact, Batched):
        pad = list(r.arg(1, "pad"))
        ndim = source.meta["val"].dim()
        dims = {ndim - 1 - i // 2 for i, amount in enumerate(pad) if amount}
        if fact.dim in dims:
            raise _index_on_batch(r)
    return fact


@register_batch_rule(aten.slice_backward.default)
def slice_backward(r: RuleInput) -> Fact:
    fact = r.fact(r.arg(0, "grad_output"))
    if isinstance(fact, Batched) and _dim(r.arg(2, "dim"), len(r.arg(1, "input_sizes"))) == fact.dim:
        if not same(r.shape(r.arg(0, "grad_output"))[fact.dim], r.out_shape()[fact.dim]):
            raise _index_on_batch(r)
    return fact


@register_batch_rule([aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default])
def like(r: RuleInput) -> Fact:
    """A constant shaped like its input: rows stay with the samples whose shape they copy."""
    return r.fact(r.arg(0, "self"))


@register_batch_rule(aten.slice.Tensor)
def slice_(r: RuleInput) -> Fact:
    source = r.arg(0, "self")
    fact = r.fact(source)
    if isinstance(fact, Batched) and _dim(r.arg(1, "dim", 0), source.meta["val"].dim()) == fact.dim:
        if not same(r.shape(source)[fact.dim], r.out_shape()[fact.dim]):
            raise _index_on_batch(r)
    return fact


@register_batch_rule([aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int])
def split(r: RuleInput) -> tuple:
    source = r.arg(0, "self")
    fact = r.fact(source)
    count = len(r.node.meta["val"])
    if not isinstance(fact, Batched):
        return tuple([fact] * count)
    ndim = source.meta["val"].dim()
    dim = _dim(r.arg(1 if r.node.target == aten.unbind.int else 2, "dim", 0), ndim)
    if dim == fact.dim:
        raise _index_on_batch(r)
    if r.node.target == aten.unbind.int:
        return tuple([fact.at(fact.dim - (dim < fact.dim))] * count)
    return tuple([fact] * count)


def _join(r: RuleInput, stacked: bool) -> Fact:
    tensors = r.arg(0, "tensors")
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
    fact = _agree(r, batched)
    out_ndim = len(r.out_shape())
    dim = _dim(r.arg(1, "dim", 0), out_ndim)
    if not stacked:
        if dim == fact.dim:
            raise _index_on_batch(r)
        return fact
    return fact.at(fact.dim + (dim <= fact.dim))


@register_batch_rule(aten.cat.default)
def cat(r: RuleInput) -> Fact:
    return _join(r, stacked=False)


@register_batch_rule(aten.stack.default)
def stack(r: RuleInput) -> Fact:
    return _join(r, stacked=True)


# --- reductions -------------------------------------------------------------------------------------


def _reduce(r: RuleInput, dims_arg: tuple[int, str] | None, keepdim_arg: tuple[int, str] | None, linear: bool) -> Fact:
    source = r.arg(0, "self")
    fact = r.fact(source)
    ndim = source.meta["val"].dim()
    dims = _dims(r.arg(*dims_arg) if dims_arg else None, ndim)
    keepdim = bool(r.arg(*keepdim_arg, False)) if keepdim_arg else False
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


@register_batch_rule([aten.sum.dim_IntList, aten.mean.dim])
def sum_dims(r: RuleInput) -> Fact:
    """A sum (or mean) over dims: over the sample axis it is a sum over samples (a site or the loss)."""
    return _reduce(r, (1, "dim"), (2, "keepdim"), linear=True)


@register_batch_rule([aten.sum.default, aten.mean.default])
def sum_all(r: RuleInput) -> Fact:
    return _reduce(r, None, None, linear=True)


@register_batch_rule(
    [aten.amax.default, aten.amin.default, aten.logsumexp.default, aten.var.correction, aten.std.correction]
)
def nonlinear_reduce_dims(r: RuleInput) -> Fact:
    return _reduce(
        r,
        (1, "dim"),
        (3 if r.node.target in (aten.var.correction, aten.std.correction) else 2, "keepdim"),
        linear=False,
    )


@register_batch_rule(aten.var_mean.correction)
def var_mean(r: RuleInput) -> tuple:
    """Variance and mean over dims (LayerNorm's statistics): per-sample unless the sample axis is reduced."""
    fact = _reduce(r, (1, "dim"), (3, "keepdim"), linear=False)
    return (fact, fact)


@register_batch_rule([aten.argmax.default, aten.argmin.default, aten.max.dim, aten.min.dim])
def nonlinear_reduce_dim(r: RuleInput) -> FactOut:
    fact = _reduce(r, (1, "dim"), (2, "keepdim"), linear=False)
    return (fact, fact) if r.node.target in (aten.max.dim, aten.min.dim) else fact


@register_batch_rule([aten.max.default, aten.min.default, aten.prod.default])
def nonlinear_reduce_all(r: RuleInput) -> Fact:
    return _reduce(r, None, None, linear=False)


# --- along one dim: softmax and its backward ------------------------------------------------------------


@register_batch_rule(
    [
        aten._softmax.default,
        aten._log_softmax.default,
        aten._softmax_backward_data.default,
        aten._log_softmax_backward_data.default,
        aten.cumsum.default,
    ]
)
def along_dim(r: RuleInput) -> Fact:
    """Softmax normalises along ``dim``: per-sample unless ``dim`` is the sample axis."""
    fact = pointwise(r)
    dim_index = 1 if r.node.target in (aten._softmax.default, aten._log_softmax.default, aten.cumsum.default) else 2
    if isinstance(fact, Batched) and _dim(r.arg(dim_index, "dim"), len(r.out_shape())) == fact.dim:
        raise r.mixing("it normalises along the sample axis", "apply softmax over a per-sample dimension")
    return fact


# --- matrix products -----------------------------------------------------------------------------------


def _matmul(r: RuleInput, a: torch.fx.Node, b: torch.fx.Node, lead: int) -> Fact:
    """a (..., n, K) @ b (..., K, p) with ``lead`` shared leading dims.

    Samples stay apart when they sit on a leading dim, on n of a or on p of b. A contraction over
    the sample axis (K) is a sum over samples: the weight gradient of a linear layer.
    """
    fa, fb = r.fact(a), r.fact(b)
    if isinstance(fa, Reduced) or isinstance(fb, Reduced):
        if isinstance(fa, Batched) or isinstance(fb, Batched):
            raise r.mixing(
                "it multiplies a sum over the batch with per-sample values", "keep batch sums out of the model"
            )
        return REDUCED
    n_dim, k_a, k_b, p_dim = lead, lead + 1, lead, lead + 1
    kinds = set()
    if isinstance(fa, Batched):
        kinds.add("lead" if fa.dim < lead else ("out" if fa.dim == n_dim else "contract"))
    if isinstance(fb, Batched):
        kinds.add("lead" if fb.dim < lead else ("out" if fb.dim == p_dim else "contract"))
    if not kinds:
        return REPLICATED
    if isinstance(fa, Batched) and isinstance(fb, Batched) and not _same_layout(r, fa, fb):
        raise r.mixing("its operands group samples differently", "keep the batch on matching axes")
    if kinds == {"lead"} and (not isinstance(fa, Batched) or not isinstance(fb, Batched) or fa.dim == fb.dim):
        return fa if isinstance(fa, Batched) else fb
    if kinds == {"out"} and (isinstance(fa, Batched) != isinstance(fb, Batched)):
        return fa.at(lead) if isinstance(fa, Batched) else fb.at(lead + 1)
    if kinds == {"contract"}:
        if (not isinstance(fa, Batched) or fa.dim == k_a) and (not isinstance(fb, Batched) or fb.dim == k_b):
            return REDUCED
    raise r.mixing(
        "it multiplies values of different samples with each other (a product across the sample axis)",
        "contract only over per-sample dimensions",
    )


@register_batch_rule(aten.mm.default)
def mm(r: RuleInput) -> Fact:
    return _matmul(r, r.arg(0, "self"), r.arg(1, "mat2"), lead=0)


@register_batch_rule(aten.bmm.default)
def bmm(r: RuleInput) -> Fact:
    return _matmul(r, r.arg(0, "self"), r.arg(1, "mat2"), lead=1)


@register_batch_rule(aten.mv.default)
def mv(r: RuleInput) -> Fact:  # a matrix product with one column
    return _matmul(r, r.arg(0, "self"), r.arg(1, "vec"), lead=0)


@register_batch_rule(aten.addmm.default)
def addmm(r: RuleInput) -> Fact:
    product_fact = _matmul(r, r.arg(1, "mat1"), r.arg(2, "mat2"), lead=0)
    bias = r.fact(r.arg(0, "self"))
    if isinstance(product_fact, Batched) and isinstance(bias, Replicated):
        return product_fact
    if isinstance(product_fact, Replicated):
        return bias if not isinstance(bias, Batched) else pointwise(r)
    if isinstance(product_fact, Reduced) and not isinstance(bias, Batched):
        return REDUCED
    raise r.mixing("it adds per-sample values to a product that mixes them", "keep the bias replicated")


# --- normalisation layers ------------------------------------------------------------------------------


@register_batch_rule(aten.native_layer_norm.default)
def layer_norm(r: RuleInput) -> tuple:
    """LayerNorm normalises over the trailing ``normalized_shape`` dims: per-sample when the batch is before them."""
    source = r.arg(0, "input")
    fact = r.fact(source)
    if isinstance(fact, Batched):
        if fact.dim >= source.meta["val"].dim() - len(r.arg(1, "normalized_shape")):
            raise r.mixing("it normalises over the sample axis", "normalise over feature dimensions only")
    return (fact, fact, fact)


def _batch_norm(r: RuleInput, training: bool, running_stats: bool) -> tuple:
    fact = r.fact(r.arg(0, "input"))
    count = len(r.node.meta["val"])
    if training and isinstance(fact, Batched) and fact.dim == 1:
        # channels hold the samples (InstanceNorm runs batch norm on (1, B*C, ...)): statistics are per sample
        if running_stats:
            raise r.mixing(
                "the running statistics average over every sample of the batch and are not privatized",
                "use track_running_stats=False (the default of InstanceNorm)",
            )
        stats = fact.at(0)
        return (fact, stats, stats) + (REPLICATED,) * (count - 3)
    if training and isinstance(fact, Batched):
        raise r.mixing(
            "batch normalisation in training mode normalises with statistics over the whole batch",
            "replace BatchNorm with GroupNorm or LayerNorm (e.g. opacus-style nn.GroupNorm(groups, C)), "
            "or freeze the statistics with module.eval()",
        )
    return (fact,) + (REPLICATED,) * (count - 1)


@register_batch_rule(
    [
        aten._native_batch_norm_legit_functional.default,
        aten._native_batch_norm_legit.default,
        aten.native_batch_norm.default,
    ]
)
def batch_norm(r: RuleInput) -> tuple:
    return _batch_norm(r, training=bool(r.arg(5, "training")), running_stats=r.arg(3, "running_mean") is not None)


@register_batch_rule(aten._native_batch_norm_legit.no_stats)
def batch_norm_no_stats(r: RuleInput) -> tuple:
    return _batch_norm(r, training=bool(r.arg(3, "training")), running_stats=False)


@register_batch_rule(aten._native_batch_norm_legit_no_training.default)
def batch_norm_eval(r: RuleInput) -> tuple:
    """Batch norm with frozen statistics is an elementwise affine map: per-sample."""
    return _batch_norm(r, training=False, running_stats=False)


# --- losses --------------------------------------------------------------------------------------------

_REDUCTION_NONE, _REDUCTION_MEAN, _REDUCTION_SUM = 0, 1, 2


@register_batch_rule(aten.nll_loss_forward.default)
def nll_loss_forward(r: RuleInput) -> tuple:
    source = r.arg(0, "self")
    fact = r.fact(source)
    target_fact = r.fact(r.arg(1, "target"))
    batched = [f for f in (fact, target_fact) if isinstance(f, Batched)]
    if not batched:
        return (fact, REPLICATED)
    fact = _agree(r, batched)
    if fact.dim != 0 or source.meta["val"].dim() == 1:
        raise r.mixing("the class dimension of the loss input holds samples", "pass (N, C) scores with the batch first")
    reduction = r.arg(3, "reduction")
    if reduction == _REDUCTION_NONE:
        return (fact, REPLICATED)
    if reduction == _REDUCTION_MEAN and not (same(fact.inner, 1) and same(fact.outer, 1)):
        raise node_error(
            LossReductionError,
            r.node,
            "the loss is a mean over all tokens of the whole batch: its normaliser (the count of non-ignored "
            "tokens in the batch) depends on every sample, so a sample's gradient depends on the others",
            "compute a per-sample loss: F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction='none')"
            ".view(B, T), reduce it per sample (sum, or mean over that sample's tokens), then .mean() over the batch",
        )
    return (REDUCED, REDUCED)


@register_batch_rule(aten.nll_loss_backward.default)
@reads_batch_sums  # the normaliser (total_weight) is the loss's own reduction, which the loss pass rescales
def nll_loss_backward(r: RuleInput) -> Fact:
    """The loss gradient of each row depends on that row and the (batch-wide) normaliser only."""
    facts = [r.fact(r.arg(1, "self")), r.fact(r.arg(2, "target"))]
    batched = [f for f in facts if isinstance(f, Batched)]
    return _agree(r, batched) if batched else REPLICATED


@register_batch_rule(aten.mse_loss.default)
def mse_loss(r: RuleInput) -> Fact:
    fact = pointwise(r)
    if r.arg(2, "reduction", _REDUCTION_MEAN) == _REDUCTION_NONE or not isinstance(fact, Batched):
        return fact
    return REDUCED


@register_batch_rule(aten.mse_loss_backward.default)
def mse_loss_backward(r: RuleInput) -> Fact:
    facts = [r.fact(r.arg(1, "self")), r.fact(r.arg(2, "target"))]
    batched = [f for f in facts if isinstance(f, Batched)]
    return _agree(r, batched) if batched else REPLICATED


# --- embeddings and convolutions ------------------------------------------------------------------------


@register_batch_rule(aten.embedding.default)
def embedding(r: RuleInput) -> Fact:
    """A lookup: the output row of each index belongs to the index's sample."""
    fact = r.fact(r.arg(1, "indices"))
    if isinstance(r.fact(r.arg(0, "weight")), Batched):
        raise r.mixing("the embedding table holds samples", "index a parameter table with per-sample indices")
    return fact


@register_batch_rule(aten.embedding_dense_backward.default)
def embedding_backward(r: RuleInput) -> Fact:
    """The table's gradient adds the rows of every index: a sum over samples (an embedding site), or a
    linear map of a sum over samples (indices shared by the batch, e.g. broadcast position ids)."""
    grad, indices = r.fact(r.arg(0, "grad_output")), r.fact(r.arg(1, "indices"))
    if isinstance(grad, Reduced):
        if isinstance(indices, Batched):
            raise r.mixing(
                "it maps a sum over the batch with per-sample indices",
                "index with per-sample indices only values of the same sample",
            )
        return REDUCED
    batched = [f for f in (grad, indices) if isinstance(f, Batched)]
    if not batched:
        return REPLICATED
    if r.arg(4, "scale_grad_by_freq"):
        raise r.mixing(
            "scale_grad_by_freq divides each row's gradient by the index's frequency in the whole batch",
            "use nn.Embedding(..., scale_grad_by_freq=False)",
        )
    return REDUCED


@register_batch_rule(aten.convolution.default)
def convolution(r: RuleInput) -> Fact:
    """A convolution maps each of the N inputs on its own: per-sample on dim 0."""
    fact = r.fact(r.arg(0, "input"))
    if isinstance(r.fact(r.arg(1, "weight")), Batched) or (isinstance(fact, Batched) and fact.dim != 0):
        raise r.mixing("the convolution's channels or weights hold samples", "keep the batch on dim 0 of the input")
    return fact


@register_batch_rule(aten.convolution_backward.default)
def convolution_backward(r: RuleInput) -> tuple:
    """grad_input is per-sample like grad_output; the weight and bias gradients sum over samples (a conv site)."""
    grad_out, x, weight = r.fact(r.arg(0, "grad_output")), r.fact(r.arg(1, "input")), r.fact(r.arg(2, "weight"))
    if isinstance(weight, Batched) or any(isinstance(f, Batched) and f.dim != 0 for f in (grad_out, x)):
        raise r.mixing("the convolution's channels or weights hold samples", "keep the batch on dim 0 of the input")
    batched = [f for f in (grad_out, x) if isinstance(f, Batched)]
    if not batched:
        return (REPLICATED, REPLICATED, REPLICATED)
    return (_agree(r, batched), REDUCED, REDUCED)


# Ops that work on the trailing ``k`` spatial dims, each leading (sample, channel) slice on its own.
_SPATIAL = {
    1: ["avg_pool1d", "max_pool1d"],
    2: [
        "max_pool2d_with_indices",
        "max_pool2d_with_indices_backward",
        "avg_pool2d",
        "avg_pool2d_backward",
        "_adaptive_avg_pool2d",
        "_adaptive_avg_pool2d_backward",
        "adaptive_max_pool2d",
        "adaptive_max_pool2d_backward",
        "upsample_nearest2d",
        "upsample_nearest2d_backward",
        "upsample_bilinear2d",
        "upsample_bilinear2d_backward",
        "reflection_pad2d",
        "reflection_pad2d_backward",
        "replication_pad2d",
        "replication_pad2d_backward",
    ],
    3: [
        "max_pool3d_with_indices",
        "max_pool3d_with_indices_backward",
        "avg_pool3d",
        "avg_pool3d_backward",
        "_adaptive_avg_pool3d",
        "_adaptive_avg_pool3d_backward",
    ],
}


def spatial(k: int) -> Rule:
    """A rule for an op on the trailing ``k`` dims (pooling, upsampling, padding): per-sample when the samples
    are on a leading dim."""

    def rule(r: RuleInput) -> FactOut:
        outputs = r.node.meta["val"]
        single = isinstance(outputs, torch.Tensor)
        batched = [r.fact(a) for a in r.tensor_args() if isinstance(r.fact(a), Batched)]
        fact = _agree(r, batched) if batched else REPLICATED
        if batched and fact.dim >= (outputs if single else outputs[0]).dim() - k:
            raise r.mixing(
                f"it pools or resamples over the sample axis (one of its last {k} dims)",
                "keep the batch on dim 0 (N) of (N, C, *spatial) inputs",
            )
        return fact if single else (fact,) * len(outputs)

    return rule


for _k, _names in _SPATIAL.items():
    register_batch_rule([getattr(aten, name).default for name in _names])(spatial(_k))
register_batch_rule([aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec])(spatial(2))


@register_batch_rule(aten.native_group_norm.default)
def group_norm(r: RuleInput) -> tuple:
    """GroupNorm normalises each sample's channel groups on their own: per-sample on dim 0."""
    fact = r.fact(r.arg(0, "input"))
    if isinstance(fact, Batched) and fact.dim != 0:
        raise r.mixing("its channel or spatial dims hold samples", "keep the batch on dim 0 of the input")
    return (fact, fact, fact)


# --- attention -----------------------------------------------------------------------------------------


def _attention_fact(r: RuleInput, values: list) -> Fact:
    batched = [r.fact(v) for v in values if isinstance(r.fact(v), Batched)]
    if not batched:
        return REPLICATED
    fact = _agree(r, batched)
    if fact.dim != 0:
        raise r.mixing("the attention's heads or positions hold samples", "keep the batch on dim 0 of q, k and v")
    return fact


# F.scaled_dot_product_attention's kernels: the CPU one, and on CUDA flash, memory-efficient and cuDNN. Attention
# mixes positions within a sample only, so output, log-sum-exp and the gradients of q, k and v are per-sample.
# Their other outputs are sample-independent: cumulative sequence lengths and maxima (unused for dense inputs),
# the dropout RNG's seed and offset (one for the whole batch; each sample's mask still depends on no other sample).


@register_batch_rule(aten._scaled_dot_product_flash_attention_for_cpu.default)
def sdpa_cpu(r: RuleInput) -> tuple:
    fact = _attention_fact(r, r.tensor_args())
    return (fact, fact)


@register_batch_rule(
    [aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_cudnn_attention.default]
)
def sdpa_flash_or_cudnn(r: RuleInput) -> tuple:
    """Outputs: attention, log-sum-exp, sequence bookkeeping (4), RNG seed and offset, the debug mask (B, H, T, T)
    when asked for (else empty)."""
    fact = _attention_fact(r, r.tensor_args())
    debug_mask = r.node.meta["val"][8]
    asked = isinstance(debug_mask, torch.Tensor) and debug_mask.dim() == 4
    return (fact, fact) + (REPLICATED,) * 6 + (fact if asked else REPLICATED,)


@register_batch_rule(aten._scaled_dot_product_efficient_attention.default)
def sdpa_efficient(r: RuleInput) -> tuple:
    fact = _attention_fact(r, r.tensor_args())
    return (fact, fact, REPLICATED, REPLICATED)


@register_batch_rule(
    [
        aten._scaled_dot_product_flash_attention_for_cpu_backward.default,
        aten._scaled_dot_product_flash_attention_backward.default,
        aten._scaled_dot_product_cudnn_attention_backward.default,
    ]
)
def sdpa_backward(r: RuleInput) -> tuple:
    fact = _attention_fact(r, r.tensor_args())
    return (fact, fact, fact)


@register_batch_rule(aten._scaled_dot_product_efficient_attention_backward.default)
def sdpa_efficient_backward(r: RuleInput) -> tuple:
    fact = _attention_fact(r, r.tensor_args())
    if not r.arg(10, "grad_input_mask")[3]:  # no bias gradient
        return (fact, fact, fact, REPLICATED)
    if not isinstance(r.fact(r.arg(4, "attn_bias")), Batched):
        raise node_error(
            NotSupportedYetError,
            r.node,
            "the attention bias is shared by the samples and needs a gradient: the fused kernel sums it "
            "over the samples, with no per-sample norm",
            "add the bias to the scores outside scaled_dot_product_attention, or freeze it",
        )
    return (fact, fact, fact, fact)
