"""The joint graph the passes work on, its inputs, and the role of each placeholder and output.

aot_autograd's joint graph takes the primals (one per input of dynamo's graph: parameters, buffers,
the batch) then the tangents (one per differentiable forward output), and returns the
``num_fwd_outputs`` forward outputs then one gradient per primal (None where there is none). Roles
come from these counts, which aot_autograd gives the partitioner, never from node names.
"""

from __future__ import annotations

import dataclasses
import enum

import sympy
import torch
import torch.fx
from bkcompile.passes.facts import Batched, Fact, same, to_expr
from bkcompile.passes.ops import FactOut

from bkcompile.errors import PrivacyError, node_error


class InputKind(enum.Enum):
    PARAMETER = "parameter"  # an nn.Parameter (trainable when it requires grad)
    STATE = "state"  # a buffer, a module attribute, a global: the same for every sample
    SAMPLES = "samples"  # a tensor argument of the compiled function: the batch
    OTHER = "other"  # a size, a 0-dim tensor, a Python number


@dataclasses.dataclass(frozen=True)
class GraphInput:
    """One input of the compiled graph, as the backend classified it."""

    name: str  # a parameter's or buffer's name in the model ("layers.0.fc.weight"), else the graph's name
    source: str  # where dynamo found it, e.g. ``L['self']._modules['fc']._parameters['weight']``
    kind: InputKind
    fact: Fact  # batched on ``options.batch_dim`` for samples, else replicated
    trainable: bool  # a parameter whose gradient is clipped


@dataclasses.dataclass
class JointGraph:
    """The joint graph with its inputs and what the passes know about it."""

    gm: torch.fx.GraphModule
    num_fwd_outputs: int
    inputs: tuple[GraphInput, ...]  # one per primal, in order
    batch: sympy.Expr  # the batch size B (symbolic when dynamic)
    batch_source: tuple[torch.fx.Node, int] | None = None  # an input holding B on one of its dims
    facts: dict[torch.fx.Node, FactOut] = dataclasses.field(default_factory=dict)  # the batch_axis pass's

    @property
    def placeholders(self) -> list[torch.fx.Node]:
        return list(self.gm.graph.find_nodes(op="placeholder"))

    @property
    def primals(self) -> list[torch.fx.Node]:
        return self.placeholders[: len(self.inputs)]

    @property
    def tangents(self) -> list[torch.fx.Node]:
        return self.placeholders[len(self.inputs) :]

    @property
    def outputs(self) -> list:
        return list(self.gm.graph.output_node().args[0])

    @property
    def forward_outputs(self) -> list:
        return self.outputs[: self.num_fwd_outputs]

    @property
    def gradient_outputs(self) -> list:
        """One per primal: the node of its gradient, or None."""
        return self.outputs[self.num_fwd_outputs :]


def _batch_size(primals: list[torch.fx.Node], inputs: tuple[GraphInput, ...]):
    batched = [(node, i) for node, i in zip(primals, inputs, strict=True) if isinstance(i.fact, Batched)]
    if not batched:
        raise node_error(
            PrivacyError,
            None,
            "the compiled function has no per-sample tensor input, so there is no batch to clip over",
            "pass the batch as a tensor argument (samples on dim 0)",
        )
    node, first = batched[0]
    batch = to_expr(node.meta["val"].shape[first.fact.dim])
    for other, graph_input in batched[1:]:
        size = to_expr(other.meta["val"].shape[graph_input.fact.dim])
        if not same(size, batch):
            raise node_error(
                PrivacyError,
                other,
                f"input {graph_input.name!r} has {size} rows on its batch dim but {first.name!r} has {batch}",
                f"give every per-sample input the same batch size on dim {first.fact.dim}",
            )
    return batch, (node, first.fact.dim)


def joint_graph(gm: torch.fx.GraphModule, num_fwd_outputs: int, inputs: tuple[GraphInput, ...]) -> JointGraph:
    """aot_autograd's joint graph ``gm`` with the records of its primals; finds the batch size B."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    primals = len(gm.graph.output_node().args[0]) - num_fwd_outputs  # one gradient output per primal
    if primals != len(inputs) or len(placeholders) < primals:
        raise node_error(
            PrivacyError,
            None,
            f"the joint graph has {primals} inputs but the model has {len(inputs)}",
            "do not pass inputs that alias each other or are mutated in place",
        )
    batch, source = _batch_size(placeholders[:primals], inputs)
    return JointGraph(gm, num_fwd_outputs, inputs, batch, source)
