"""The pieces one autograd backward runs through, and the callback at its end.

A model compiled as one graph clips inside that graph's backward. A model in pieces (graph breaks,
regionally compiled blocks) clips at the end of the backward, once every piece has handed over its part
of each sample's gradient (``bkcompile.deferred``). Each piece's backward *joins* the autograd backward
it runs in (keyed by the engine's graph task id); the first to join queues a callback that runs when
that backward ends (``queue_callback``) and calls the finalizer. That a graph compiled as the whole
model meets no other bk_dp graph in its backward is the step ledger's check (``bkcompile.ledger``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from bkcompile.errors import PrivacyError


@dataclasses.dataclass
class Backward:
    """The pieces one autograd backward has run so far."""

    task: int  # the autograd engine's graph task id
    pieces: list = dataclasses.field(default_factory=list)  # deferred.Piece, in the order they ran


_RUNNING: dict[int, Backward] = {}  # graph task id -> its record, until the backward ends
_KEEP = 8  # records of backwards that failed before their end (their callback never ran) are dropped


def join_piece(piece, finalize: Callable[[Backward], None]) -> None:
    """A piece hands over its per-sample gradients; ``finalize`` runs once at the end of the backward."""
    task = torch._C._current_graph_task_id()
    if task < 0:
        raise PrivacyError(
            f"the backward of {piece.graph.label} ran outside an autograd backward; bkcompile clips in "
            "loss.backward() (or torch.autograd.backward)"
        )
    record = _RUNNING.get(task)
    if record is None:
        while len(_RUNNING) >= _KEEP:
            _RUNNING.pop(next(iter(_RUNNING)))
        record = _RUNNING[task] = Backward(task)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: finalize(_RUNNING.pop(task)))
    record.pieces.append(piece)
