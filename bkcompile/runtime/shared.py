"""Tensors one piece hands to the next that hold no sample's data (position ids of shape (1, T)).

After a graph break, the resumed graph receives the earlier graph's locals as inputs. Some are the same for
every sample: transformers' ``position_ids = cache_position.unsqueeze(0)`` (shape (1, T), broadcast over the
batch), built from ``arange`` of the sequence length. Classified by shape alone, such an input looks like a
per-sample input whose batch size is wrong, and the graph is refused.

Provenance decides instead, never the shape: when a piece is compiled, :func:`shared_outputs` finds the
outputs of its dynamo graph into which no per-sample data flows (a dependency walk from its inputs: the
batch and every other non-parameter tensor input are data; a size query of a tensor is not, since every
sample has the batch's shape) and that need no gradient (a function of the parameters passed on would carry
a gradient summed over the samples back into them). At run time the piece tags those outputs
(:func:`tagging`). A graph compiled with a tagged tensor input classifies it as shared (:func:`is_shared`),
and checks on every call that the tensor there is still tagged (:func:`checking`): dynamo's guards check
shapes, not where a tensor came from.
A (1, T) tensor cut from the batch (``ids[:1]``) is never tagged and stays a per-sample input (refused when
its batch size disagrees).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from bkcompile.errors import PrivacyError, run_error

_TAG = "_bk_shared"
_SIZE_METHODS = frozenset({"size", "dim", "stride", "numel"})


def _size_query(node: torch.fx.Node) -> bool:
    """A node that reads a tensor's shape, not its values."""
    if node.op == "call_method":
        return node.target in _SIZE_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return node.args[1] in ("shape", "ndim", "dtype", "device")
        return node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default)
    return False


def shared_outputs(gm: torch.fx.GraphModule, data: Sequence[bool]) -> tuple[int, ...]:
    """The indices of the graph's outputs (tensors) that no input marked as ``data`` flows into."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    tainted = {node for node, is_data in zip(placeholders, data, strict=True) if is_data}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or _size_query(node):
            continue
        if any(source in tainted for source in node.all_input_nodes):
            tainted.add(node)
    outputs = gm.graph.output_node().args[0]
    return tuple(
        k
        for k, value in enumerate(outputs)
        if isinstance(value, torch.fx.Node)
        and value not in tainted
        and isinstance(value.meta.get("example_value"), torch.Tensor)
        and not value.meta["example_value"].requires_grad  # a parameter's function carries a gradient back
        and value.op != "placeholder"  # an input passed through keeps its own provenance
    )


def is_shared(example: Any) -> bool:
    return isinstance(example, torch.Tensor) and getattr(example, _TAG, False) and not example.requires_grad


def tagging(compiled: Callable, indices: tuple[int, ...]) -> Callable:
    """``compiled`` with its outputs at ``indices`` tagged as holding no sample's data."""
    if not indices:
        return compiled

    def run(*args: Any) -> Any:
        outputs = compiled(*args)
        for k in indices:
            setattr(outputs[k], _TAG, True)
        return outputs

    return run


def checking(compiled: Callable, indices: list[int], names: Sequence[str], label: str) -> Callable:
    """``compiled`` refusing a call whose inputs at ``indices`` (shared when compiled) are not tagged."""
    if not indices:
        return compiled
    checks = list(zip(indices, names))

    def run(*args: Any) -> Any:
        for k, name in checks:
            if not is_shared(args[k]):
                raise run_error(
                    PrivacyError,
                    f"{label} was compiled with input {name!r} shared by every sample (computed without sample data "
                    "in an earlier bk_dp graph), but this call passes a tensor that no bk_dp graph computed so",
                    "a tensor of the same shape may hold a sample's data, which every row would then see",
                    "compute it inside the compiled model from sizes and constants (e.g. torch.arange of the "
                    "sequence length), or pass a per-sample tensor with the batch on dim 0",
                )
        return compiled(*args)

    return run
