"""Site kinds: the ops that reduce per-sample values into a parameter gradient, one module per kind.

Each module defines ``KIND``, a :class:`~bkcompile.passes.site_kinds.common.SiteKind`: how to recognise its
node, its ghost norm, per-sample gradient, weighted reduction, costs and the ops it keeps whole. Adding a
kind is a module here and its row in :data:`SITE_KINDS`; nothing else names a kind.
"""

from __future__ import annotations

import torch
import torch.fx
from bkcompile.passes.joint import JointGraph
from bkcompile.passes.site_kinds import conv, embedding, matmul, mv
from bkcompile.passes.site_kinds import sum as sums
from bkcompile.passes.site_kinds.common import SiteKind, reduces_samples

__all__ = ["SITE_KINDS", "SiteKind", "kept_ops", "kind_of", "reduces_samples"]

# The first that matches a node wins.
SITE_KINDS: tuple[SiteKind, ...] = (
    matmul.KIND,  # mm / bmm contracting over the samples: linear and einsum weights
    sums.KIND,  # sum over the sample axis: biases, norm affine weights, elementwise scales
    embedding.KIND,  # embedding_dense_backward: embedding tables
    conv.KIND,  # convolution_backward weight and bias outputs
    mv.KIND,  # mv contracting over the samples: vector parameters used as h @ w
)


def kind_of(joint: JointGraph, node: torch.fx.Node) -> SiteKind | None:
    return next((kind for kind in SITE_KINDS if kind.matches(joint, node)), None)


def kept_ops() -> list[torch._ops.OpOverload]:
    """The ops some site kind must see whole: the backend does not decompose them before the pass."""
    return [op for kind in SITE_KINDS for op in kind.keep]
