"""Activation checkpointing around a piece: its forward runs again inside the backward.

``torch.utils.checkpoint`` run eagerly around a module compiled in pieces (regional compilation, or a
graph dynamo compiled on its own after a graph break) calls the piece's forward a second time, inside the
autograd backward, to recompute what the first call did not keep:

- non-reentrant (``use_reentrant=False``): the recomputation only rebuilds the tensors the first call's
  backward reads; its own backward never runs;
- reentrant (``use_reentrant=True``): the first call ran under ``no_grad``; the recomputation's backward
  runs in an autograd backward of its own (a nested graph task), started by the checkpoint's backward.

Either way it is the same call again, not a second call: the same piece (its parameters, by identity)
over the same rows (its batched inputs are the first call's tensors, or detached views of their storage:
the same data pointer, shape and strides). :class:`Calls` keeps the batched inputs of the calls seen since
they were made (weakly: a call whose inputs are gone can no longer be recomputed) and lets each be
recomputed once. A forward inside a backward that matches no such call is a second call on rows not
known to be the same samples, and is refused.

An accepted recomputation's backward, when it runs in a nested graph task, belongs to the backward that
recomputed it: ``bkcompile.backwards`` maps the nested task to it, so its pieces are clipped with the
others, once, at the end of the outer backward.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bkcompile import backwards
from bkcompile.deferred import finalize
from bkcompile.errors import ClipOnceError


def _signature(tensor: torch.Tensor) -> tuple:
    return (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device)


@dataclasses.dataclass(eq=False)
class _Call:
    params: tuple[int, ...]  # the piece's parameters, by identity
    inputs: list[weakref.ref]  # its batched inputs
    signatures: tuple[tuple, ...]

    def alive(self) -> bool:
        return all(ref() is not None for ref in self.inputs)


class Calls:
    """The forward calls of the pieces that a recomputation may repeat (each once)."""

    def __init__(self) -> None:
        self.calls: list[_Call] = []

    def seen(self, params: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> None:
        self.calls = [c for c in self.calls if c.alive()]
        self.calls.append(
            _Call(tuple(map(id, params)), [weakref.ref(x) for x in inputs], tuple(map(_signature, inputs)))
        )

    def take(self, params: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> bool:
        """Whether this call repeats one seen (which then cannot be repeated again)."""
        key = (tuple(map(id, params)), tuple(map(_signature, inputs)))
        for call in self.calls:
            if (call.params, call.signatures) == key and call.alive():
                self.calls.remove(call)
                return True
        return False


CALLS = Calls()


def recomputed(
    compiled: Callable, args: Sequence[Any], params: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], label: str
) -> Any:
    """Run a piece's forward called inside a backward: a recomputation of a call seen, else refused."""
    if not CALLS.take(params, inputs):
        raise ClipOnceError(
            f"{label} runs its forward inside a backward on inputs that no earlier call of it had\n"
            "  why: only a recomputation of a call of this step (activation checkpointing) may run there; another "
            "call holds rows not known to be the same samples, and its gradient would be clipped as theirs\n"
            "  fix: call the compiled module in the forward pass only; checkpoint it with torch.utils.checkpoint"
        )
    backwards.open_backward(finalize)
    outputs = compiled(*args)
    backwards.nested_in_this_backward(outputs)
    return outputs
