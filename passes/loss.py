"""Loss reduction: the factor s with which sample i's gradient of its own loss is s * (its share of the
graph's gradient).

With ``loss = mean_i l_i`` the graph's gradient carries 1/B, so s = B; with ``sum_i l_i``, s = 1. A
loss returned by the compiled function is recognised from the op that reduces it over the batch; a
loss computed outside uses the ``loss_reduction`` option.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx
from bkcompile.passes.batch_axis import JointGraph
from bkcompile.passes.facts import Batched, Reduced
from bkcompile.passes.ops import law_for
from bkcompile.passes.ops.table import schema_arg

from bkcompile.errors import LossReductionError, node_error
from bkcompile.options import BKOptions

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class LossScale:
    """``kind`` is "sum" (s = 1), "mean" (s = B) or "weight" (s = the loss's total weight, a graph value)."""

    kind: str
    source: str  # what the report says: "option loss_reduction='mean'" or the op
    node: torch.fx.Node | None = None

    @property
    def reduction(self) -> str:
        return "sum" if self.kind == "sum" else "mean"


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
            return LossScale("sum", "cross-entropy/nll loss, reduction='sum'")
        weight = next((u for u in loss.users if u.target is operator.getitem and u.args[1] == 1), None)
        return LossScale("weight", "cross-entropy/nll loss, reduction='mean' (its total weight)", weight or loss)
    source = node.args[0] if node.args else None
    passes = law_for(target).loss
    if passes in ("sum", "mean") or target == aten.mse_loss.default:
        if not isinstance(joint.facts.get(source), Batched):
            return _scale_of(joint, source)
        mean = passes == "mean" or (target == aten.mse_loss.default and schema_arg(node, "reduction") == 1)
        return LossScale("mean", f"{target} over the batch") if mean else LossScale("sum", f"{target} over the batch")
    if passes == "pass":
        return _scale_of(joint, source)
    if passes == "scale":
        return _scale_of(joint, source if isinstance(joint.facts.get(source), Reduced) else node.args[1])
    if passes == "add":
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
        return LossScale(kind, f"option loss_reduction={kind!r} (loss computed outside the compiled model)")
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
