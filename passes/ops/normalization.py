"""Normalisation layers: statistics over per-sample dims keep samples apart; batch statistics mix them."""

from __future__ import annotations

import torch
from bkcompile.passes.facts import REPLICATED, Batched
from bkcompile.passes.ops.table import RuleInput, law

aten = torch.ops.aten


@law(aten.native_layer_norm.default)
def layer_norm(r: RuleInput) -> tuple:
    """LayerNorm normalises over the trailing ``normalized_shape`` dims: per-sample when the batch is before them."""
    source = r.arg("input")
    fact = r.fact(source)
    if isinstance(fact, Batched):
        if fact.dim >= source.meta["val"].dim() - len(r.arg("normalized_shape")):
            raise r.mixing("it normalises over the sample axis", "normalise over feature dimensions only")
    return (fact, fact, fact)


@law(aten.native_group_norm.default)
def group_norm(r: RuleInput) -> tuple:
    """GroupNorm normalises each sample's channel groups on their own: per-sample on dim 0."""
    fact = r.fact(r.arg("input"))
    if isinstance(fact, Batched) and fact.dim != 0:
        raise r.mixing("its channel or spatial dims hold samples", "keep the batch on dim 0 of the input")
    return (fact, fact, fact)


def _batch_norm(r: RuleInput, training: bool, running_stats: bool) -> tuple:
    fact = r.fact(r.arg("input"))
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


@law(
    [
        aten._native_batch_norm_legit_functional.default,
        aten._native_batch_norm_legit.default,
        aten.native_batch_norm.default,
    ]
)
def batch_norm(r: RuleInput) -> tuple:
    return _batch_norm(r, training=bool(r.arg("training")), running_stats=r.arg("running_mean") is not None)


@law(aten._native_batch_norm_legit.no_stats)
def batch_norm_no_stats(r: RuleInput) -> tuple:
    return _batch_norm(r, training=bool(r.arg("training")), running_stats=False)


@law(aten._native_batch_norm_legit_no_training.default)
def batch_norm_eval(r: RuleInput) -> tuple:
    """Batch norm with frozen statistics is an elementwise affine map: per-sample."""
    return _batch_norm(r, training=False, running_stats=False)
