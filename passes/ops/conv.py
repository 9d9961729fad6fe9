"""Convolutions and spatial ops (pooling, upsampling, padding): each of the N inputs is mapped on its own,
so samples stay apart on dim 0; the weight and bias gradients of a convolution sum over samples (a site)."""

from __future__ import annotations

import torch
import torch._inductor.inductor_prims  # noqa: F401  (registers prims._low_memory_max_pool_*)
from bkcompile.passes.facts import REDUCED, REPLICATED, Batched, Fact
from bkcompile.passes.ops.table import FactOut, Rule, RuleInput, agree, batched_facts, law

aten = torch.ops.aten
prims = torch.ops.prims


@law(aten.convolution.default)
def convolution(r: RuleInput) -> Fact:
    fact = r.fact(r.arg("input"))
    if batched_facts(r, [r.arg("weight")]) or (isinstance(fact, Batched) and fact.dim != 0):
        raise r.mixing("the convolution's channels or weights hold samples", "keep the batch on dim 0 of the input")
    return fact


@law(aten.convolution_backward.default)
def convolution_backward(r: RuleInput) -> tuple:
    """grad_input is per-sample like grad_output; the weight and bias gradients sum over samples (a conv site)."""
    batched = batched_facts(r, [r.arg("grad_output"), r.arg("input")])
    if batched_facts(r, [r.arg("weight")]) or any(f.dim != 0 for f in batched):
        raise r.mixing("the convolution's channels or weights hold samples", "keep the batch on dim 0 of the input")
    if not batched:
        return (REPLICATED, REPLICATED, REPLICATED)
    return (agree(r, batched), REDUCED, REDUCED)


# Ops that work on the trailing ``k`` spatial dims, each leading (sample, channel) slice on its own.
_SPATIAL = {
    1: ["avg_pool1d", "max_pool1d"],
    2: [
        "max_pool2d_with_indices",
        "max_pool2d_with_indices_backward",
        "avg_pool2d",
        "avg_pool2d_backward",
        "_adaptive_avg_pool2d",
        "_adaptive_avg_pool2d_backward",
        "adaptive_max_pool2d",
        "adaptive_max_pool2d_backward",
        "upsample_nearest2d",
        "upsample_nearest2d_backward",
        "upsample_bilinear2d",
        "upsample_bilinear2d_backward",
        "reflection_pad2d",
        "reflection_pad2d_backward",
        "replication_pad2d",
        "replication_pad2d_backward",
    ],
    3: [
        "max_pool3d_with_indices",
        "max_pool3d_with_indices_backward",
        "avg_pool3d",
        "avg_pool3d_backward",
        "_adaptive_avg_pool3d",
        "_adaptive_avg_pool3d_backward",
    ],
}


def spatial(k: int) -> Rule:
    """A rule for an op on the trailing ``k`` dims: per-sample when the samples are on a leading dim."""

    def rule(r: RuleInput) -> FactOut:
        outputs = r.node.meta["val"]
        single = isinstance(outputs, torch.Tensor)
        batched = batched_facts(r, r.tensor_args())
        fact = agree(r, batched) if batched else REPLICATED
        if batched and fact.dim >= (outputs if single else outputs[0]).dim() - k:
            raise r.mixing(
                f"it pools or resamples over the sample axis (one of its last {k} dims)",
                "keep the batch on dim 0 (N) of (N, C, *spatial) inputs",
            )
        return fact if single else (fact,) * len(outputs)

    return rule


for _k, _names in _SPATIAL.items():
    law([getattr(aten, name).default for name in _names])(spatial(_k))
law([aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec])(spatial(2))


# Inductor's max pooling (its decomposition of max_pool{2,3}d_with_indices, which the joint graph holds under
# Inductor): the values and each window's argmax as an offset in the window, then the offsets as indices into
# each (sample, channel) plane; both work on the trailing len(kernel_size) dims like the aten pooling. Their
# backward is max_pool2d_with_indices_backward's decomposition: a scatter_add along the plane (indexing.py).
@law([prims._low_memory_max_pool_with_offsets.default, prims._low_memory_max_pool_offsets_to_indices.default])
def low_memory_max_pool(r: RuleInput) -> FactOut:
    return spatial(len(r.arg("kernel_size")))(r)
