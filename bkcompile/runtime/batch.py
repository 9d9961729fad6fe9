"""The sample axis of a batch: mark it dynamic, slice rows out of any collated structure, split into micro-batches.

A *batch* is whatever a ``collate_fn`` returns: a tensor, or tuples, lists, dicts (and namedtuples) of
tensors and per-sample lists (``default_collate`` turns strings into a list with one entry per
sample). Its *rows* are dim 0 of each tensor whose dim 0 has the batch's size, and the entries of each
per-sample list; anything else (a 0-dim tensor, a tensor of another length) is shared by all rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from bkcompile.errors import BKError
from bkcompile.runtime.transformers_masks import substitute_mask_preprocessing


def mark_batch_dynamic(*tensors: torch.Tensor, dim: int = 0) -> None:
    """Let the batch size of these inputs vary without recompiling, sizes 0 and 1 included.

    Call it on each batch before the compiled model sees it (bkcompile's data loader does). It marks
    the dim as an unbacked symbol: the graph is traced once for any batch size. Every marked dim shares
    one symbol (dynamo checks at run time that the sizes agree), so a model with several per-sample inputs
    (ids and attention mask) sees one batch size. With transformers loaded, dynamo traces its mask preprocessing
    with the position ids broadcast over the batch first (:mod:`bkcompile.runtime.transformers_masks`).
    """
    substitute_mask_preprocessing()
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and tensor.dim() > dim:
            torch._dynamo.decorators.mark_unbacked(tensor, dim, shape_id="bkcompile-batch")


def _is_per_sample_list(value: Any, size: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == size
        and not any(isinstance(v, (torch.Tensor, list, tuple, Mapping)) for v in value)
    )


def map_rows(batch: Any, size: int, fn: Callable[[Any], Any]) -> Any:
    """``batch`` with ``fn`` applied to each per-sample leaf (a tensor with ``size`` rows, a per-sample list)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch) if batch.dim() > 0 and batch.shape[0] == size else batch
    if _is_per_sample_list(batch, size):
        return fn(batch)
    if isinstance(batch, Mapping):
        return type(batch)({k: map_rows(v, size, fn) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_rows(v, size, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_rows(v, size, fn) for v in batch)
    return batch


def _tensor_sizes(batch: Any) -> set[int]:
    if isinstance(batch, torch.Tensor):
        return {batch.shape[0]} if batch.dim() > 0 else set()
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        return set().union(*(_tensor_sizes(v) for v in batch)) if batch else set()
    return set()


def batch_size_of(batch: Any) -> int:
    """The number of rows of ``batch``: the common dim-0 size of its tensors."""
    sizes = _tensor_sizes(batch)
    if len(sizes) != 1:
        raise BKError(
            f"cannot tell the number of rows of this batch: its tensors have dim-0 sizes {sorted(sizes)}; "
            "fix: pass rows=<the batch size> (the loader's batches have len(indices) rows)"
        )
    return sizes.pop()


def mark_rows_dynamic(batch: Any, size: int) -> Any:
    """Mark dim 0 of every per-sample tensor of ``batch`` dynamic (see :func:`mark_batch_dynamic`); returns it."""
    map_rows(batch, size, lambda leaf: mark_batch_dynamic(leaf) if isinstance(leaf, torch.Tensor) else None)
    return batch


def micro_batches(batch: Any, max_size: int, rows: int | None = None) -> Iterator[Any]:
    """Split one batch into consecutive micro-batches of at most ``max_size`` rows (none for an empty batch).

    This is the way to accumulate gradients under DP: draw ONE batch from the Poisson loader, run a
    backward on each micro-batch, then call ``optimizer.step()`` once. The clipped sums add up to the
    clipped sum of the whole batch and the accountant records one step at the loader's sample rate, as
    for the whole batch (drawing several loader batches per step would be a larger sample rate).
    Each micro-batch is marked dynamic on its rows (no recompiles for its varying size).
    """
    if not (isinstance(max_size, int) and max_size > 0):
        raise BKError(f"micro_batches needs a positive integer max_size, got {max_size!r}")
    size = batch_size_of(batch) if rows is None else rows
    for start in range(0, size, max_size):
        stop = min(start + max_size, size)
        yield mark_rows_dynamic(map_rows(batch, size, lambda leaf, a=start, b=stop: _rows(leaf, a, b)), stop - start)


def _rows(leaf: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a per-sample leaf. A tensor's rows are a view of a detached alias (same memory):
    dynamo guards a view's base, and the batch's base has the dynamic batch size the view's size differs from
    (a guard that fails on the frame that made it)."""
    if isinstance(leaf, torch.Tensor) and not leaf.requires_grad:
        return leaf.detach()[start:stop]
    return leaf[start:stop]
