"""Embedding lookups: each output row belongs to the sample of its index; the table's gradient adds the rows
of every index (a sum over samples: an embedding site, or a linear map of one when the batch shares the
indices, e.g. broadcast position ids)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from bkcompile.passes.emit import Emitter
from bkcompile.passes.facts import REDUCED, REPLICATED, Fact, Reduced
from bkcompile.passes.ops.table import RuleInput, batched_facts, law
from torch.fx.experimental.symbolic_shapes import guard_or_false, guard_or_true

from bkcompile.errors import NotSupportedYetError, node_error

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


# --- nn.EmbeddingBag: decomposed into a lookup and a per-bag sum or mean -------------------------------------
#
# With a 2-D input (B, L) every bag is one sample's row: offsets = arange(0, B*L, L). The decomposition holds
# for such regular offsets only; it checks them at run time (without a host round-trip), so 1-D inputs with
# irregular offsets fail loudly: refuse_uneven_bags turns that failure into the package's error.
_MODE_SUM, _MODE_MEAN = 0, 1
_UNEVEN = "bk_dp decomposes nn.EmbeddingBag for bags of equal length only (a 2-D input): pass a (B, L) input"


def _regular(indices: torch.Tensor, offsets: torch.Tensor, mode: int, per_sample_weights, include_last_offset) -> bool:
    bags = offsets.shape[0]
    return (
        mode in (_MODE_SUM, _MODE_MEAN)
        and per_sample_weights is None
        and not include_last_offset
        and indices.dim() == 1
        and guard_or_true(bags > 0)  # a dynamic batch may be empty: the decomposition holds for no bags too
        and guard_or_false(indices.shape[0] % bags == 0)
    )


def _bag_counts(indices: torch.Tensor, bags: int, padding_idx: int) -> torch.Tensor:
    """(bags, 1): each bag's rows that are not padding (at least 1)."""
    length = indices.shape[0] // bags
    keep = (indices != padding_idx) if padding_idx >= 0 else torch.ones_like(indices)
    return keep.view(bags, length).sum(1, keepdim=True).clamp(min=1)


def embedding_bag(
    weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False, per_sample_weights=None,
    include_last_offset=False, padding_idx=-1,
):  # fmt: skip
    if not _regular(indices, offsets, mode, per_sample_weights, include_last_offset):
        return NotImplemented
    bags, width = offsets.shape[0], weight.shape[1]
    length = indices.shape[0] // bags
    expected = torch.arange(0, indices.shape[0], length, dtype=offsets.dtype, device=offsets.device)
    torch._assert_async((offsets == expected).all(), _UNEVEN)
    rows = aten.embedding.default(weight, indices, padding_idx)
    if padding_idx >= 0:
        rows = rows * (indices != padding_idx).unsqueeze(1).to(rows.dtype)
    out = rows.view(bags, length, width).sum(1)
    if mode == _MODE_MEAN:
        out = out / _bag_counts(indices, bags, padding_idx).to(out.dtype)
    empty = indices.new_empty(0)
    return out, empty, empty, empty  # the other outputs only feed the backward, decomposed below


def embedding_bag_backward(
    grad, indices, offsets, offset2bag, bag_size, maximum_indices, num_weights, scale_grad_by_freq, mode,
    sparse, per_sample_weights, padding_idx=-1,
):  # fmt: skip
    if sparse or not _regular(indices, offsets, mode, per_sample_weights, False):
        return NotImplemented
    bags, width = offsets.shape[0], grad.shape[1]
    rows = grad.unsqueeze(1).expand(bags, indices.shape[0] // bags, width)
    if mode == _MODE_MEAN:
        rows = rows / _bag_counts(indices, bags, padding_idx).unsqueeze(2).to(grad.dtype)
    return aten.embedding_dense_backward.default(
        rows.reshape(-1, width), indices, num_weights, padding_idx, scale_grad_by_freq
    )


def refuse_uneven_bags(gm: torch.fx.GraphModule, compiled: Callable) -> Callable:
    """``compiled`` raising NotSupportedYetError, at the EmbeddingBag call, when the decomposition's check of
    its offsets fails at run time (flat indices in bags of unequal length: a bag is then no sample's row)."""
    bags = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (F.embedding_bag, torch.embedding_bag)]
    if not bags:
        return compiled

    def run(*args: Any) -> Any:
        try:
            return compiled(*args)
        except RuntimeError as error:
            if _UNEVEN not in str(error):
                raise
            raise node_error(
                NotSupportedYetError,
                bags[0],
                "its flat indices are cut into bags of unequal length by the offsets: bk_dp clips per bag only "
                "when each bag is one sample's row of a (B, L) input",
                "pass the indices as a 2-D (B, L) tensor (pad each sample's bag with padding_idx)",
            ) from error

    return run


DECOMPOSITIONS = {
    aten._embedding_bag.default: embedding_bag,
    aten._embedding_bag_backward.default: embedding_bag_backward,
}
