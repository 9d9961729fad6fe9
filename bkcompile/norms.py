"""The per-sample gradient norms of the last backward, recorded by the compiled graph for monitoring.

The graph calls ``bkcompile::record_norms`` on the norms (before clipping); its result feeds the
clip factors, so no compiler removes it.
"""

from __future__ import annotations

import torch

_LAST: dict[str, torch.Tensor] = {}
_COUNT = [0]


@torch.library.custom_op("bkcompile::record_norms", mutates_args=())
def record_norms(norms: torch.Tensor) -> torch.Tensor:
    _LAST["norms"] = norms.detach().clone()
    _COUNT[0] += 1
    return norms.clone()


@record_norms.register_fake
def _record_norms_fake(norms: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(norms)


def last_per_sample_norms() -> torch.Tensor | None:
    """Per-sample gradient norms ||g_i|| of the most recent bk_dp backward, before clipping (None before any).

    ``g_i`` is sample i's gradient of its own loss over all trainable parameters; the fraction of
    clipped samples is ``(norms > max_grad_norm).float().mean()``.
    """
    return _LAST.get("norms")


def backward_count() -> int:
    """How many bk_dp backwards have run in this process (the DP optimizer checks its gradients' origin)."""
    return _COUNT[0]
