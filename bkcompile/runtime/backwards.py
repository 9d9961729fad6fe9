"""The pieces one autograd backward runs through, and the callback at its end.

A model compiled as one graph clips inside that graph's backward. A model in pieces (graph breaks,
regionally compiled blocks) clips at the end of the backward, once every piece has handed over its part
of each sample's gradient (``bkcompile.runtime.deferred``). Each piece's backward *joins* the autograd backward
it runs in (keyed by the engine's graph task id); the first to join queues a callback that runs when
that backward ends (``queue_callback``) and calls the finalizer. That a graph compiled as the whole
model meets no other bk_dp graph in its backward is the step ledger's check (``bkcompile.runtime.ledger``).

A piece recomputed by reentrant activation checkpointing runs its backward in a nested graph task, which
the checkpoint's backward starts inside the outer one (``bkcompile.runtime.recompute``): its task is mapped to the
outer backward (:func:`current_task`), so its pieces join that backward's clip.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake

from bkcompile.errors import PrivacyError, run_error


def storage_key(tensor: torch.Tensor) -> tuple | None:
    """Where a tensor's values lie (a detached view of it has the same key); None for a fake tensor (DDP's
    compiler runs the graphs on fake inputs), which has no storage."""
    if is_fake(tensor):
        return None
    return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device)


@dataclasses.dataclass(eq=False)
class _Call:
    params: tuple[int, ...]  # the piece's parameters, by identity
    inputs: list[weakref.ref]  # its batched inputs
    signatures: tuple[tuple, ...]

    def alive(self) -> bool:
        return all(ref() is not None for ref in self.inputs)


class Calls:
    """The forward calls of the pieces that a recomputation (activation checkpointing, ``bkcompile.runtime.recompute``)
    may repeat, each once."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []

    def seen(self, params: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> None:
        self.calls = [c for c in self.calls if c.alive()]
        self.calls.append(
            _Call(tuple(map(id, params)), [weakref.ref(x) for x in inputs], tuple(map(storage_key, inputs)))
        )

    def forget(self) -> None:
        self.calls = []

    def take(self, params: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> bool:
        """Whether this call repeats one seen (which then cannot be repeated again)."""
        key = (tuple(map(id, params)), tuple(map(storage_key, inputs)))
        for call in self.calls:
            if (call.params, call.signatures) == key and call.alive():
                self.calls.remove(call)
                return True
        return False


CALLS = Calls()  # the calls of pieces since the last backward of pieces ended


@dataclasses.dataclass
class Backward:
    """The pieces one autograd backward has run so far."""

    task: int  # the autograd engine's graph task id
    pieces: list = dataclasses.field(default_factory=list)  # deferred.Piece, in the order they ran


_RUNNING: dict[int, Backward] = {}  # graph task id -> its record, until the backward ends
_NESTED: dict[int, int] = {}  # a recomputation's nested graph task id -> the backward it belongs to
_KEEP = 8  # records of backwards that failed before their end (their callback never ran) are dropped


def current_task() -> int:
    """The graph task id of the running backward (the outer one for a recomputation's nested backward)."""
    task = torch._C._current_graph_task_id()
    return _NESTED.get(task, task)


def open_backward(finalize: Callable[[Backward], None]) -> Backward:
    """The record of the running backward; the first call queues ``finalize`` for its end."""
    task = current_task()
    record = _RUNNING.get(task)
    if record is None:
        while len(_RUNNING) >= _KEEP:
            _RUNNING.pop(next(iter(_RUNNING)))
        record = _RUNNING[task] = Backward(task)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _end(task, finalize))
    return record


def _end(task: int, finalize: Callable[[Backward], None]) -> None:
    for nested in [k for k, outer in _NESTED.items() if outer == task]:
        del _NESTED[nested]
    CALLS.forget()  # what the pieces' calls so far could recompute, they had this backward to do
    finalize(_RUNNING.pop(task))


def nested_in_this_backward(outputs) -> None:
    """A recomputation ran in this backward: the nested backward that reaches its ``outputs`` belongs to it."""
    outer = current_task()

    def enter(_grads) -> None:
        task = torch._C._current_graph_task_id()
        if task != outer:
            _NESTED[task] = outer

    for value in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
        if isinstance(value, torch.Tensor) and value.grad_fn is not None:
            value.grad_fn.register_prehook(enter)


def join_piece(piece, finalize: Callable[[Backward], None]) -> None:
    """A piece hands over its per-sample gradients; ``finalize`` runs once at the end of the backward."""
    if torch._C._current_graph_task_id() < 0:
        raise run_error(
            PrivacyError,
            f"the backward of {piece.label} ran outside an autograd backward",
            "bkcompile clips the pieces of one backward together, which only autograd's engine runs",
            "call loss.backward() (or torch.autograd.backward)",
        )
    open_backward(finalize).pieces.append(piece)
