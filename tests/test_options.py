"""Options and the Inductor config of the bk_dp graphs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import zoo
from helpers import assert_matches
from oracle import clipped_sum


@pytest.mark.slow
def test_the_global_inductor_config_cannot_turn_the_pass_off() -> None:
    """``use_joint_graph_passes=False`` in the global config skips Inductor's joint-graph passes, bk_dp's pass
    among them: the bk_dp graphs turn them on for themselves, so the gradients are still clipped."""
    model, x, y = zoo.MLP().double(), torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="bk_dp", options={"max_grad_norm": 0.1})
    with torch._inductor.config.patch(use_joint_graph_passes=False):
        F.cross_entropy(compiled(x), y).backward()
    want, norms = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=0.1)
    assert (norms > 0.1).all()
    assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float64)
