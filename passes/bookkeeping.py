"""Book-keeping across pieces: a ghost parameter of a piece keeps its site's operands, not per-sample gradients.

A piece cannot form its weighted reductions (the clip factors need every piece's norms), but a parameter
whose norm is a ghost norm (one site, ``cost.py`` chose ghost) need not form its per-sample gradients
either: its backward hands over the ghost norm ``||G_i||^2`` (B,) and the site's operands (an activation
and an output gradient, kept until the end of the backward), and two small graphs cut from the joint
graph finish its work when the clip factors are known::

    reduce(operands..., w)  = the site re-emitted with its per-sample operand scaled by w, then the views
                              from the site to the gradient        (sum_i w_i G_i, the parameter's shape)
    per_sample(operands..., w) = its per-sample gradients (B, n)   (only when the parameter turns out to
                              have sites in another piece too: a tied weight needs its cross terms)

Both are plain ``torch.fx.GraphModule``s of aten ops, run eagerly by ``bkcompile.runtime.deferred.finalize``.
A parameter is kept this way when every value the two graphs read from the joint graph is a tensor.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx
from bkcompile.passes.clip import erase_dead, param_numel, per_sample_grad
from bkcompile.passes.emit import Emitter
from bkcompile.passes.joint import JointGraph
from bkcompile.passes.sites import ParamGrad, preserved_operand

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class KeptSite:
    """What a piece keeps for one ghost parameter: the joint-graph values it hands over, and the graphs that
    turn them into the clipped sum or the per-sample gradients."""

    operands: tuple[torch.fx.Node, ...]  # values of the joint graph, in the order both graphs take them
    reduce: torch.fx.GraphModule  # (operands..., w) -> sum_i w_i G_i
    per_sample: torch.fx.GraphModule  # (operands..., w) -> (B, n); w gives B only


def _subtree(param: ParamGrad) -> list[torch.fx.Node]:
    """The nodes from the site (with its convolution_backward) up to the gradient output, in graph order."""
    site = param.sites[0].node
    path, node = [], param.grad
    while node is not site:
        path.append(node)
        node = preserved_operand(node)
    head = [site.args[0]] if site.target is operator.getitem else []
    return [*head, site, *reversed(path)]


def _external(nodes: list[torch.fx.Node]) -> list[torch.fx.Node] | None:
    """The values the subtree reads from the rest of the graph; None when one is not a tensor."""
    inside, found = set(nodes), []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in found:
                if not isinstance(arg.meta.get("val"), torch.Tensor):
                    return None
                found.append(arg)
    return found


def _copy(joint: JointGraph, nodes: list, external: list, fake_mode, batch_val):
    """A new graph with placeholders for ``external`` and the weights, and a copy of ``nodes`` (their facts
    too); returns (graph, emitter, copies by original node, the weights placeholder)."""
    graph = torch.fx.Graph()
    env = {}
    for index, value in enumerate(external):
        env[value] = graph.placeholder(f"operand_{index}")
        env[value].meta["val"] = value.meta["val"]
        joint.facts[env[value]] = joint.facts[value]
    weights = graph.placeholder("weights")
    with fake_mode:
        weights.meta["val"] = torch.empty(batch_val)
    for node in nodes:
        env[node] = graph.node_copy(node, lambda a: env[a])
        if node in joint.facts:
            joint.facts[env[node]] = joint.facts[node]
    return graph, Emitter(graph, fake_mode), env, weights


def keep_site(joint: JointGraph, param: ParamGrad, dtype: torch.dtype, fake_mode) -> KeptSite | None:
    """The kept form of a ghost parameter, or None when a value its graphs need is not a tensor."""
    nodes = _subtree(param)
    external = _external(nodes)
    if external is None:
        return None
    source, dim = joint.batch_source
    batch_val = source.meta["val"].shape[dim]
    site = param.sites[0]
    kind = site.kind

    graph, emit, env, weights = _copy(joint, nodes, external, fake_mode, batch_val)
    graph.output(env[param.grad])
    with graph.inserting_before(env[site.node].next):  # before the views that read the site
        batch = emit.size(weights, 0)
        weighted = kind.reweight(emit, joint, env[site.node], weights, batch)
    env[site.node].replace_all_uses_with(weighted)
    erase_dead(graph, env[site.node])
    reduce = torch.fx.GraphModule(torch.nn.Module(), graph)

    graph, emit, env, weights = _copy(joint, nodes, external, fake_mode, batch_val)
    batch = emit.size(weights, 0)
    copied = dataclasses.replace(param, grad=env[param.grad], sites=(dataclasses.replace(site, node=env[site.node]),))
    values = per_sample_grad(emit, joint, copied.grad, {env[site.node]: copied.sites[0]}, batch, dtype)
    graph.output(emit(aten.reshape.default, values, [batch, param_numel(param.grad)]))
    graph.eliminate_dead_code()
    per_sample = torch.fx.GraphModule(torch.nn.Module(), graph)
    return KeptSite(tuple(external), reduce, per_sample)
