"""Pointwise ops: each output element depends on the input elements at the same (broadcast) position.

Samples stay apart whatever the function; a sum over samples (a loss, a gradient) may only pass through an
op that is linear in it: added (``add``/``sub``/``neg``: linear in all operands), scaled (``mul``/``div``:
linear in one), or copied. Copies and casts keep the per-sample norm (and lift as themselves).
"""

from __future__ import annotations

import sympy
import torch
import torch.fx
from bkcompile.passes.emit import Emitter
from bkcompile.passes.facts import REDUCED, REPLICATED, Batched, Fact, Reduced, same
from bkcompile.passes.ops.table import RuleInput, agree, define, first_operand, is_count, is_zeros, law, law_for

aten = torch.ops.aten

_LINEAR_IN_ALL = {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.neg.default}
_IDENTITY = [aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default]
_CASTS = [aten._to_copy.default, torch.ops.prims.convert_element_type.default]


def broadcast_shape(*shapes: list[sympy.Expr]) -> list[sympy.Expr]:
    """The shape that ``shapes`` broadcast to."""
    out = []
    for k in range(max(len(s) for s in shapes), 0, -1):
        sizes = [s[-k] for s in shapes if len(s) >= k and s[-k] != 1]
        out.append(sizes[0] if sizes else sympy.Integer(1))
    return out


def broadcast(r: RuleInput, out_shape: list[sympy.Expr]) -> tuple[list[Batched], list[int]]:
    """The facts of the tensor operands broadcast to ``out_shape``, and the positions of the reduced ones;
    refused when broadcasting would copy one sample's values to other samples."""
    batched: list[Batched] = []
    reduced: list[int] = []
    for position, arg in enumerate(r.tensor_args()):
        fact = r.fact(arg)
        if isinstance(fact, Batched):
            dim = fact.dim + len(out_shape) - arg.meta["val"].dim()
            if not same(r.shape(arg)[fact.dim], out_shape[dim]):
                raise r.mixing("it broadcasts the sample axis", "do not broadcast over the batch dimension")
            batched.append(fact.at(dim))
        elif isinstance(fact, Reduced):
            reduced.append(position)
    return batched, reduced


def pointwise(r: RuleInput) -> Fact:
    """Elementwise with broadcasting: samples stay apart; a sum over samples may only be scaled or added."""
    if r.node.target is aten.div.Tensor and is_count(r.arg("other"), r.facts):
        return _by_count(r)
    batched, reduced = broadcast(r, r.out_shape())
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
        law = law_for(target)
        operand = r.tensor_args()[reduced[0]]
        linear_in_one = (
            law.lift_linear is not None
            and len(reduced) == 1
            and (law.linear_in is None or law.linear_in(r.node) is operand)
        )
        if target in _LINEAR_IN_ALL or linear_in_one or target in _IDENTITY or target in _CASTS:
            return REDUCED
        raise r.mixing(
            "it is a non-linear function of a sum over the batch (e.g. a normaliser computed from all samples)",
            "make each sample's loss depend on that sample only (a per-sample loss), then sum or mean it",
        )
    return agree(r, batched) if batched else REPLICATED


def _by_count(r: RuleInput) -> Fact:
    """A division by a count over the batch (a loss normaliser, e.g. the non-ignored labels of a smoothed
    cross entropy): in the forward only a sum over samples may be divided (the loss); in the backward the
    loss's gradient carries it, and the loss pass checks that it is the loss's normaliser, which the
    per-sample scale cancels."""
    fact = r.fact(r.arg("self"))
    if isinstance(fact, Reduced) or r.backward:
        return fact
    raise r.mixing(
        "it divides values by a count over the whole batch, so every sample's output depends on the others",
        "divide a per-sample value by that sample's own count, or divide only the summed loss",
    )


def _lift_identity(emit: Emitter, node: torch.fx.Node, value: torch.fx.Node) -> torch.fx.Node:
    return value


def _lift_cast(emit: Emitter, node: torch.fx.Node, value: torch.fx.Node) -> torch.fx.Node:
    return emit.to_dtype(value, node.meta["val"].dtype)


def _lift_scaling(
    emit: Emitter, node: torch.fx.Node, term: torch.fx.Node, value: torch.fx.Node, batch
) -> torch.fx.Node:
    """A scaling of a sum over samples by sample-independent operands scales each sample's part alike."""
    return emit(node.target, *[value if a is term else a for a in node.args])


# copies keep the value, so its norm; a loss passes through them
define(_IDENTITY, rule=pointwise, keeps_norm=first_operand, lift=_lift_identity, loss="pass")
# casts keep the value up to rounding
define(_CASTS, rule=pointwise, keeps_norm=first_operand, lift=_lift_cast, loss="pass")
# neg is linear and keeps the norm up to sign: a loss passes through, a gradient is scaled by -1
define(aten.neg.default, rule=pointwise, lift_linear=_lift_scaling, loss="pass")
# mul is linear in either operand, div in its dividend
define([aten.mul.Tensor, aten.mul.Scalar], rule=pointwise, lift_linear=_lift_scaling, loss="scale")
define(
    [aten.div.Tensor, aten.div.Scalar], rule=pointwise, lift_linear=_lift_scaling, linear_in=first_operand, loss="scale"
)


def _selected(node: torch.fx.Node) -> torch.fx.Node | None:
    """where(cond, a, 0) is linear in a, where(cond, 0, b) in b."""
    _, a, b = node.args
    return a if is_zeros(b) else (b if is_zeros(a) else None)


# a select between a value and zero by a sample-independent condition is a linear mask of the value
define(aten.where.self, rule=pointwise, lift_linear=_lift_scaling, linear_in=_selected)


def _filled_with_zero(node: torch.fx.Node) -> torch.fx.Node | None:
    return node.args[0] if is_zeros(node.args[2]) else None


# filling masked places with zero is a linear mask too
define(aten.masked_fill.Scalar, rule=pointwise, lift_linear=_lift_scaling, linear_in=_filled_with_zero)
# add and sub are linear in all operands
define([aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar], rule=pointwise, loss="add")
# copy(self, src): src's values broadcast into self's shape and dtype, the functional form of an in-place slice
# assignment ``mask[..., :n] = v`` (copy into the slice, then a slice_scatter back). Elementwise in src, self lends
# only its shape: a per-sample src lands in the rows of its own samples, one broadcast over the batch is refused
define(aten.copy.default, rule=pointwise)


@law(aten.native_dropout.default)
def dropout(r: RuleInput) -> tuple:
    """Dropout draws an independent mask per element: the output and the mask keep the input's fact."""
    fact = r.fact(r.arg("input"))
    return (fact, fact)


@law([aten.rand_like.default, aten.randn_like.default, aten.bernoulli.p, aten.bernoulli.default])
def random_like(r: RuleInput) -> Fact:
    """Fresh random values shaped like a per-sample tensor carry no sample data: batched on the same axis."""
    fact = r.fact(r.arg("self"))
    return fact if isinstance(fact, Batched) else REPLICATED


@law([aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default])
def like(r: RuleInput) -> Fact:
    """A constant shaped like its input: rows stay with the samples whose shape they copy."""
    return r.fact(r.arg("self"))


@law([aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default])
def new_constant(r: RuleInput) -> Fact:
    """A constant of a given size that takes only dtype and device from its input: no sample data."""
    return REPLICATED
