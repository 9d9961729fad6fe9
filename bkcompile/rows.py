"""Rows between pieces: the deferred clip adds row i of every piece's per-sample gradients as sample i's.

That holds when each piece's batched inputs come from the data, or from another piece's outputs through
eager code that keeps every row where it is (elementwise maths, dtype casts, views). Each piece's forward
therefore marks its outputs' autograd nodes, and checks, before it runs, the autograd history of each of
its batched inputs back to a piece's output or a leaf: any other op (an index or a permutation of the
batch, a mean over it, a concatenation, an eager layer) is refused, naming the op.

A piece whose forward runs again inside a backward (activation checkpointing) is refused too: a reentrant
recomputation's backward is an autograd backward of its own, whose end would clip that piece alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.fsdp._fully_shard._fsdp_param_group import RegisterPostBackwardFunction

from bkcompile.errors import PrivacyError

_MARK = "bkcompile_piece"
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
# Autograd functions that are the identity on their tensors (by class): FSDP2's hook on a sharded block's
# inputs, whose backward runs the block's post-backward (the reduce-scatter) and passes the gradients on.
_IDENTITIES = (RegisterPostBackwardFunction._backward_cls,)


def mark_outputs(outputs: Any, label: str) -> None:
    for value in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
        if isinstance(value, torch.Tensor) and value.grad_fn is not None:
            value.grad_fn.metadata[_MARK] = label


def check_inputs(inputs: Sequence[Any], batched: list[int], label: str) -> None:
    """Refuse a batched input computed by eager code that may move or mix rows since a piece or the data."""
    stack = [inputs[i].grad_fn for i in batched if isinstance(inputs[i], torch.Tensor)]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen or _MARK in node.metadata or node.name() == _LEAF:
            continue
        seen.add(id(node))
        if node.name() not in _ROW_WISE and not isinstance(node, _IDENTITIES):
            raise PrivacyError(
                f"{label} takes a batch computed outside the bk_dp graphs by {node.name()}\n"
                "  why: the graphs of one backward are clipped together row by row, so row i of every graph's "
                "batch must be sample i; this op may move or mix rows (or is an eager layer)\n"
                "  fix: compile that code too (into a bk_dp graph), or keep only elementwise maths between "
                "the compiled modules"
            )
        stack.extend(next_node for next_node, _ in node.next_functions)


def guard(compiled: Callable, batched: list[int], label: str) -> Callable:
    """``compiled`` (a piece's forward, as dynamo calls a backend's result) with its inputs checked and its
    outputs marked."""

    def run(*args: Any) -> Any:
        if torch.is_grad_enabled() and torch._C._current_graph_task_id() >= 0:
            raise PrivacyError(
                f"{label} runs its forward again inside a backward (activation checkpointing)\n"
                "  why: a recomputed piece's backward may run in an autograd backward of its own (reentrant "
                "checkpointing), whose end would clip that piece alone\n"
                "  fix: do not checkpoint a module compiled in pieces, or compile the model as one graph"
            )
        check_inputs(args, batched, label)
        outputs = compiled(*args)
        mark_outputs(outputs, label)
        return outputs

    return run
