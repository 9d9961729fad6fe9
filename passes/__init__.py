"""The privatizing pipeline over the aten joint (forward + backward) graph.

Named passes run in order (``driver.run_passes``); each takes the :class:`PassState` and returns it with
what it produces:

1. ``batch_axis``  ``joint.facts``: every value batched on dim k / replicated / reduced (batch_axis.py, ops/)
2. ``sites``       ``params``: each parameter's gradient and the ops reducing samples into it (sites.py)
3. ``loss_scale``  ``scale``: how the loss reduces over the batch, the per-sample scale s, or unset: a loss
                   computed outside with no ``loss_reduction``, which the backend refuses after the report (loss.py)
4. ``groups``      ``grouping``: clipping groups (by graph input) and their thresholds, by the clipping policy
                   (groups.py, ``bkcompile.policy``)
5. ``cost``        ``cost``: per parameter, ghost or explicit norms by the options and the cost model (cost.py)
6. ``clipping``    the graph: per-sample norms, clip factors, C-weighted reductions (clip.py), each group's
                   placed as soon as the backward has its norms (schedule.py)

A graph that is one piece of the model (``pieces.GraphRole``: a graph break, regional compilation) runs
``PIECE_PIPELINE``: its outputs must not mix samples, and instead of clipping it hands its per-sample
gradients to the clip at the end of the backward (pieces.py, ``bkcompile.runtime.deferred``).

:func:`privatize` returns the :class:`bkcompile.plan.GraphPlan` of the graph: its clipping groups, policy, piece
spec and report, which the graph's run-time record owns. The graph reaches its record at run time by the integer
``key`` the backend gives the pass.

Invariants after each pass (checked with the ``check_passes`` option): the graph lints, every node keeps
a valid ``meta["val"]``, and no pass adds aliasing. A pass that cannot prove privacy raises a
:class:`bkcompile.errors.PrivacyError` built by ``errors.node_error``; the driver names the pass in it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import bkcompile.passes.tracing  # noqa: F401  (registers the tracing kernels of ops that guard on the batch size)
import torch
import torch.fx
from bkcompile.passes.batch_axis import analyze, backward_nodes
from bkcompile.passes.buffers import refuse_buffer_writes
from bkcompile.passes.clip import acc_dtype, clip_single_sample, insert_clipping, trainable_grads
from bkcompile.passes.cost import (
    CostPlan,
    Reason,
    Strategy,
    backward_flops,
    choose,
    compiled_sizes,
    mixes,
    non_private_peak,
    other_seconds,
    resolve_budget,
    with_expected_batch,
)
from bkcompile.passes.driver import Pass, named, run_passes
from bkcompile.passes.groups import clip_groups
from bkcompile.passes.joint import GraphInput, JointGraph, joint_graph
from bkcompile.passes.loss import LossScale, find_loss_scale
from bkcompile.passes.pieces import WHOLE, GraphRole, defer_clipping, defer_single_sample, refuse_batch_outputs
from bkcompile.passes.report import build_report
from bkcompile.passes.schedule import appended, place_early
from bkcompile.passes.sites import ParamGrad, find_sites

from bkcompile.compiler.calibration import rates_for
from bkcompile.compiler.options import BKOptions
from bkcompile.errors import unset_loss_reduction
from bkcompile.plan import GraphPlan, Grouping, PieceSpec
from bkcompile.policy import ClipPolicy


@dataclasses.dataclass(frozen=True)
class PassState:
    """What the passes know about one joint graph; a field per pass, set when that pass has run."""

    joint: JointGraph
    options: BKOptions
    fake_mode: Any
    key: int  # the graph's run-time record, named in its calls of the run-time ops
    role: GraphRole = WHOLE  # the whole model, or one piece of it
    params: tuple[ParamGrad, ...] = ()  # sites
    scale: LossScale | None = None  # loss_scale
    grouping: Grouping | None = None  # groups: the clipping groups and their initial thresholds
    cost: CostPlan | None = None  # cost
    piece: PieceSpec | None = None  # defer: what a piece hands over to the clip at the end of the backward


def _batch_axis(state: PassState) -> PassState:
    return dataclasses.replace(state, joint=dataclasses.replace(state.joint, facts=analyze(state.joint)))


def _buffers(state: PassState) -> PassState:
    refuse_buffer_writes(state.joint)
    return state


def _batch_outputs(state: PassState) -> PassState:
    refuse_batch_outputs(state.joint, state.role)
    return state


def _sites(state: PassState) -> PassState:
    return dataclasses.replace(state, params=tuple(find_sites(state.joint)))


def _loss_scale(state: PassState) -> PassState:
    return dataclasses.replace(state, scale=find_loss_scale(state.joint, state.options))


def _groups(state: PassState) -> PassState:
    primals = state.joint.primals
    params = [(index, name, str(primals[index].meta["val"].device)) for index, name, _ in trainable_grads(state.joint)]
    return dataclasses.replace(state, grouping=clip_groups(params, ClipPolicy.of(state.options)))


def _cost(state: PassState) -> PassState:
    sizes = with_expected_batch(compiled_sizes(state.fake_mode), state.joint.batch, state.options)
    dtype = acc_dtype(state.params)
    # a piece holds its per-sample values until the end of the backward: its groups are not freed one by one
    names = state.joint.inputs
    groups = () if state.role.piece else tuple(tuple(names[m].name for m in g.members) for g in state.grouping.groups)
    backward = backward_nodes(state.joint)
    device = state.params[0].grad.meta["val"].device if state.params else torch.device("cpu")
    rates = rates_for(device, dtype)
    budget = resolve_budget(state.options, non_private_peak(state.joint, backward, sizes))
    plans = choose(state.joint, list(state.params), state.options, sizes, dtype.itemsize, rates, budget, groups)
    flops = backward_flops(state.joint, backward, sizes)
    groups = groups if len(groups) > 1 else ()
    other = other_seconds(state.joint, sizes, rates)
    chosen = mixes(plans, budget.bytes, groups)
    cost = CostPlan(tuple(plans), sizes, flops, other, dtype, rates, budget, groups, chosen)
    return dataclasses.replace(state, cost=cost)


def _sorted(state: PassState) -> PassState:
    from torch._inductor.pattern_matcher import stable_topological_sort

    stable_topological_sort(state.joint.gm.graph)
    return state


def _clipping(state: PassState) -> PassState:
    before = set(state.joint.gm.graph.nodes)
    insert_clipping(
        state.joint,
        list(state.cost.plans),
        state.cost.norm_dtype,
        state.scale,
        state.grouping,
        state.key,
        state.options,
        state.fake_mode,
    )
    if len(state.grouping.groups) > 1:  # one group's clip waits for every norm: it stays at the end
        place_early(state.joint, appended(state.joint.gm.graph, before))  # each group's clip as soon as its norms are
    return _sorted(state)


def _single_sample(state: PassState) -> PassState:
    clip_single_sample(state.joint, state.grouping, state.key, state.options, state.fake_mode)
    return state


def _defer(state: PassState) -> PassState:
    kept, piece = defer_clipping(state)
    for plan in state.cost.plans:  # what the piece keeps until the clip at the end of the backward
        if plan.param.index in kept:
            plan.reason = Reason.DEFERRED_GHOST
        else:
            plan.strategy, plan.reason = Strategy.EXPLICIT, Reason.DEFERRED
    return _sorted(dataclasses.replace(state, piece=piece))


def _defer_single_sample(state: PassState) -> PassState:
    return dataclasses.replace(state, piece=defer_single_sample(state))


PIPELINE: list[Pass[PassState]] = [
    Pass("buffers", _buffers),
    Pass("batch_axis", _batch_axis),
    Pass("sites", _sites),
    Pass("loss_scale", _loss_scale),
    Pass("groups", _groups),
    Pass("cost", _cost),
    Pass("clipping", _clipping),
]
PIECE_PIPELINE: list[Pass[PassState]] = [
    Pass("buffers", _buffers),
    Pass("batch_axis", _batch_axis),
    Pass("batch_outputs", _batch_outputs),
    Pass("sites", _sites),
    Pass("loss_scale", _loss_scale),
    Pass("groups", _groups),
    Pass("cost", _cost),
    Pass("defer", _defer),
]
# A graph specialised to a batch of exactly one sample (a static batch size of 1) cannot mix samples,
# and its layout does not say where the (size-one) sample axis went: it clips the whole gradient.
SINGLE_SAMPLE_PIPELINE: list[Pass[PassState]] = [
    Pass("buffers", _buffers),
    Pass("groups", _groups),
    Pass("single_sample", _single_sample),
]
PIECE_SINGLE_SAMPLE_PIPELINE: list[Pass[PassState]] = [
    Pass("buffers", _buffers),
    Pass("groups", _groups),
    Pass("defer_single_sample", _defer_single_sample),
]


def privatize(
    gm: torch.fx.GraphModule,
    num_fwd_outputs: int,
    inputs: tuple[GraphInput, ...],
    options: BKOptions,
    fake_mode: Any,
    key: int,
    role: GraphRole = WHOLE,
) -> GraphPlan:
    """Run the pipeline on a joint graph in place; return the graph's plan for its run time. ``key``: the graph's
    run-time record, which the graph names in its calls of the run-time ops."""
    with named("inputs"):
        joint = joint_graph(gm, num_fwd_outputs, inputs)
    if role.piece:
        passes = PIECE_SINGLE_SAMPLE_PIPELINE if joint.batch == 1 else PIECE_PIPELINE
    else:
        passes = SINGLE_SAMPLE_PIPELINE if joint.batch == 1 else PIPELINE
    state = PassState(joint, options, fake_mode, key, role)
    label = "piece" if role.piece else "joint"
    state = run_passes(passes, state, gm, check=options.check_passes, dump=options.dump, label=label)
    gm.graph.lint()
    gm.recompile()
    plan = GraphPlan(
        role.label,
        ClipPolicy.of(options),
        state.grouping,
        state.piece,
        build_report(state) if state.cost is not None and state.cost.plans else None,
    )
    if state.scale is not None and state.scale.unset and not role.piece:
        # refused once the report is built: bkcompile.explain returns the report of a model refused only for this
        refusal = unset_loss_reduction("the compiled function returns no loss")
        refusal.report = plan.report
        refusal.in_pass("loss_scale")
        raise refusal
    return plan
