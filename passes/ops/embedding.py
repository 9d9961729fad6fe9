"""Embedding lookups: each output row belongs to the sample of its index; the table's gradient adds the rows
of every index (a sum over samples: an embedding site, or a linear map of one when the batch shares the
indices, e.g. broadcast position ids)."""

from __future__ import annotations

import torch
import torch.fx
from bkcompile.passes.emit import Emitter
from bkcompile.passes.facts import REDUCED, REPLICATED, Fact, Reduced
from bkcompile.passes.ops.table import RuleInput, batched_facts, law

aten = torch.ops.aten


def mask_padding(emit: Emitter, rows: torch.fx.Node, index: torch.fx.Node, padding_idx: int | None) -> torch.fx.Node:
    """``rows`` (B, n, d) with the rows whose ``index`` (B or 1, n) is ``padding_idx`` zeroed."""
    if padding_idx is None or padding_idx < 0:
        return rows
    keep = emit.to_dtype(emit(aten.ne.Scalar, index, padding_idx), rows.meta["val"].dtype)
    return emit(aten.mul.Tensor, rows, emit(aten.unsqueeze.default, keep, 2))


def per_sample_tables(emit: Emitter, rows: torch.fx.Node, index: torch.fx.Node, vocab: int, batch) -> torch.fx.Node:
    """(B, V, d): rows (B, n, d) added at ``index`` (B or 1, n) into a zero table of each sample."""
    width = rows.meta["val"].shape[-1]
    table = emit(
        aten.zeros.default, [batch, vocab, width], dtype=rows.meta["val"].dtype, device=rows.meta["val"].device
    )
    where = emit(aten.expand.default, emit(aten.unsqueeze.default, index, 2), [batch, -1, width])
    return emit(aten.scatter_add.default, table, 1, where, rows)


@law(aten.embedding.default)
def embedding(r: RuleInput) -> Fact:
    """A lookup: the output row of each index belongs to the index's sample."""
    if batched_facts(r, [r.arg("weight")]):
        raise r.mixing("the embedding table holds samples", "index a parameter table with per-sample indices")
    return r.fact(r.arg("indices"))


def _lift_shared_indices(emit: Emitter, node: torch.fx.Node, term: torch.fx.Node, value: torch.fx.Node, batch):
    """The backward of a lookup with indices shared by the batch, applied to each sample's rows."""
    _, indices, vocab, padding_idx = node.args[:4]
    rows = emit(aten.reshape.default, value, [batch, -1, value.meta["val"].shape[-1]])  # (B, n, d)
    index = emit(aten.reshape.default, indices, [1, -1])  # the n indices every sample shares
    return per_sample_tables(emit, mask_padding(emit, rows, index, padding_idx), index, vocab, batch)


@law(aten.embedding_dense_backward.default, lift_linear=_lift_shared_indices)
def embedding_backward(r: RuleInput) -> Fact:
    grad = r.fact(r.arg("grad_output"))
    if isinstance(grad, Reduced):
        if batched_facts(r, [r.arg("indices")]):
            raise r.mixing(
                "it maps a sum over the batch with per-sample indices",
                "index with per-sample indices only values of the same sample",
            )
        return REDUCED
    if not batched_facts(r, [r.arg("grad_output"), r.arg("indices")]):
        return REPLICATED
    if r.arg("scale_grad_by_freq"):
        raise r.mixing(
            "scale_grad_by_freq divides each row's gradient by the index's frequency in the whole batch",
            "use nn.Embedding(..., scale_grad_by_freq=False)",
        )
    return REDUCED
