"""Losses: per-row losses keep samples apart; their reduction over the batch is the loss's sum or mean.

A mean over every row of a merged (B*T) axis divides by a count that depends on all samples (a token mean
over the whole batch): refused, since no per-sample loss is defined.
"""

from __future__ import annotations

import torch
from bkcompile.passes.facts import REDUCED, REPLICATED, Fact
from bkcompile.passes.ops.pointwise import broadcast, broadcast_shape, pointwise
from bkcompile.passes.ops.table import RuleInput, agree, batched_facts, law, reads_batch_sums

from bkcompile.errors import LossReductionError, node_error

aten = torch.ops.aten
REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2


@law(aten.nll_loss_forward.default)
def nll_loss_forward(r: RuleInput) -> tuple:
    source = r.arg("self")
    fact = r.fact(source)
    batched = batched_facts(r, (source, r.arg("target")))
    if not batched:
        return (fact, REPLICATED)
    fact = agree(r, batched)
    if fact.dim != 0 or source.meta["val"].dim() == 1:
        raise r.mixing("the class dimension of the loss input holds samples", "pass (N, C) scores with the batch first")
    reduction = r.arg("reduction")
    if reduction == REDUCTION_NONE:
        return (fact, REPLICATED)
    if reduction == REDUCTION_MEAN and not fact.plain:
        raise node_error(
            LossReductionError,
            r.node,
            "the loss is a mean over all tokens of the whole batch: its normaliser (the count of non-ignored "
            "tokens in the batch) depends on every sample, so a sample's gradient depends on the others",
            "compute a per-sample loss: F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction='none')"
            ".view(B, T), reduce it per sample (sum, or mean over that sample's tokens), then .mean() over the batch",
        )
    return (REDUCED, REDUCED)


@law(aten.nll_loss_backward.default)
@reads_batch_sums  # the normaliser (total_weight) is the loss's own reduction, which the loss pass rescales
def nll_loss_backward(r: RuleInput) -> Fact:
    """The loss gradient of each row depends on that row and the (batch-wide) normaliser only."""
    batched = batched_facts(r, (r.arg("self"), r.arg("target")))
    return agree(r, batched) if batched else REPLICATED


@law(aten.mse_loss.default)
def mse_loss(r: RuleInput) -> Fact:
    """Elementwise squared errors; reduced (a 0-dim mean or sum of every row) they are a sum over samples."""
    if r.arg("reduction") == REDUCTION_NONE:
        return pointwise(r)
    batched, reduced = broadcast(r, broadcast_shape(r.shape(r.arg("self")), r.shape(r.arg("target"))))
    if reduced:
        raise r.mixing("it is a non-linear function of a sum over the batch", "compare per-sample values only")
    if batched:
        agree(r, batched)
        return REDUCED
    return REPLICATED


@law(aten.mse_loss_backward.default)
def mse_loss_backward(r: RuleInput) -> Fact:
    batched = batched_facts(r, (r.arg("self"), r.arg("target")))
    return agree(r, batched) if batched else REPLICATED
