"""Joint graphs of small functions, traced by aot_autograd as the backend receives them, for per-pass tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch._inductor.pattern_matcher  # noqa: F401  (the clipping pass imports it: ~2 s once, not per test)
from bkcompile.passes import PIPELINE, PassState
from bkcompile.passes.driver import run_passes
from bkcompile.passes.facts import REPLICATED, Batched
from bkcompile.passes.joint import GraphInput, InputKind, joint_graph
from functorch.compile import aot_function, make_boxed_func
from torch._functorch.partitioners import default_partition

from bkcompile.compiler.options import parse_options
from bkcompile.plan import GraphPlan
from bkcompile.policy import ClipPolicy
from bkcompile.runtime.ledger import GraphRecord


def capture(fn: Callable, params: dict[str, torch.Tensor], *batch: torch.Tensor) -> tuple[Any, Any]:
    """(JointGraph, fake mode) of ``fn(*params.values(), *batch)``: the parameters are trainable inputs
    named by ``params``' keys, the batch tensors hold samples on dim 0."""
    captured = {}

    def partition(joint, joint_inputs, *, num_fwd_outputs, **kwargs):
        captured.update(gm=joint, num_fwd_outputs=num_fwd_outputs)
        return default_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)

    boxed = lambda gm, _: make_boxed_func(gm.forward)  # noqa: E731
    aot_function(fn, fw_compiler=boxed, bw_compiler=boxed, partition_fn=partition)(*params.values(), *batch)
    inputs = tuple(
        GraphInput(name, f"params[{name!r}]", InputKind.PARAMETER, REPLICATED, p.requires_grad)
        for name, p in params.items()
    ) + tuple(GraphInput(f"x{i}", f"batch[{i}]", InputKind.SAMPLES, Batched(0), False) for i in range(len(batch)))
    gm = captured["gm"]
    fake_mode = torch._guards.detect_fake_mode([n.meta["val"] for n in gm.graph.find_nodes(op="placeholder")])
    return joint_graph(gm, captured["num_fwd_outputs"], inputs), fake_mode


def run_until(last: str, fn: Callable, params: dict, *batch: torch.Tensor, **options: Any) -> PassState:
    """The state after the pipeline's passes up to ``last`` (included) on the joint graph of ``fn``."""
    joint, fake_mode = capture(fn, params, *batch)
    names = [p.name for p in PIPELINE]
    indices = tuple(range(len(params)))
    record = GraphRecord(indices, tuple(params))  # what the backend makes for the graph: its ops find it by key
    parsed = parse_options({"max_grad_norm": 1.0, **options})
    state = PassState(joint, parsed, fake_mode, record.key)
    state = run_passes(PIPELINE[: names.index(last) + 1], state, joint.gm, check=True)
    if state.grouping is not None:
        record.plan = GraphPlan("the whole model", ClipPolicy.of(parsed), state.grouping)
        record.state = record.clip_of(list(params.values())).state
    joint.gm.bk_record = record  # the graph holds its record (the table of records holds it weakly)
    return state


def node(state: PassState, target: Any) -> torch.fx.Node:
    """The one node of the joint graph that calls ``target``."""
    (found,) = state.joint.gm.graph.find_nodes(op="call_function", target=target)
    return found
