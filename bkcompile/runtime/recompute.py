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
the same data pointer, shape and strides). ``bkcompile.runtime.backwards.CALLS`` keeps the batched inputs of the
calls made since the last backward of pieces ended (weakly: a call whose inputs are gone can no longer be
recomputed) and lets each be recomputed once. A forward inside a backward that matches no such call (another
call, or a call of an earlier step) is a second call on rows not known to be the same samples, and is
refused. (Two forwards before their two backwards, ``a = cm(x); b = cm(y); a.backward(); b.backward()``:
the first backward's end forgets the second call, whose recomputation is then refused.)

An accepted recomputation's backward, when it runs in a nested graph task, belongs to the backward that
recomputed it: ``bkcompile.runtime.backwards`` maps the nested task to it, so its pieces are clipped with the
others, once, at the end of the outer backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from bkcompile.errors import ClipOnceError, run_error
from bkcompile.runtime import backwards
from bkcompile.runtime.deferred import finalize


def recomputed(
    compiled: Callable, args: Sequence[Any], params: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], label: str
) -> Any:
    """Run a piece's forward called inside a backward: a recomputation of a call seen, else refused."""
    if not backwards.CALLS.take(params, inputs):
        raise run_error(
            ClipOnceError,
            f"{label} runs its forward inside a backward on inputs that no earlier call of it had",
            "only a recomputation of a call of this step (activation checkpointing) may run there; another call "
            "holds rows not known to be the same samples, and its gradient would be clipped as theirs",
            "call the compiled module in the forward pass only; checkpoint it with torch.utils.checkpoint",
        )
    backwards.open_backward(finalize)
    outputs = compiled(*args)
    backwards.nested_in_this_backward(outputs)
    return outputs
