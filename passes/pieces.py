"""A graph that is one piece of the model: refuse outputs that decide on the batch, and defer the clip.

Which graphs are pieces (``GraphRole``, read by the backend): dynamo marks a graph cut at a graph break
(``compile_subgraph_reason.graph_break``) and the graph of a resumed frame (``torch_dynamo_resume_in_*``
in its user stack); a graph compiled with ``options={"graphs": "several"}`` (regional compilation) is one
by the user's word. Any other graph is the whole model and clips in the graph (the fast path); if at run
time it meets other bk_dp graphs in its backward, ``bkcompile.runtime.backwards`` refuses it.

A piece's backward does not clip: each trainable parameter hands over, with the loss scale s, to
``bkcompile::defer_grads`` (which returns zeros) either its per-sample gradients (B, n) (explicit, as in
``clip.py``) or, when the cost model chose ghost, its ghost norm and its site's operands
(``bookkeeping.py``)::

    before:  grad_w = mm(t(grad_out), act)                                       -> output
    after:   g = reshape(bmm(t(act_i), grad_out_i), [B, -1])                    (explicit)
             n = ghost_norm(grad_out, act)                                      (ghost)
             zeros = defer_grads([w, v], [g], s, key, [n], [grad_out, act])     -> getitem(zeros, k) -> output

``key`` names the graph's run-time record, which owns the graph's plan with its :class:`bkcompile.plan.PieceSpec`
(what the call hands over); ``bkcompile.runtime.deferred.finalize`` clips them with the other pieces' at the end of the
backward.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx
from bkcompile.passes.bookkeeping import keep_site
from bkcompile.passes.clip import (
    batch_size_value,
    erase_dead,
    loss_factor,
    param_numel,
    per_sample_grad,
    trainable_grads,
)
from bkcompile.passes.cost import Strategy
from bkcompile.passes.emit import Emitter
from bkcompile.passes.facts import Reduced
from bkcompile.passes.joint import JointGraph

import bkcompile.runtime.deferred  # noqa: F401  (registers bkcompile::defer_grads)
from bkcompile.errors import NotSupportedYetError, SampleMixingError, node_error
from bkcompile.plan import KeptGraphs, PieceSpec

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class GraphRole:
    """Whether a graph is the whole model or one of its pieces, and how the report and errors name it."""

    piece: bool
    label: str
    ends_at_break: bool = False  # dynamo cut the graph at a graph break: code it does not trace runs next


WHOLE = GraphRole(piece=False, label="the whole model")


def refuse_batch_outputs(joint: JointGraph, role: GraphRole) -> None:
    """A graph cut at a graph break hands its outputs to code dynamo does not trace (a branch, ``.item()``,
    a print): an output that sums over samples would let every sample decide what the model does next."""
    if not role.ends_at_break:
        return
    for value in joint.forward_outputs:
        if isinstance(value, torch.fx.Node) and isinstance(joint.facts.get(value), Reduced):
            raise node_error(
                SampleMixingError,
                value,
                f"its value mixes samples (a sum over the batch) and leaves the {role.label}, where code "
                "dynamo does not trace uses it (a branch or .item() on a batch statistic): what the model "
                "does next would depend on every sample of the batch",
                "decide per sample (torch.where on per-sample values) or on values that do not depend on the "
                "batch; return the loss, and print or log batch statistics (the loss too) outside the compiled "
                "model",
            )


def _spec(state, inputs: list, names: list[str], loss: str, from_loss: bool, kept=()) -> PieceSpec:
    return PieceSpec(
        tuple(inputs),
        tuple(names),
        loss,
        from_loss,
        state.options.loss_reduction == "auto",
        state.options.graphs == "several",
        tuple(kept),
    )


def defer_clipping(state) -> tuple[set[int], PieceSpec | None]:
    """Hand each trainable parameter's part of the clip to ``defer_grads``: its ghost norm and kept site
    operands (``bookkeeping.py``) when the cost model chose ghost, else its per-sample gradients. Returns
    the graph inputs of the parameters kept by book-keeping, and what the call hands over (None: nothing)."""
    joint, params = state.joint, state.params
    if not params:
        return set(), None
    for param in params:
        if param.free:
            raise node_error(
                NotSupportedYetError,
                param.free[0][0],
                f"the loss adds a data-independent term to the gradient of {param.name!r} in a model compiled in "
                "several graphs (a graph break, or graphs='several'), which cannot keep it apart from clipping yet",
                "compile the model as one graph, or add the term (e.g. weight decay) through the optimizer",
            )
    graph = joint.gm.graph
    emit = Emitter(graph, state.fake_mode)
    dtype = state.cost.norm_dtype
    strategies = {plan.param: plan.strategy for plan in state.cost.plans}
    kept = {}
    for param in params:
        if strategies[param] is Strategy.GHOST:
            site = keep_site(joint, param, dtype, state.fake_mode)
            if site is not None:
                kept[param.index] = site
    with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
        batch = batch_size_value(emit, joint)
    norms = []
    for param in params:
        if param.index in kept:
            site = param.sites[0]
            with graph.inserting_before(site.node):
                norms.append(site.kind.sq_norm(emit, joint, site.node, batch, dtype))
    explicit = [p for p in params if p.index not in kept]
    keeping = [p for p in params if p.index in kept]
    with graph.inserting_before(graph.output_node()):
        grads = []
        for param in explicit:
            value = per_sample_grad(emit, joint, param.grad, {s.node: s for s in param.sites}, batch, dtype)
            grads.append(emit(aten.reshape.default, value, [batch, param_numel(param.grad)]))
        factor = loss_factor(emit, state.scale, batch, dtype)
        if factor is None:
            factor = emit(aten.scalar_tensor.default, 1.0, dtype=dtype)
        sites = [kept[p.index] for p in keeping]
        handed = [p.index for p in explicit + keeping]
        spec = _spec(
            state,
            handed,
            [p.name for p in explicit + keeping],
            state.scale.kind.value,
            not state.scale.from_option,
            [KeptGraphs(len(s.operands), s.reduce, s.per_sample) for s in sites],
        )
        operands = [v for s in sites for v in s.operands]
        _hand_over(emit, joint, Handover(handed, grads, factor, norms, operands), state.key)
    for param in params:
        erase_dead(graph, param.grad)
    return set(kept), spec


def defer_single_sample(state) -> PieceSpec | None:
    """A piece compiled for a batch of one sample: its gradients are that sample's, handed over whole. Returns
    what the call hands over (None: nothing)."""
    joint = state.joint
    grads = trainable_grads(joint)
    if not grads:
        return None
    graph = joint.gm.graph
    emit = Emitter(graph, state.fake_mode)
    dtype = torch.float64 if any(g.meta["val"].dtype == torch.float64 for _, _, g in grads) else torch.float32
    with graph.inserting_before(graph.output_node()):
        flat = [emit(aten.reshape.default, emit.to_dtype(g, dtype), [1, -1]) for _, _, g in grads]
        factor = emit(aten.scalar_tensor.default, 1.0, dtype=dtype)
        handed = [index for index, _, _ in grads]
        _hand_over(emit, joint, Handover(handed, flat, factor), state.key)
    return _spec(state, handed, [name for _, name, _ in grads], "sum", False)


@dataclasses.dataclass
class Handover:
    """What a piece's backward hands to ``defer_grads``: the gradient outputs it replaces (the explicit
    parameters' first, then the kept ones), the explicit per-sample gradients, the loss scale, and the kept
    parameters' ghost norms and site operands."""

    indices: list[int]
    grads: list[torch.fx.Node]
    factor: torch.fx.Node
    norms: list[torch.fx.Node] = dataclasses.field(default_factory=list)
    operands: list[torch.fx.Node] = dataclasses.field(default_factory=list)


def _hand_over(emit: Emitter, joint: JointGraph, handed: Handover, key: int) -> None:
    """Emit ``defer_grads`` and make its zeros the gradient outputs at ``handed.indices``."""
    primals = [joint.primals[i] for i in handed.indices]
    call = emit(
        torch.ops.bkcompile.defer_grads.default,
        primals,
        handed.grads,
        handed.factor,
        key,
        handed.norms,
        handed.operands,
    )
    outputs = joint.outputs
    for k, index in enumerate(handed.indices):
        outputs[joint.num_fwd_outputs + index] = emit(operator.getitem, call, k)
    joint.gm.graph.output_node().args = (outputs,)
