"""Site discovery: the ops that reduce per-sample values into each trainable parameter's gradient.

From each gradient output we look back through norm-preserving ops (views, transposes, copies: their op
law's ``keeps_norm``), linear maps by sample-independent operands (``lift_linear``) and
``add`` (a parameter used at several places: tied or reused weights) to the sites: ops of a kind in
``site_kinds.SITE_KINDS`` that sum over the sample axis. Every sum over samples in the backward must be
such a site; anything else is refused.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx
from bkcompile.passes.batch_axis import differentiable_outputs
from bkcompile.passes.facts import Batched, Reduced
from bkcompile.passes.joint import GraphInput, JointGraph
from bkcompile.passes.ops import law_for
from bkcompile.passes.ops.table import is_count
from bkcompile.passes.site_kinds import SiteKind, kind_of, reduces_samples

from bkcompile.errors import NotSupportedYetError, PrivacyError, node_error

aten = torch.ops.aten


def preserved_operand(node: torch.fx.Node) -> torch.fx.Node | None:
    """The operand whose per-sample norm ``node`` keeps (its op law's ``keeps_norm``), or None."""
    keeps = law_for(node.target).keeps_norm if node.op == "call_function" else None
    return keeps(node) if keeps is not None else None


@dataclasses.dataclass(frozen=True)
class Site:
    node: torch.fx.Node  # the op that reduces over the samples
    kind: SiteKind  # a row of site_kinds.SITE_KINDS


@dataclasses.dataclass(frozen=True, eq=False)
class ParamGrad:
    """A trainable parameter's gradient output and the sites it adds up (what the ``sites`` pass produces)."""

    input: GraphInput  # the parameter
    index: int  # position among the graph's gradient outputs
    grad: torch.fx.Node
    sites: tuple[Site, ...]
    scaled: bool = False  # the tree maps a site linearly by sample-independent operands (not norm-preserving)
    # data-independent terms added to the gradient (a loss term of the parameters alone, e.g. weight decay
    # written in the loss): each (the add node, the term); no sensitivity, so neither clipped nor noised
    free: tuple[tuple[torch.fx.Node, torch.fx.Node], ...] = ()

    @property
    def name(self) -> str:
        return self.input.name


def linear_term(joint: JointGraph, node: torch.fx.Node) -> torch.fx.Node | None:
    """The reduced operand of ``node`` when ``node`` is a linear map of it by sample-independent operands
    (the same map for every sample's part of the sum), else None."""
    law = law_for(node.target) if node.op == "call_function" else None
    if law is None or law.lift_linear is None:
        return None
    operands = [a for a in node.args if isinstance(a, torch.fx.Node)]
    terms = [a for a in operands if isinstance(joint.facts.get(a), Reduced)]
    if len(terms) != 1 or any(isinstance(joint.facts.get(a), Batched) for a in operands):
        return None
    (term,) = terms
    if law.linear_in is not None and law.linear_in(node) is not term:
        return None  # not linear in that operand (a divisor, or a select whose other branch is not zero)
    if any(a.meta["val"].dim() > term.meta["val"].dim() for a in operands if a is not term):
        return None  # another operand broadcasts the sum up: not the same map of each sample's part
    return term


def _search(start: torch.fx.Node, hit, neighbours) -> bool:
    """Whether a node for which ``hit`` holds is reachable from ``start`` (itself included) by ``neighbours``."""
    stack, seen = [start], {start}
    while stack:
        current = stack.pop()
        if hit(current):
            return True
        for value in neighbours(current):
            if value not in seen:
                seen.add(value)
                stack.append(value)
    return False


def _inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    return node.all_input_nodes


def data_independent(joint: JointGraph, node: object) -> bool:
    """``node`` is computed from parameters, constants and the loss's output gradient alone: no sample data
    (batched or summed over the batch) reaches it."""
    if not isinstance(node, torch.fx.Node):
        return True
    return not _search(node, lambda n: isinstance(joint.facts.get(n), (Batched, Reduced)), _inputs)


def split_free_terms(joint: JointGraph, grad: torch.fx.Node) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """For a graph of one sample (no facts): the terms of the sum ``grad`` that carry the sample's data,
    and the data-independent ones (computed without the per-sample inputs or the gradients of per-sample
    outputs; a 0-dim output is the loss, whose gradient is a constant)."""
    data = {p for p, i in zip(joint.primals, joint.inputs, strict=True) if isinstance(i.fact, Batched)}
    data |= {t for o, t in zip(differentiable_outputs(joint), joint.tangents) if o.meta["val"].dim() > 0}

    def free(node: object) -> bool:
        return not isinstance(node, torch.fx.Node) or not _search(node, data.__contains__, _inputs)

    rest, free_terms, stack = [], [], [grad]
    while stack:
        node = stack.pop()
        if node.target is aten.add.Tensor and not node.kwargs and any(free(a) for a in node.args):
            free_terms += [a for a in node.args if free(a)]
            stack += [a for a in node.args if not free(a)]
        else:
            rest.append(node)
    return rest, free_terms


def _collect(joint: JointGraph, node: torch.fx.Node, name: str, sites: list[Site], free_terms: list[tuple]) -> bool:
    """Append the sites under ``node`` (a value of the gradient of parameter ``name``); True when the
    way from them to ``node`` scales them."""
    while preserved_operand(node) is not None and kind_of(joint, node) is None:
        node = preserved_operand(node)
    kind = kind_of(joint, node)
    if kind is not None:
        sites.append(Site(node=node, kind=kind))
        return False
    if node.target is aten.add.Tensor and not node.kwargs and isinstance(joint.facts.get(node), Reduced):
        reduced = [a for a in node.args if isinstance(joint.facts.get(a), Reduced)]
        free = [a for a in node.args if a not in reduced]
        if all(data_independent(joint, a) for a in free):
            # a parameter used at several places adds the uses' gradients; a term of the parameters alone
            # (weight decay written in the loss) is data-independent: kept apart from clipping
            free_terms.extend((node, a) for a in free)
            return any([_collect(joint, term, name, sites, free_terms) for term in reduced])
    if node.target is aten.cat.default and all(isinstance(joint.facts.get(a), Reduced) for a in node.args[0]):
        # the gradients of a parameter's slices put side by side (a packed projection used in parts): the
        # blocks are disjoint, so the per-sample gradient is the blocks' per-sample gradients joined alike
        return any([_collect(joint, term, name, sites, free_terms) for term in node.args[0]])
    if (
        node.target is aten.sub.Tensor
        and not node.kwargs
        and all(isinstance(joint.facts.get(a), Reduced) for a in node.args)
    ):
        return any([_collect(joint, term, name, sites, free_terms) for term in node.args])
    term = linear_term(joint, node)
    if term is not None:
        inner: list[tuple] = []
        _collect(joint, term, name, sites, inner)
        if inner:
            raise node_error(
                NotSupportedYetError,
                node,
                f"the gradient of parameter {name!r} maps a data-independent term together with per-sample terms",
                "add the data-independent term (e.g. weight decay) to the loss last, unscaled by other terms",
            )
        return True
    if not isinstance(joint.facts.get(node), Reduced):
        raise node_error(
            PrivacyError,
            node,
            f"the gradient of parameter {name!r} does not come from a sum over per-sample values",
            "make sure the compiled function's outputs depend on the batch (dim 0 of the inputs)",
        )
    raise node_error(
        NotSupportedYetError,
        node,
        f"the gradient of parameter {name!r} reaches it through an op the pass cannot clip yet",
        "express the layer with linear maps, convolutions, embeddings, sums and elementwise ops, or freeze "
        "the parameter",
    )


def find_sites(joint: JointGraph) -> list[ParamGrad]:
    """The sites of every trainable parameter that receives a gradient (pass 2 of the pipeline)."""
    params: list[ParamGrad] = []
    for index, (grad, graph_input) in enumerate(zip(joint.gradient_outputs, joint.inputs, strict=True)):
        name = graph_input.name
        if grad is None:
            continue
        if not graph_input.trainable:
            if isinstance(joint.facts.get(grad), Reduced):
                raise node_error(
                    PrivacyError,
                    grad,
                    f"the gradient of input {name!r} sums over samples",
                    "pass per-sample inputs with the batch on dim 0, or make it a parameter",
                )
            continue
        sites: list[Site] = []
        free: list[tuple[torch.fx.Node, torch.fx.Node]] = []
        scaled = _collect(joint, grad, name, sites, free)
        params.append(
            ParamGrad(input=graph_input, index=index, grad=grad, sites=tuple(sites), scaled=scaled, free=tuple(free))
        )
    found = {site.node for p in params for site in p.sites}
    for node in joint.gm.graph.nodes:
        if is_count(node, joint.facts):
            continue  # a loss normaliser: it reaches gradients only as a divisor, which the loss pass checks
        if node not in found and reduces_samples(joint, node) and _feeds_gradient(joint, node):
            raise node_error(
                NotSupportedYetError,
                node,
                "this sum over samples reaches a parameter gradient by a path the pass cannot clip yet",
                "express the layer with linear maps, sums and elementwise ops",
            )
    return params


def _feeds_gradient(joint: JointGraph, node: torch.fx.Node) -> bool:
    grads = {g for g in joint.gradient_outputs if g is not None}
    return _search(node, grads.__contains__, lambda n: n.users)
