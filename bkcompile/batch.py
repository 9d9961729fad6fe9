"""Mark the sample axis of a batch as dynamic so that every batch size runs in one compiled graph."""

from __future__ import annotations

import torch


def mark_batch_dynamic(*tensors: torch.Tensor, dim: int = 0) -> None:
    """Let the batch size of these inputs vary without recompiling, sizes 0 and 1 included.

    Call it on each batch before the compiled model sees it (bkcompile's data loader does). It marks
    the dim as an unbacked symbol: the graph is traced once for any batch size. Every marked dim shares
    one symbol (dynamo checks at run time that the sizes agree), so a model with several per-sample inputs
    (ids and attention mask) sees one batch size.
    """
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.dim() > dim:
            torch._dynamo.decorators.mark_unbacked(tensor, dim, shape_id="bkcompile-batch")
