"""Site discovery: the ops that reduce per-sample values into each trainable parameter's gradient.

From each gradient output we look back through norm-preserving ops (views, transposes, copies) and
``add`` (a parameter used at several places: tied or reused weights) to the sites: ops of a kind in
``site_kinds.SITE_KINDS`` that sum over the sample axis. Every sum over samples in the backward must be
such a site; anything else is refused.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx
from bkcompile.passes.facts import Batched, Reduced
from bkcompile.passes.joint import GraphInput, JointGraph
from bkcompile.passes.site_kinds import SiteKind, kind_of, reduces_samples

from bkcompile.errors import NotSupportedYetError, PrivacyError, node_error

aten = torch.ops.aten

# Ops on the way from a site to the gradient output that keep the per-sample norm.
NORM_PRESERVING = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.t.default,
    aten.transpose.int,
    aten.permute.default,
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
    aten._to_copy.default,
    torch.ops.prims.convert_element_type.default,
    aten.slice_backward.default,  # a sliced parameter: the gradient rows go back in place, zeros elsewhere
    aten.select_backward.default,
    aten.slice_scatter.default,  # the same, decomposed (into a zero tensor: see preserved_operand)
    aten.select_scatter.default,
}
_SCATTERS = {aten.slice_scatter.default, aten.select_scatter.default}
_ZEROS = {aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default}
_FILLS = {aten.full.default: 1, aten.new_full.default: 2, aten.full_like.default: 1}  # op -> fill value arg


def _is_zeros(value: object) -> bool:
    target = getattr(value, "target", None)
    return target in _ZEROS or (target in _FILLS and value.args[_FILLS[target]] == 0)


def preserved_operand(node: torch.fx.Node) -> torch.fx.Node | None:
    """The operand whose norm a NORM_PRESERVING ``node`` keeps (a scatter's source, when it scatters into
    zeros), or None."""
    if node.target not in NORM_PRESERVING:
        return None
    if node.target in _SCATTERS:
        return node.args[1] if _is_zeros(node.args[0]) else None
    return node.args[0]


# Ops linear in one reduced operand, with sample-independent other operands (a frozen BatchNorm's 1/std,
# a constant, the indices of a broadcast position embedding): not norm-preserving, applied per sample.
SCALINGS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default}
LINEAR_MAPS = SCALINGS | {aten.embedding_dense_backward.default, aten.sum.dim_IntList}


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

    @property
    def name(self) -> str:
        return self.input.name


def linear_term(joint: JointGraph, node: torch.fx.Node) -> torch.fx.Node | None:
    """The reduced operand of ``node`` when ``node`` is a linear map of it by sample-independent operands
    (the same map for every sample's part of the sum), else None."""
    if node.target not in LINEAR_MAPS:
        return None
    term, *rest = node.args
    if node.target == aten.mul.Tensor and not isinstance(joint.facts.get(term), Reduced):
        term, rest = rest[0], [term]
    if not isinstance(joint.facts.get(term), Reduced) or any(
        isinstance(joint.facts.get(a), (Reduced, Batched)) for a in rest if isinstance(a, torch.fx.Node)
    ):
        return None
    factor = rest[0] if rest else None
    if (
        node.target in SCALINGS
        and isinstance(factor, torch.fx.Node)
        and factor.meta["val"].dim() > term.meta["val"].dim()
    ):
        return None
    return term


def _collect(joint: JointGraph, node: torch.fx.Node, name: str, sites: list[Site]) -> bool:
    """Append the sites under ``node`` (a value of the gradient of parameter ``name``); True when the
    way from them to ``node`` scales them."""
    while preserved_operand(node) is not None and kind_of(joint, node) is None:
        node = preserved_operand(node)
    kind = kind_of(joint, node)
    if kind is not None:
        sites.append(Site(node=node, kind=kind))
        return False
    if (
        node.target is aten.add.Tensor
        and not node.kwargs
        and all(isinstance(joint.facts.get(a), Reduced) for a in node.args)
    ):
        # a parameter used at several places: its gradient adds the uses' gradients
        return any([_collect(joint, term, name, sites) for term in node.args])
    term = linear_term(joint, node)
    if term is not None:
        _collect(joint, term, name, sites)
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
        scaled = _collect(joint, grad, name, sites)
        params.append(ParamGrad(input=graph_input, index=index, grad=grad, sites=tuple(sites), scaled=scaled))
    found = {site.node for p in params for site in p.sites}
    for node in joint.gm.graph.nodes:
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
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in grads:
            return True
        for user in current.users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    return False
