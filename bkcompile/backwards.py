"""Which bk_dp graphs one autograd backward runs through.

A model compiled as one graph clips inside that graph: its backward forms every per-sample norm, so it
must be the only bk_dp graph of the backward. A model in pieces (graph breaks, regionally compiled
blocks) clips at the end of the backward, once every piece has handed over its part of each sample's
gradient (``bkcompile.deferred``).

Every privatized graph's backward therefore *joins* the autograd backward it runs in (keyed by the
engine's graph task id): a whole graph when its parameters' tap runs (``bkcompile.ledger``), a piece when it
hands over its per-sample gradients. The first to join queues a callback that runs when that backward ends
(``queue_callback``) and calls the finalizers the pieces registered. A whole graph that meets any other
bk_dp graph in one backward is refused: each would have clipped only its own part of a sample's gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from bkcompile.errors import GraphBreakError


@dataclasses.dataclass
class Backward:
    """The bk_dp graphs one autograd backward has run so far."""

    task: int  # the autograd engine's graph task id
    wholes: list[str] = dataclasses.field(default_factory=list)  # graphs that clipped themselves
    pieces: list = dataclasses.field(default_factory=list)  # deferred.Piece, in the order they ran
    calls: list = dataclasses.field(default_factory=list)  # ledger.CallRecord: the calls whose taps ran
    finalizers: list[Callable[[Backward], None]] = dataclasses.field(default_factory=list)


_RUNNING: dict[int, Backward] = {}  # graph task id -> its record, until the backward ends
_KEEP = 8  # records of backwards that failed before their end (their callback never ran) are dropped


def current() -> Backward:
    """The record of the autograd backward running now (created, with its end callback, on first use)."""
    task = torch._C._current_graph_task_id()
    if task < 0:
        raise GraphBreakError(
            "a bk_dp graph's backward ran outside an autograd backward (torch.autograd.grad or a "
            "functional transform?); bkcompile clips inside loss.backward()"
        )
    record = _RUNNING.get(task)
    if record is None:
        while len(_RUNNING) >= _KEEP:
            _RUNNING.pop(next(iter(_RUNNING)))
        record = _RUNNING[task] = Backward(task)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _end(task))
    return record


def _end(task: int) -> None:
    record = _RUNNING.pop(task, None)
    if record is not None:
        for finalize in record.finalizers:
            finalize(record)


def _several(record: Backward, whole: str, others: str) -> GraphBreakError:
    _RUNNING.pop(record.task, None)  # the backward fails here: nothing of it is finalized
    return GraphBreakError(
        f"one backward ran through several bk_dp graphs ({others}), and {whole} was compiled as the whole "
        "model: it clipped only its own part of each sample's gradient, so the step's gradients are not private\n"
        "  why: regional compilation (model.blocks[i].compile(...)) or several compiled modules make one "
        "model of several graphs, which dynamo cannot see when it compiles one of them\n"
        "  fix: compile every bk_dp module of the model with options={..., 'graphs': 'several'} (their "
        "norms are then combined and each sample clipped once, at the end of the backward), or compile "
        "the model as one module; do not step these gradients"
    )


def join_whole(label: str) -> None:
    """A graph compiled as the whole model clips in this backward; refuse when it is not alone."""
    record = current()
    if record.wholes or record.pieces:
        others = ", ".join(record.wholes + [piece.graph.label for piece in record.pieces])
        raise _several(record, label, others)
    record.wholes.append(label)


def join_piece(piece, finalize: Callable[[Backward], None]) -> None:
    """A piece hands over its per-sample gradients; ``finalize`` runs once at the end of the backward."""
    record = current()
    if record.wholes:
        raise _several(record, record.wholes[0], piece.graph.label)
    if finalize not in record.finalizers:
        record.finalizers.append(finalize)
    record.pieces.append(piece)
