"""Loss reduction: the factor s with which sample i's gradient of its own loss is s * (its share of the
graph's gradient).

With ``loss = mean_i l_i`` the graph's gradient carries 1/B, so s = B; with ``sum_i l_i``, s = 1. A
loss returned by the compiled function is recognised from the op that reduces it over the batch; a
loss computed outside uses the ``loss_reduction`` option.

A loss computed outside is never seen, and the gradient the backward receives (the tangent of the graph's
outputs) cannot stand in for it: ``sum_i l_i`` and ``mean_i (B * l_i)`` send the same tangent, yet their
per-sample losses differ by the factor B, and so do their norms and clip factors (``F.cross_entropy(out, y,
reduction="sum")`` and ``(6 * F.cross_entropy(out, y, reduction="none")).mean()`` at B = 6). Which one the
user means is how the loss is written, not a value the graph holds, and a wrong guess is not only mis-scaled:
each clipped gradient then depends on the batch size, so one sample can move the clipped sum by up to 2R.
So a loss computed outside needs ``loss_reduction`` ("mean" or "sum"): with "auto" (the default) and no loss
in the graph the scale is *unset* (refused by :func:`bkcompile.errors.unset_loss_reduction`). A whole graph is
refused when it compiles, once its cost report is built (``bkcompile.explain`` reports it); a piece cannot know
whether another piece of its backward computes the loss, so the clip at the end of the backward refuses instead
(``bkcompile.runtime.deferred``). A graph for a batch of one sample, where a sum is a mean, needs neither.

A mean whose normaliser is a count of labels (cross entropy's non-ignored targets; the smoothing term of
``label_smoothing`` divides by the same count) has s = that count, a graph value: every division by a count
in the graph must be by the loss's own count, which s cancels. Terms reduced differently add up when they
are the same per-sample loss: a count-normalised mean and a batch mean (a multitask loss) agree when the
count is B, which the graph checks when it runs (``bkcompile::same_count``).
"""

from __future__ import annotations

import dataclasses
import enum
import operator

import torch
import torch.fx
from bkcompile.passes.facts import Batched, Reduced
from bkcompile.passes.joint import JointGraph
from bkcompile.passes.ops import law_for
from bkcompile.passes.ops.table import is_count, schema_arg, uncast

from bkcompile.compiler.options import BKOptions
from bkcompile.errors import LossReductionError, node_error, run_error, user_location

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
    checks: tuple[torch.fx.Node, ...] = ()  # counts that must equal B when the graph runs (ScaleKind.MEAN)
    from_option: bool = False  # no loss in the graph: the scale is the loss_reduction option's
    unset: bool = False  # no loss in the graph and loss_reduction "auto": no scale (kind a stand-in), refused

    @property
    def reduction(self) -> str:
        return "sum" if self.kind is ScaleKind.SUM else "mean"

    def describe(self) -> str:
        if self.unset:
            return f"unknown: {self.source}"
        s = {ScaleKind.SUM: "1", ScaleKind.MEAN: "B", ScaleKind.WEIGHT: "the loss's total weight"}[self.kind]
        return f"s = {s}, from {self.source}"


def _found(node: torch.fx.Node, what: str) -> str:
    return f"{what} at {user_location(node)}"


@torch.library.custom_op("bkcompile::same_count", mutates_args=())
def same_count(count: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """``batch``, once checked equal to ``count`` (a loss normaliser that must be the batch size)."""
    if int(count.item()) != int(batch.item()):
        raise run_error(
            LossReductionError,
            f"the loss adds a batch mean to a mean over the {int(count.item())} non-ignored labels of a batch of "
            f"{int(batch.item())}",
            "with ignored labels no per-sample loss is defined",
            "give every sample a label, or reduce every term of the loss per sample (reduction='none'), then "
            ".mean() over the batch",
        )
    return batch.clone()


@same_count.register_fake
def _same_count_fake(count: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(batch)


def normaliser_key(node: object) -> object:
    """One key for nodes that are the same count of labels: cross entropy's total weight without class
    weights, and ``sum(target != ignore_index)``; any other node is its own key."""
    node = uncast(node)
    if not isinstance(node, torch.fx.Node):
        return node
    if node.target is operator.getitem and node.args[0].target == aten.nll_loss_forward.default:
        loss = node.args[0]
        if node.args[1] == 1 and schema_arg(loss, "weight") is None:
            return ("count", schema_arg(loss, "target"), schema_arg(loss, "ignore_index"))
        return node
    if node.target is aten.sum.default:
        kept = uncast(node.args[0])
        if getattr(kept, "target", None) is aten.ne.Scalar:
            return ("count", kept.args[0], kept.args[1])
        if getattr(kept, "target", None) in (aten.bitwise_not.default, aten.logical_not.default):
            equal = kept.args[0]
            if getattr(equal, "target", None) is aten.eq.Scalar:
                return ("count", equal.args[0], equal.args[1])
    return node


def _key(scale: LossScale) -> tuple:
    return (scale.kind, normaliser_key(scale.node))


def _combine(node: torch.fx.Node, scales: set[LossScale]) -> LossScale | None:
    """The scale of a sum of loss terms."""
    keys = {_key(s) for s in scales}
    if len(keys) <= 1:
        return next(iter(scales), None)
    kinds = {k for k, _ in keys}
    counts = [s for s in scales if s.kind is ScaleKind.WEIGHT and isinstance(normaliser_key(s.node), tuple)]
    if kinds == {ScaleKind.WEIGHT, ScaleKind.MEAN} and len({_key(s) for s in counts}) == len(keys) - 1:
        checks = tuple(s.node for s in counts)
        what = _found(node, "a batch mean plus count-normalised means (checked equal to B)")
        return LossScale(ScaleKind.MEAN, what, checks=checks)
    raise node_error(
        LossReductionError,
        node,
        "it adds losses that reduce over the batch differently (a mean and a sum, or two means "
        "with different normalisers), so no per-sample loss is defined",
        "reduce every term the same way (all .mean() or all .sum() over the batch)",
    )


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
        if schema_arg(loss, "reduction") == 2:
            return LossScale(ScaleKind.SUM, _found(loss, "cross-entropy/nll loss, reduction='sum'"))
        weight = next((u for u in loss.users if u.target is operator.getitem and u.args[1] == 1), None)
        what = _found(loss, "cross-entropy/nll loss, reduction='mean' (divided by its total weight)")
        return LossScale(ScaleKind.WEIGHT, what, weight or loss)
    source = node.args[0] if node.args else None
    passes = law_for(target).loss
    if passes in ("sum", "mean") or target == aten.mse_loss.default:
        if not isinstance(joint.facts.get(source), Batched):
            return _scale_of(joint, source)
        mean = passes == "mean" or (target == aten.mse_loss.default and schema_arg(node, "reduction") == 1)
        return LossScale(ScaleKind.MEAN if mean else ScaleKind.SUM, _found(node, f"{target} over the batch"))
    if passes == "pass":
        return _scale_of(joint, source)
    if target is aten.div.Tensor and is_count(node.args[1], joint.facts):
        inner = _scale_of(joint, source)
        if inner is not None and inner.kind is not ScaleKind.SUM:
            raise node_error(
                LossReductionError,
                node,
                "it divides a mean over the batch by a count over the batch again",
                "divide the summed loss by the count once",
            )
        what = _found(node, "a sum over the batch divided by a count of labels")
        return inner and LossScale(ScaleKind.WEIGHT, what, node.args[1])
    if passes == "scale":
        return _scale_of(joint, source if isinstance(joint.facts.get(source), Reduced) else node.args[1])
    if passes == "add":
        scales = {s for s in (_scale_of(joint, a) for a in node.args if isinstance(a, torch.fx.Node)) if s is not None}
        return _combine(node, scales)
    raise _unknown(node)


def _check_counts(joint: JointGraph, scale: LossScale) -> None:
    """Every division by a count over the batch divides by the loss's own normaliser (which s cancels)."""
    weighted = scale.kind is ScaleKind.WEIGHT
    allowed = {normaliser_key(n) for n in (scale.node, *scale.checks) if weighted or n in scale.checks}
    for node in joint.gm.graph.find_nodes(op="call_function", target=aten.div.Tensor):
        if is_count(node.args[1], joint.facts) and normaliser_key(node.args[1]) not in allowed:
            raise node_error(
                LossReductionError,
                node,
                "it divides by a count over the whole batch that is not the loss's normaliser, so a sample's "
                "gradient depends on the other samples",
                "divide only the summed loss by its count of labels (or use a per-sample loss)",
            )


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
        if kind == "auto":
            what = (
                "the loss is computed outside the compiled model and loss_reduction is not given, which training "
                "refuses (LossReductionError); the costs do not depend on it"
            )
            return LossScale(ScaleKind.MEAN, what, from_option=True, unset=True)
        return LossScale(
            ScaleKind(kind),
            f"option loss_reduction={kind!r}: the loss is computed outside the compiled model",
            from_option=True,
        )
    scale = _scale_of(joint, losses[0])
    if scale is None:
        raise _unknown(losses[0])
    _check_counts(joint, scale)
    if options.loss_reduction not in ("auto", scale.reduction):
        raise node_error(
            LossReductionError,
            losses[0],
            f"the loss returned by the compiled function reduces over the batch by a {scale.reduction}, "
            f"but the option loss_reduction={options.loss_reduction!r} says otherwise",
            f"set loss_reduction={scale.reduction!r}, or leave it out ('auto' recognises a returned loss)",
        )
    return scale
