"""Rows between pieces: the deferred clip adds row i of every piece's per-sample gradients as sample i's.

That holds when each piece's batched inputs come from the data, or from another piece's outputs through
eager code that keeps every row where it is (elementwise maths, dtype casts, views). Each piece's forward
therefore marks its outputs' autograd nodes, and checks, before it runs, the autograd history of each of
its batched inputs back to a piece's output or a leaf: any other op (an index or a permutation of the
batch, a mean over it, a concatenation, an eager layer) is refused, naming the op. A batch computed from a
``PackedSequence`` (``pack_padded_sequence``, which dynamo does not trace) is refused naming the packing's line,
found in the frame dynamo resumed after it, and the padded recipe that trains.

A piece whose forward runs again inside a backward must be the recomputation of a call seen before
(activation checkpointing, ``bkcompile.runtime.recompute``). The output of a reentrant checkpoint
(``CheckpointFunctionBackward``) was computed under ``no_grad``, so its history is checked when the
checkpoint recomputes it in the backward, before that recomputation's backward runs.
"""

from __future__ import annotations

import re
import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.fsdp._fully_shard._fsdp_param_group import RegisterPostBackwardFunction
from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
from torch.nn.utils.rnn import PackedSequence

from bkcompile.errors import NotSupportedYetError, PrivacyError, run_error
from bkcompile.runtime import backwards, recompute
from bkcompile.runtime.batch import mark_batch_dynamic
from bkcompile.runtime.ledger import parameter_of

_MARK = "bkcompile_piece"
_ALIAS = "bkcompile_piece_output"  # (a detached alias of the piece's output, its version when produced)
# Autograd nodes of eager ops that keep row i of their result a function of row i of their operands.
_ROW_WISE = frozenset(
    f"{name}Backward{k}"
    for name in (
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Neg",
        "Tanh",
        "Sigmoid",
        "Relu",
        "Gelu",
        "Silu",
        "Exp",
        "Log",
        "Pow",
        "Clone",
        "ToCopy",
        "Alias",
        "View",
        "UnsafeView",
        "NativeDropout",
    )
    for k in (0, 1)
)
_LEAF = "torch::autograd::AccumulateGrad"
_CHECKPOINT = "CheckpointFunctionBackward"
_PACKED = "PackPaddedSequenceBackward0"  # torch.nn.utils.rnn.pack_padded_sequence
_RESUME = re.compile(r"torch_dynamo_resume_in_\w+?_at_(?P<line>\d+)$")  # dynamo's code after a graph break
# Autograd functions that are the identity on their tensors (by class): FSDP2's hook on a sharded block's
# inputs, whose backward runs the block's post-backward (the reduce-scatter) and passes the gradients on.
_IDENTITIES = (RegisterPostBackwardFunction._backward_cls,)
# Gradient hooks that return the gradient as they receive it (by function): FSDP2's pre-backward hook on a
# sharded module's outputs, which all-gathers the module's parameters for its backward.
_IDENTITY_HOOKS = (FSDPState._pre_backward,)


def _identity_hook(hook: Any) -> bool:
    return getattr(hook, "__func__", None) in _IDENTITY_HOOKS and isinstance(hook.__self__, FSDPState)


def mark_outputs(outputs: Any, label: str, unbacked: int | None = None) -> None:
    """Mark the outputs' autograd nodes as a piece's; with ``unbacked`` (the batch size of inputs marked by
    :func:`bkcompile.runtime.batch.mark_batch_dynamic`), mark the outputs with that many rows too, so that the next
    piece sees the same batch symbol on them as on the data it receives directly."""
    for value in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
        if isinstance(value, torch.Tensor) and value.grad_fn is not None:
            value.grad_fn.metadata[_MARK] = label
            # a detached alias shares the output's version counter (not its autograd node: no cycle)
            value.grad_fn.metadata[_ALIAS] = (value.detach(), value._version)
        if unbacked is not None and isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == unbacked:
            mark_batch_dynamic(value)


def _refuse_written(label: str, what: str, where: str) -> PrivacyError:
    return run_error(
        PrivacyError,
        f"{label} takes a batch {what} {where}",
        "the graphs of one backward are clipped together row by row; an in-place write or a gradient hook "
        "between them is outside autograd's record, so bkcompile cannot prove that it keeps rows per sample "
        "(h.add_(h.flip(0)) under torch.no_grad() mixes them unseen)",
        "write it out of place (h = h + ...), or compile that code into the bk_dp graphs; register gradient "
        "hooks on the loss or the parameters, not on tensors passed between compiled modules",
    )


def _check_tensor(value: torch.Tensor, label: str) -> None:
    """A tensor passed to a piece: no in-place write since it was computed, no gradient hook on it (but FSDP2's
    own pre-backward hook on a sharded module's output, the identity on the gradient)."""
    if value._backward_hooks and not all(map(_identity_hook, value._backward_hooks.values())):
        raise _refuse_written(label, "with a gradient hook (Tensor.register_hook)", "on a tensor between the graphs")
    node = value.grad_fn
    recorded = node.metadata.get(_ALIAS) if node is not None else None
    if recorded is not None:
        moved = value._version != recorded[1]
    else:  # computed by eager autograd ops: written in place if its version moved (an identity such as FSDP2's
        # hook returns aliases of a piece's outputs, whose versions the walk compares with the piece's record)
        moved = node is not None and not isinstance(node, _IDENTITIES) and value._version > 0
    if moved:
        raise _refuse_written(label, "written in place", "after it was computed (an in-place op, under no_grad too)")


_BINARY = frozenset(f"{name}Backward{k}" for name in ("Add", "Sub", "Mul", "Div", "Pow") for k in (0, 1))
_DATA: dict[tuple[torch.device, int], weakref.ref] = {}  # the memory of the data the pieces received


def note_data(values: Sequence[Any]) -> None:
    """The batched inputs of a piece that no autograd op computed (the data itself: ids, a mask)."""
    for stale in [k for k, ref in _DATA.items() if ref() is None]:
        del _DATA[stale]
    for value in values:
        real = isinstance(value, torch.Tensor) and not is_fake(value)  # DDP's compiler runs pieces on fakes
        if real and value.grad_fn is None and not value.requires_grad and value.numel():
            _DATA[(value.device, value.untyped_storage().data_ptr())] = weakref.ref(value)


def _is_data(value: Any) -> bool:
    if not isinstance(value, torch.Tensor) or is_fake(value) or not value.numel():
        return False
    found = _DATA.get((value.device, value.untyped_storage().data_ptr()))
    return found is not None and found() is not None


def _untraced_operand(node: Any) -> str | None:
    """For a binary op with an operand outside autograd's record (a detached value, a buffer, a constant, a
    Python number): why it is refused, unless the operand is data a piece received (mul/div by a mask).
    Add and sub keep no operand to look at; mul and div keep the one the other's gradient needs."""
    edges = [edge for edge, _ in node.next_functions]
    missing = [i for i, edge in enumerate(edges) if edge is None]
    if not missing or node.name() not in _BINARY:
        return None
    if any(edge is not None and edge.name() == _LEAF for edge in edges):
        return None  # a parameter used eagerly: the ledger refuses it, naming the parameter, in the backward
    if node.name().startswith(("Mul", "Div")) and len(missing) == 1:
        try:
            operand = getattr(node, "_saved_other" if missing[0] == 1 else "_saved_self")
        except (AttributeError, RuntimeError):
            operand = None
        if _is_data(operand):
            return None
    return (
        f"{node.name()}, with an operand outside autograd's record (a detached value such as "
        "h.detach().mean(0), a buffer, a cached tensor, a constant or a Python number)"
    )


def check_inputs(inputs: Sequence[Any], batched: list[int], label: str) -> None:
    """Refuse a batched input computed by eager code that may move or mix rows since a piece or the data, or
    written in place (its version counter, or that of a piece's output it was computed from, moved)."""
    tensors = [inputs[i] for i in batched if isinstance(inputs[i], torch.Tensor)]
    for value in tensors:
        _check_tensor(value, label)
    stack = [value.grad_fn for value in tensors]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or node.name() == _LEAF:
            continue
        if _MARK in node.metadata:
            alias, version = node.metadata[_ALIAS]
            if alias._version != version:
                raise _refuse_written(
                    label, "computed from a graph's output", f"that was written in place ({node.metadata[_MARK]})"
                )
            continue
        seen.add(id(node))
        if node.name() == _CHECKPOINT:
            _check_when_recomputed(node, label)
        elif node.name() not in _ROW_WISE and not isinstance(node, _IDENTITIES) or _untraced_operand(node):
            where = _resumed_with_packed()
            if where is not None or _packed(node):
                raise _refuse_packed(label, where or "an unknown line")
            raise run_error(
                PrivacyError,
                f"{label} takes a batch computed outside the bk_dp graphs by {_untraced_operand(node) or node.name()}",
                "the graphs of one backward are clipped together row by row, so row i of every graph's batch must "
                "be sample i; this op may move or mix rows (or is an eager layer), and bkcompile passes only what "
                "it can prove between the graphs",
                "compile that code too (into a bk_dp graph), or keep only elementwise maths of the graphs' outputs "
                "and the data between the compiled modules",
            )
        stack.extend(next_node for next_node, _ in node.next_functions)


def _packed(node: Any) -> bool:
    """Whether ``node``'s history holds ``pack_padded_sequence`` (of a batch that needs a gradient)."""
    stack, seen = [node], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or _MARK in node.metadata:
            continue
        if node.name() == _PACKED:
            return True
        seen.add(id(node))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _resumed_with_packed() -> str | None:
    """Where the running model left its graph at ``pack_padded_sequence``: the outermost frame that dynamo resumed
    after a graph break holding a PackedSequence (``file:line`` of the break), else None."""
    frame, where = sys._getframe(), None
    while frame is not None:
        resumed = _RESUME.match(frame.f_code.co_name)
        values = list(frame.f_locals.values()) if resumed is not None else []
        values += [v for value in values if isinstance(value, (tuple, list)) for v in value]
        if any(isinstance(value, PackedSequence) for value in values):
            where = f"{frame.f_code.co_filename}:{resumed['line']}"
        frame = frame.f_back
    return where


def _refuse_packed(label: str, where: str) -> NotSupportedYetError:
    return run_error(
        NotSupportedYetError,
        f"torch.nn.utils.rnn.pack_padded_sequence at {where}: {label} takes a batch computed from a PackedSequence",
        "dynamo does not trace pack_padded_sequence (its rows are the samples sorted by length, each step's batch "
        "size read from the lengths on the CPU: data-dependent shapes), so the packing and the recurrent layer on it "
        "run eagerly, outside the bk_dp graphs, where nothing proves per-sample gradients",
        "run the layer on the padded batch and read each sample's last valid step (a forward layer's output there "
        "never reads the padding): `out, _ = self.rnn(x)` then `last = out[torch.arange(x.shape[0]), lengths - 1]`",
    )


def _check_when_recomputed(node: Any, label: str) -> None:
    """A reentrant checkpoint's output: check the rows of what its function computes when the checkpoint's
    backward recomputes it (its inputs are then detached leaves, so the walk ends at them or at pieces)."""
    run_function = node.run_function
    if getattr(run_function, "_bk_checked", False):
        return

    def checked(*args: Any) -> Any:
        outputs = run_function(*args)
        values = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        check_inputs(values, list(range(len(values))), f"{label} (through a checkpoint)")
        return outputs

    checked._bk_checked = True
    node.run_function = checked


def guard(compiled: Callable, batched: list[int], params: list[int], label: str) -> Callable:
    """``compiled`` (a piece's forward, as dynamo calls a backend's result) with its inputs checked and its
    outputs marked; run inside a backward, it must recompute a call seen (``bkcompile.runtime.recompute``)."""

    def run(*args: Any) -> Any:
        inputs = [args[i] for i in batched if isinstance(args[i], torch.Tensor)]
        weights = [parameter_of(args[i]) for i in params]  # the parameters behind the ledger's taps
        note_data(inputs)
        check_inputs(args, batched, label)
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() >= 0:
            outputs = recompute.recomputed(compiled, args, weights, inputs, label)
        else:
            backwards.CALLS.seen(weights, inputs)
            outputs = compiled(*args)
        first = inputs[0] if inputs else None
        unbacked = first.shape[0] if first is not None and 0 in getattr(first, "_dynamo_unbacked_indices", ()) else None
        mark_outputs(outputs, label, unbacked)
        return outputs

    return run
