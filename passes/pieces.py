"""A graph that is one piece of the model: refuse outputs that decide on the batch, and defer the clip.

Which graphs are pieces (``GraphRole``, read by the backend): dynamo marks a graph cut at a graph break
(``compile_subgraph_reason.graph_break``) and the graph of a resumed frame (``torch_dynamo_resume_in_*``
in its user stack); a graph compiled with ``options={"graphs": "several"}`` (regional compilation) is one
by the user's word. Any other graph is the whole model and clips in the graph (the fast path); if at run
time it meets other bk_dp graphs in its backward, ``bkcompile.backwards`` refuses it.

A piece's backward does not clip: each trainable parameter hands over, with the loss scale s, to
``bkcompile::defer_grads`` (which returns zeros) either its per-sample gradients (B, n) (explicit, as in
``clip.py``) or, when the cost model chose ghost, its ghost norm and its site's operands
(``bookkeeping.py``)::

    before:  grad_w = mm(t(grad_out), act)                                       -> output
    after:   g = reshape(bmm(t(act_i), grad_out_i), [B, -1])                    (explicit)
             n = ghost_norm(grad_out, act)                                      (ghost)
             zeros = defer_grads([w, v], [g], s, graph, [n], [grad_out, act])   -> getitem(zeros, k) -> output

``bkcompile.deferred.finalize`` clips them with the other pieces' at the end of the backward.
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

from bkcompile.deferred import PieceGraph, register_piece
from bkcompile.errors import NotSupportedYetError, SampleMixingError, node_error

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


def defer_clipping(state) -> set[str]:
    """Hand each trainable parameter's part of the clip to ``defer_grads``: its ghost norm and kept site
    operands (``bookkeeping.py``) when the cost model chose ghost, else its per-sample gradients. Returns
    the names of the parameters kept by book-keeping."""
    joint, params = state.joint, state.params
    if not params:
        return set()
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
                kept[param.name] = site
    with graph.inserting_before(next(n for n in graph.nodes if n.op != "placeholder")):
        batch = batch_size_value(emit, joint)
    norms = []
    for param in params:
        if param.name in kept:
            site = param.sites[0]
            with graph.inserting_before(site.node):
                norms.append(site.kind.sq_norm(emit, joint, site.node, batch, dtype))
    explicit = [p for p in params if p.name not in kept]
    keeping = [p for p in params if p.name in kept]
    with graph.inserting_before(graph.output_node()):
        grads = []
        for param in explicit:
            value = per_sample_grad(emit, joint, param.grad, {s.node: s for s in param.sites}, batch, dtype)
            grads.append(emit(aten.reshape.default, value, [batch, param_numel(param.grad)]))
        factor = loss_factor(emit, state.scale, batch, dtype)
        if factor is None:
            factor = emit(aten.scalar_tensor.default, 1.0, dtype=dtype)
        sites = tuple(kept[p.name] for p in keeping)
        names = tuple(p.name for p in explicit + keeping)
        piece = PieceGraph(
            state.role.label,
            state.options,
            names,
            state.grouping,
            state.scale.kind.value,
            not state.scale.from_option,
            sites,
        )
        handed = Handover(
            [p.index for p in explicit + keeping], grads, factor, norms, [v for s in sites for v in s.operands]
        )
        _hand_over(emit, joint, handed, register_piece(piece))
    for param in params:
        erase_dead(graph, param.grad)
    return set(kept)


def defer_single_sample(state) -> None:
    """A piece compiled for a batch of one sample: its gradients are that sample's, handed over whole."""
    joint = state.joint
    grads = trainable_grads(joint)
    if not grads:
        return
    graph = joint.gm.graph
    emit = Emitter(graph, state.fake_mode)
    dtype = torch.float64 if any(g.meta["val"].dtype == torch.float64 for _, _, g in grads) else torch.float32
    with graph.inserting_before(graph.output_node()):
        flat = [emit(aten.reshape.default, emit.to_dtype(g, dtype), [1, -1]) for _, _, g in grads]
        factor = emit(aten.scalar_tensor.default, 1.0, dtype=dtype)
        names = tuple(name for _, name, _ in grads)
        graph_id = register_piece(PieceGraph(state.role.label, state.options, names, state.grouping, "sum", False))
        _hand_over(emit, joint, Handover([index for index, _, _ in grads], flat, factor), graph_id)


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


def _hand_over(emit: Emitter, joint: JointGraph, handed: Handover, graph_id: int) -> None:
    """Emit ``defer_grads`` and make its zeros the gradient outputs at ``handed.indices``."""
    primals = [joint.primals[i] for i in handed.indices]
    call = emit(
        torch.ops.bkcompile.defer_grads.default,
        primals,
        handed.grads,
        handed.factor,
        graph_id,
        handed.norms,
        handed.operands,
    )
    outputs = joint.outputs
    for k, index in enumerate(handed.indices):
        outputs[joint.num_fwd_outputs + index] = emit(operator.getitem, call, k)
    joint.gm.graph.output_node().args = (outputs,)
