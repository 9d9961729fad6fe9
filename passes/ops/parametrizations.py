"""Parameters transformed before use (weight norm, weight standardisation, other parametrizations).

The gradient of the raw parameter is the transform's Jacobian (transposed) applied to the gradient of the
weight the layer uses: a linear map, by sample-independent values, of a sum over samples. The site pass
follows such maps (the ``lift_linear`` laws: scalings, sums over dims, broadcasts, masks, differences) and
the clip pass applies them to each sample's gradient, so such a parameter gets its exact per-sample
gradient (explicitly). Fused transform backwards are decomposed here into those ops.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def weight_norm_backward(grad_w, saved_v, saved_g, saved_norms, dim):
    """w = g * v / ||v|| (norms over every dim but ``dim``): grad_g = <grad_w, v> / ||v||,
    grad_v = g / ||v|| * (grad_w - v * grad_g / ||v||)."""
    dims = [d for d in range(saved_v.dim()) if d != dim]
    grad_g = (grad_w * saved_v).sum(dims, keepdim=True) / saved_norms
    grad_v = (saved_g / saved_norms) * (grad_w - saved_v * (grad_g / saved_norms))
    return grad_v, grad_g


DECOMPOSITIONS = {aten._weight_norm_interface_backward.default: weight_norm_backward}
