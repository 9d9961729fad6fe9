"""Matrix-vector products contracting over the samples: ``g = a (n, K) @ v (K,)`` with K = B*m rows, the
gradient of a vector parameter used as ``h @ w`` (a score or gate vector). A matmul with one column: ghost
norms by Gram matrices of each sample's m rows."""

from __future__ import annotations

import torch
import torch.fx
from bkcompile.passes.emit import Emitter, static_shape
from bkcompile.passes.facts import Batched, shape_exprs
from bkcompile.passes.joint import JointGraph
from bkcompile.passes.site_kinds.common import SiteKind, Size, reduces_samples, reweight_operand
from bkcompile.passes.site_kinds.matmul import gram_sq_norm, per_sample_products, product_cost, product_operands

aten = torch.ops.aten


def _operands(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype: torch.dtype):
    a, v = node.args[0], node.args[1]
    fact = joint.facts[a] if isinstance(joint.facts[a], Batched) else joint.facts[v]
    column = emit(aten.unsqueeze.default, v, 1)  # (K, 1)
    return product_operands(emit, a, column, fact, batch, dtype, batched=False)


def mv_sq_norm(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype) -> torch.fx.Node:
    return gram_sq_norm(emit, *_operands(emit, joint, node, batch, dtype), batch)


def mv_per_sample(emit: Emitter, joint: JointGraph, node: torch.fx.Node, batch: Size, dtype) -> torch.fx.Node:
    return per_sample_products(emit, *_operands(emit, joint, node, batch, dtype), static_shape(node))


def _mv_matches(joint: JointGraph, node: torch.fx.Node) -> bool:
    return node.target == aten.mv.default and reduces_samples(joint, node)


def _mv_cost(joint: JointGraph, node: torch.fx.Node):
    return product_cost(joint, shape_exprs(node.args[0].meta["val"]), 1)


KIND = SiteKind("mv", _mv_matches, mv_per_sample, _mv_cost, sq_norm=mv_sq_norm, reweight=reweight_operand)
