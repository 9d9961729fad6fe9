"""The privatizing pipeline over the aten joint (forward + backward) graph.

Passes run in order on one :class:`PassState`; each is a plain function ``pass(state) -> None``:

1. ``batch_axis``  every value gets a fact: batched on dim k / replicated / reduced (the op laws, ops/)
2. ``sites``       the op that reduces per-sample values into each parameter gradient (sites.py)
3. ``loss_scale``  how the loss reduces over the batch: the per-sample scale s (loss.py)
4. ``groups``      the clipping groups and their thresholds, a clip state in the model's step ledger (groups.py)
5. ``cost``        per parameter, ghost or explicit norms by the options and the cost model (cost.py)
6. ``clipping``    per-sample norms, clip factors, C-weighted reductions (clip.py)

A graph that is one piece of the model (``pieces.GraphRole``: a graph break, regional compilation) runs
``PIECE_PIPELINE``: its outputs must not mix samples, and instead of clipping it hands its per-sample
gradients to the clip at the end of the backward (pieces.py, ``bkcompile.deferred``).

Invariants after each pass: the graph lints, every node keeps a valid ``meta["val"]``, and no pass
adds aliasing. A pass that cannot prove privacy raises a :class:`bkcompile.errors.PrivacyError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from bkcompile.passes.batch_axis import JointGraph, analyze, backward_nodes
from bkcompile.passes.clip import acc_dtype, clip_single_sample, insert_clipping, trainable_grads
from bkcompile.passes.cost import ParamPlan, backward_flops, choose, hints
from bkcompile.passes.facts import Batched, Fact, same, to_expr
from bkcompile.passes.groups import Grouping, clip_groups
from bkcompile.passes.loss import LossScale, find_loss_scale
from bkcompile.passes.pieces import WHOLE, GraphRole, defer_clipping, defer_single_sample, refuse_batch_outputs
from bkcompile.passes.sites import ParamGrad, find_sites

from bkcompile.errors import PrivacyError
from bkcompile.norms import ClipState
from bkcompile.options import BKOptions

# The backend's way to the model's step ledger: the shared clip state of a graph's clipping groups.
ClipStates = Callable[[Grouping], ClipState]


@dataclasses.dataclass
class PassState:
    joint: JointGraph
    options: BKOptions
    names: list[str]
    fake_mode: Any
    clip_states: ClipStates
    role: GraphRole = WHOLE
    params: list[ParamGrad] = dataclasses.field(default_factory=list)
    scale: LossScale | None = None
    plans: list[ParamPlan] = dataclasses.field(default_factory=list)
    backward_flops: float = 0.0  # of the ordinary backward's matrix products and convolutions
    hints: dict = dataclasses.field(default_factory=dict)  # shape symbols -> their compiled values
    norm_dtype: torch.dtype = torch.float32  # what the per-sample norms accumulate in
    grouping: Grouping | None = None  # the clipping groups and their initial thresholds
    clip: ClipState | None = None  # the groups' clip state, in the model's step ledger


def _batch_axis(state: PassState) -> None:
    analyze(state.joint)


def _sites(state: PassState) -> None:
    state.params = find_sites(state.joint, state.names)


def _loss_scale(state: PassState) -> None:
    state.scale = find_loss_scale(state.joint, state.options)


def _cost(state: PassState) -> None:
    state.hints = hints(state.fake_mode)
    state.backward_flops = backward_flops(state.joint, backward_nodes(state.joint), state.hints)
    state.norm_dtype = acc_dtype(state.params)
    state.plans = choose(state.joint, state.params, state.options, state.hints, state.norm_dtype.itemsize)


def _clipping(state: PassState) -> None:
    strategies = {plan.param.param: plan.strategy for plan in state.plans}
    insert_clipping(
        state.joint,
        state.params,
        strategies,
        state.norm_dtype,
        state.scale,
        state.grouping,
        state.clip.key,
        state.options,
        state.fake_mode,
    )
    _sort(state)


def _sort(state: PassState) -> None:
    from torch._inductor.pattern_matcher import stable_topological_sort

    stable_topological_sort(state.joint.gm.graph)


def _groups(state: PassState) -> None:
    params = [name for _, name, _ in trainable_grads(state.joint, state.names)]
    devices = {
        name: str(p.meta["val"].device)
        for p, name in zip(state.joint.primals, state.names)
        if isinstance(p.meta["val"], torch.Tensor)
    }
    state.grouping = clip_groups(params, devices, state.options)
    if state.role.piece:
        return  # the groups of a piece join those of the other pieces at the end of the backward
    state.clip = state.clip_states(state.grouping)


def _single_sample(state: PassState) -> None:
    clip_single_sample(state.joint, state.names, state.grouping, state.clip.key, state.options, state.fake_mode)


def _batch_outputs(state: PassState) -> None:
    refuse_batch_outputs(state.joint, state.role)


def _defer(state: PassState) -> None:
    kept = defer_clipping(state)
    for plan in state.plans:  # what the piece keeps until the clip at the end of the backward
        if plan.param.param in kept:
            plan.reason = "deferred: ghost norm, site operands kept until the end of the backward"
        else:
            plan.strategy, plan.reason = "explicit", "deferred: per-sample gradients kept until the end of the backward"
    _sort(state)


PIPELINE: list[tuple[str, Callable[[PassState], None]]] = [
    ("batch_axis", _batch_axis),
    ("sites", _sites),
    ("loss_scale", _loss_scale),
    ("groups", _groups),
    ("cost", _cost),
    ("clipping", _clipping),
]
PIECE_PIPELINE: list[tuple[str, Callable[[PassState], None]]] = [
    ("batch_axis", _batch_axis),
    ("batch_outputs", _batch_outputs),
    ("sites", _sites),
    ("loss_scale", _loss_scale),
    ("groups", _groups),
    ("cost", _cost),
    ("defer", _defer),
]
# A graph specialised to a batch of exactly one sample (a static batch size of 1) cannot mix samples,
# and its layout does not say where the (size-one) sample axis went: it clips the whole gradient.
SINGLE_SAMPLE_PIPELINE: list[tuple[str, Callable[[PassState], None]]] = [
    ("groups", _groups),
    ("single_sample", _single_sample),
]
PIECE_SINGLE_SAMPLE_PIPELINE: list[tuple[str, Callable[[PassState], None]]] = [
    ("groups", _groups),
    ("defer_single_sample", defer_single_sample),
]


def _batch_size(primals: list[torch.fx.Node], facts: list[Fact], names: list[str]):
    batched = [(p, f, n) for p, f, n in zip(primals, facts, names) if isinstance(f, Batched)]
    if not batched:
        raise PrivacyError(
            "the compiled function has no per-sample tensor input, so there is no batch to clip over; "
            "pass the batch as a tensor argument (samples on dim 0)"
        )
    node, fact, _ = batched[0]
    batch = to_expr(node.meta["val"].shape[fact.dim])
    for other, other_fact, name in batched[1:]:
        size = to_expr(other.meta["val"].shape[other_fact.dim])
        if not same(size, batch):
            raise PrivacyError(
                f"input {name!r} has {size} rows on its batch dim but {names[primals.index(node)]!r} has "
                f"{batch}: every per-sample input needs the same batch size on dim {fact.dim}"
            )
    return batch, (node, fact.dim)


def privatize(
    gm: torch.fx.GraphModule,
    num_fwd_outputs: int,
    input_facts: list[Fact],
    trainable: list[bool],
    names: list[str],
    options: BKOptions,
    fake_mode: Any,
    clip_states: ClipStates,
    role: GraphRole = WHOLE,
) -> PassState:
    """Run the pipeline on a joint graph in place; return what the passes found."""
    primals = [n for n in gm.graph.nodes if n.op == "placeholder" and not n.name.startswith("tangents")]
    if len(primals) != len(input_facts):
        raise PrivacyError(
            f"the joint graph has {len(primals)} inputs but the model has {len(input_facts)}: inputs that "
            "alias each other or are mutated in place are not supported"
        )
    batch, source = _batch_size(primals, input_facts, names)
    joint = JointGraph(gm, num_fwd_outputs, input_facts, trainable, batch, source)
    state = PassState(joint, options, names, fake_mode, clip_states, role)
    if role.piece:
        pipeline = PIECE_SINGLE_SAMPLE_PIPELINE if batch == 1 else PIECE_PIPELINE
    else:
        pipeline = SINGLE_SAMPLE_PIPELINE if batch == 1 else PIPELINE
    for _, run in pipeline:
        run(state)
        gm.graph.lint()
    gm.recompile()
    return state
