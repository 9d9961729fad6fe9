"""The rows of a step: the memory each backward clipped, how many rows, and which Poisson loader drew them.

A step of a DP optimizer releases each drawn row's clipped gradient once. Each compiled call with
gradients notes its sample inputs (the graph inputs that hold the batch) as byte spans of their memory and
their batch size; when its backward runs, the step's :class:`StepRows` refuses a span that overlaps a span
clipped by an *earlier* backward of the same step (two backwards over one batch, overlapping
micro-batches: a row clipped twice). The calls of one backward are one clip (pieces of one model), so
they may share rows. The spans keep their storage alive until the step ends, so the allocator cannot hand
the memory of one micro-batch to the next and fake an overlap.

The rows a step clipped (each backward counts the batch size of its calls) are compared at ``step()``
with the rows the accounted loader drew (:class:`bkcompile.data.OneBatchPerStep`). A loader notes the
memory of every batch it hands out (:func:`note_draw`), so a step also knows which Poisson loaders fed it
(:func:`drawn_by`), when the model receives the batch itself or views of it.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from bkcompile.errors import ClipOnceError, run_error


@dataclasses.dataclass(frozen=True, eq=False)
class Span:
    """The bytes a tensor's elements lie in (a superset for a strided view)."""

    start: int
    stop: int
    device: torch.device
    storage: Any  # the tensor's UntypedStorage, held until the step ends

    def overlaps(self, other: Span) -> bool:
        return self.device == other.device and self.start < other.stop and other.start < self.stop


def span_of(tensor: torch.Tensor) -> Span | None:
    """The span of a real tensor with elements (None for an empty or fake tensor)."""
    if tensor.numel() == 0 or isinstance(tensor, torch._subclasses.FakeTensor):
        return None
    extent = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())) + 1  # strides >= 0
    start = tensor.data_ptr()
    return Span(start, start + extent * tensor.element_size(), tensor.device, tensor.untyped_storage())


_DRAWN: dict[tuple[torch.device, int], tuple[weakref.ref, weakref.ref]] = {}


def note_draw(tensors: Iterable[torch.Tensor], loader: Any) -> None:
    """A Poisson loader hands out a batch with these tensors."""
    for stale in [k for k, (leaf, _) in _DRAWN.items() if leaf() is None]:
        del _DRAWN[stale]
    for tensor in tensors:
        if tensor.numel():
            _DRAWN[(tensor.device, tensor.untyped_storage().data_ptr())] = (weakref.ref(tensor), weakref.ref(loader))


def drawn_by(span: Span) -> Any:
    """The Poisson loader that drew the memory of ``span`` (None when it drew none of it)."""
    found = _DRAWN.get((span.device, span.storage.data_ptr()))
    if found is None or found[0]() is None:
        return None
    return found[1]()


@dataclasses.dataclass
class StepRows:
    """The rows the backwards of one step clipped (reset when a step starts)."""

    task: int = -1  # the autograd backward counted now
    earlier: int = 0  # rows clipped by the step's earlier backwards
    current: int = 0  # rows of the current backward (its calls are pieces of one clip: the largest batch)
    done: list[tuple[Span, str]] = dataclasses.field(default_factory=list)  # earlier backwards' spans
    now: list[tuple[Span, str]] = dataclasses.field(default_factory=list)  # the current backward's spans
    loaders: list[weakref.ref] = dataclasses.field(default_factory=list)  # the Poisson loaders that fed the step

    @property
    def total(self) -> int:
        return self.earlier + self.current

    def note(self, task: int, rows: int, spans: tuple[Span, ...], where: str) -> None:
        """A call's backward runs in the autograd backward ``task`` over ``rows`` rows held in ``spans``."""
        if task != self.task:
            self.task, self.earlier, self.current = task, self.earlier + self.current, 0
            self.done.extend(self.now)
            self.now = []
        for span in spans:
            for seen, seen_where in self.done:
                if span.overlaps(seen):
                    raise run_error(
                        ClipOnceError,
                        f"the compiled call at {where} clips rows that a backward earlier in this step clipped "
                        f"already (the call at {seen_where})",
                        "a row clipped in two backwards of one step contributes up to 2R to the update",
                        "split the batch into disjoint micro-batches (bkcompile.micro_batches(batch, max_size)), "
                        "one backward each, and step once; or add the losses and call backward() once",
                    )
            self.now.append((span, where))
            loader = drawn_by(span)
            if loader is not None and all(ref() is not loader for ref in self.loaders):
                self.loaders.append(weakref.ref(loader))
        self.current = max(self.current, rows)
