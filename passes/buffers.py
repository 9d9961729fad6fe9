"""Module state written from the batch: a buffer whose new value depends on a sample input is refused.

A buffer (BatchNorm's running statistics, an EMA of activations, a step counter over rows) outlives the
step: what the graph writes into it reaches ``state_dict()`` and every later step with no clip and no
noise. aot_autograd keeps a mutation hidden from autograd in the graph (``copy_`` into the primal) and returns
the others' new values as the first forward outputs (``fw_metadata.mutated_inp_runtime_indices``); the
new value of a STATE input may not depend on
any SAMPLES input, whatever the batch size (a graph of one sample included: it skips the batch-axis
analysis, and one sample's data in a buffer is that sample's data un-noised). A counter of rows depends on
the batch size, which Poisson sampling makes private too.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from bkcompile.passes.joint import InputKind, JointGraph
from torch._guards import TracingContext

from bkcompile.errors import SampleMixingError, node_error


def _mutated_inputs(joint: JointGraph) -> list[tuple[int, object]]:
    """(index of the mutated input, the node of its new value): the in-graph ``copy_`` into a primal that
    aot_autograd keeps for a mutation hidden from autograd (a buffer written under no_grad), and the forward
    outputs it returns for the others (``fw_metadata.mutated_inp_runtime_indices``, when it is known)."""
    position = {node: i for i, node in enumerate(joint.primals)}
    found = [
        (position[node.args[0]], node.args[1])
        for node in joint.gm.graph.find_nodes(op="call_function", target=torch.ops.aten.copy_.default)
        if node.args[0] in position
    ]
    context = TracingContext.try_get()
    metadata = getattr(context, "fw_metadata", None) if context is not None else None
    if metadata is not None:
        indices = list(metadata.mutated_inp_runtime_indices)
        found += list(zip(indices, joint.forward_outputs[: len(indices)]))
    return found


def _depends_on(value: torch.fx.Node, sources: set[torch.fx.Node]) -> bool:
    seen: set[torch.fx.Node] = set()
    stack = [value]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in sources:
            return True
        stack.extend(node.all_input_nodes)
    return False


def refuse_buffer_writes(joint: JointGraph) -> None:
    """Refuse a module-state input (a buffer) whose new value depends on the batch."""
    samples = {p for p, i in zip(joint.primals, joint.inputs) if i.kind is InputKind.SAMPLES}
    for index, value in _mutated_inputs(joint):
        graph_input = joint.inputs[index] if index < len(joint.inputs) else None
        if graph_input is None or graph_input.kind is not InputKind.STATE or not isinstance(value, torch.fx.Node):
            continue
        if _depends_on(value, samples):
            writer = value.args[0] if value.target is operator.getitem else value  # a norm's running statistics
            raise node_error(
                SampleMixingError,
                writer,
                f"it writes the buffer {graph_input.name!r} from the batch (running statistics, an average or a "
                "count of its rows): the buffer keeps the samples' data past the step, in state_dict() and in "
                "later steps, with no clip and no noise (at every batch size, one sample included)",
                "compute the statistic per sample inside the forward instead of storing it (GroupNorm or "
                "LayerNorm for BatchNorm), stop tracking it (track_running_stats=False) or freeze it "
                "(module.eval()), or update it outside training from public data",
            )
