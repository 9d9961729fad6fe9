"""Loss reduction: the factor s with which sample i's gradient of its own loss is s * (its share of the
graph's gradient).

With ``loss = mean_i l_i`` the graph's gradient carries 1/B, so s = B; with ``sum_i l_i``, s = 1. A
loss returned by the compiled function is recognised from the op that reduces it over the batch; a
loss computed outside uses the ``loss_reduction`` option.
"""

from __future__ import annotations

import dataclasses
import enum
import operator

import torch
import torch.fx
from bkcompile.passes.facts import Batched, Reduced
from bkcompile.passes.joint import JointGraph

from bkcompile.errors import LossReductionError, node_error, user_location
from bkcompile.options import BKOptions

aten = torch.ops.aten


class ScaleKind(enum.Enum):
    SUM = "sum"  # s = 1
    MEAN = "mean"  # s = B
    WEIGHT = "weight"  # s = the loss's total weight, a graph value (a weighted or ignore_index mean)


@dataclasses.dataclass(frozen=True)
class LossScale:
    """What the ``loss_scale`` pass produces: the per-sample scale s and how it was found."""

    kind: ScaleKind
    source: str  # how the pass found it, for the report: the option, or the loss's reducing op and line
    node: torch.fx.Node | None = None  # the total weight, for ScaleKind.WEIGHT
    from_option: bool = False  # no loss in the graph: the scale is the loss_reduction option's

    @property
    def reduction(self) -> str:
        return "sum" if self.kind is ScaleKind.SUM else "mean"

    def describe(self) -> str:
        s = {ScaleKind.SUM: "1", ScaleKind.MEAN: "B", ScaleKind.WEIGHT: "the loss's total weight"}[self.kind]
        return f"s = {s}, from {self.source}"


def _found(node: torch.fx.Node, what: str) -> str:
    return f"{what} at {user_location(node)}"


_SUMS = {aten.sum.default, aten.sum.dim_IntList}
_MEANS = {aten.mean.default, aten.mean.dim}
_PASS_THROUGH = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.clone.default,
    aten.alias.default,
    aten._to_copy.default,
    aten.neg.default,
    torch.ops.prims.convert_element_type.default,
    aten.squeeze.dims,
}
_SCALES = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
_ADDS = {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar}


def _unknown(node: torch.fx.Node) -> LossReductionError:
    return node_error(
        LossReductionError,
        node,
        "the pass cannot tell how this loss reduces over the batch",
        "return loss = per_sample_loss.mean() or .sum() (or F.cross_entropy / F.mse_loss with "
        "reduction='mean' or 'sum'), or return the model's outputs and compute the loss outside",
    )


def _scale_of(joint: JointGraph, node: torch.fx.Node) -> LossScale | None:
    fact = joint.facts.get(node)
    if not isinstance(fact, Reduced):
        return None  # a term that does not depend on the batch: it adds nothing per sample
    target = node.target
    if target is operator.getitem and node.args[0].target == aten.nll_loss_forward.default:
        loss = node.args[0]
        reduction = loss.args[3] if len(loss.args) > 3 else loss.kwargs.get("reduction", 1)
        if reduction == 2:
            return LossScale(ScaleKind.SUM, _found(loss, "cross-entropy/nll loss, reduction='sum'"))
        weight = next((u for u in loss.users if u.target is operator.getitem and u.args[1] == 1), None)
        what = _found(loss, "cross-entropy/nll loss, reduction='mean' (divided by its total weight)")
        return LossScale(ScaleKind.WEIGHT, what, weight or loss)
    source = node.args[0] if node.args else None
    if target in _SUMS | _MEANS | {aten.mse_loss.default}:
        if not isinstance(joint.facts.get(source), Batched):
            return _scale_of(joint, source)
        mean = target in _MEANS or (target == aten.mse_loss.default and (node.args[2:3] or [1])[0] == 1)
        return LossScale(ScaleKind.MEAN if mean else ScaleKind.SUM, _found(node, f"{target} over the batch"))
    if target in _PASS_THROUGH:
        return _scale_of(joint, source)
    if target in _SCALES:
        return _scale_of(joint, source if isinstance(joint.facts.get(source), Reduced) else node.args[1])
    if target in _ADDS:
        scales = {s for s in (_scale_of(joint, a) for a in node.args if isinstance(a, torch.fx.Node)) if s is not None}
        if len({(s.kind, s.node) for s in scales}) > 1:
            raise node_error(
                LossReductionError,
                node,
                "it adds losses that reduce over the batch differently (a mean and a sum, or two means "
                "with different normalisers), so no per-sample loss is defined",
                "reduce every term the same way (all .mean() or all .sum() over the batch)",
            )
        return next(iter(scales), None)
    raise _unknown(node)


def find_loss_scale(joint: JointGraph, options: BKOptions) -> LossScale:
    """The per-sample loss scale s (pass 3 of the pipeline)."""
    losses = [
        o for o in joint.forward_outputs if isinstance(o, torch.fx.Node) and isinstance(joint.facts.get(o), Reduced)
    ]
    for loss in losses:
        if loss.meta["val"].dim() != 0:
            raise node_error(
                LossReductionError,
                loss,
                "the compiled function returns a sum over the batch that is not a scalar loss",
                "return per-sample outputs (batch on dim 0) or a scalar loss",
            )
    if len(losses) > 1:
        raise node_error(
            LossReductionError,
            losses[1],
            "the compiled function returns several losses",
            "return one scalar loss (add the terms inside the model)",
        )
    if not losses:
        kind = options.loss_reduction
        given = "" if options.loss_reduction_given else " (the default)"
        return LossScale(
            ScaleKind(kind),
            f"option loss_reduction={kind!r}{given}: the loss is computed outside the compiled model",
            from_option=True,
        )
    scale = _scale_of(joint, losses[0])
    if scale is None:
        raise _unknown(losses[0])
    if options.loss_reduction_given and options.loss_reduction != scale.reduction:
        raise node_error(
            LossReductionError,
            losses[0],
            f"the loss returned by the compiled function reduces over the batch by a {scale.reduction}, "
            f"but the option loss_reduction={options.loss_reduction!r} says otherwise",
            f"drop the loss_reduction option or set it to {scale.reduction!r}",
        )
    return scale
