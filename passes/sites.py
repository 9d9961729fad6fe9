"""Site discovery: the op that reduces per-sample values into each trainable parameter's gradient.

From each gradient output we look back through norm-preserving ops (views, transposes, copies) to
the op that sums over the sample axis: a matrix product contracting over it (``mm``/``bmm``: linear
and einsum weights) or a ``sum`` over it (biases, elementwise scales, norm-layer affine weights).
Every sum over samples in the backward must be such a site; anything else is refused.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx

from bkcompile.errors import NotSupportedYetError, PrivacyError, node_error
from bkcompile.passes.batch_axis import JointGraph
from bkcompile.passes.facts import Batched, Reduced

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
}
MATMUL_SITES = {aten.mm.default, aten.bmm.default}
SUM_SITES = {aten.sum.dim_IntList, aten.sum.default}


@dataclasses.dataclass
class Site:
    param: str  # the parameter's name, e.g. "layers.0.fc.weight"
    node: torch.fx.Node  # the op that reduces over the samples
    kind: str  # "matmul" or "sum"


def _is_site(joint: JointGraph, node: torch.fx.Node) -> bool:
    return isinstance(joint.facts.get(node), Reduced) and any(
        isinstance(joint.facts.get(a), Batched) for a in node.all_input_nodes
    )


def find_sites(joint: JointGraph, names: list[str]) -> list[Site]:
    """One site per trainable parameter that receives a gradient (pass 2 of the pipeline)."""
    sites: list[Site] = []
    for primal, grad, trainable, name in zip(joint.primals, joint.gradient_outputs, joint.trainable, names):
        if grad is None:
            continue
        if not trainable:
            if isinstance(joint.facts.get(grad), Reduced):
                raise node_error(PrivacyError, grad, f"the gradient of input {name!r} sums over samples",
                                 "pass per-sample inputs with the batch on dim 0, or make it a parameter")
            continue
        node = grad
        while node.target in NORM_PRESERVING and not _is_site(joint, node):
            node = node.args[0]
        if node.target in MATMUL_SITES | SUM_SITES and _is_site(joint, node):
            sites.append(Site(param=name, node=node, kind="matmul" if node.target in MATMUL_SITES else "sum"))
            continue
        if isinstance(joint.facts.get(node), Reduced) and node.target in (aten.add.Tensor, aten.cat.default):
            raise node_error(
                NotSupportedYetError, node,
                f"parameter {name!r} is used at several places in the forward (shared or tied weights); "
                "clipping a parameter with several gradient sites is not supported yet",
                "use separate parameters for each use, or freeze this one",
            )
        if not isinstance(joint.facts.get(node), Reduced):
            raise node_error(
                PrivacyError, grad,
                f"the gradient of parameter {name!r} does not come from a sum over per-sample values",
                "make sure the compiled function's outputs depend on the batch (dim 0 of the inputs)",
            )
        raise node_error(
            NotSupportedYetError, node,
            f"the gradient of parameter {name!r} reaches it through an op the pass cannot clip yet",
            "express the layer with linear maps, sums and elementwise ops, or freeze the parameter",
        )
    found = {site.node for site in sites}
    for node in joint.gm.graph.nodes:
        if node not in found and _is_site(joint, node) and _feeds_gradient(joint, node):
            raise node_error(
                NotSupportedYetError, node,
                "this sum over samples reaches a parameter gradient by a path the pass cannot clip yet",
                "express the layer with linear maps, sums and elementwise ops",
            )
    return sites


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
