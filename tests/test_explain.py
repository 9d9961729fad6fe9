"""bkcompile.explain leaves the user's compiled models alone, and the report says how it found the loss scale."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import bkcompile


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def test_explain_keeps_the_users_compiled_model_and_compiles_its_own_copy() -> None:
    model, x = _mlp(), torch.randn(5, 4)
    options = {"max_grad_norm": 1.0, "compiler": "aot_eager"}  # the options explain uses by default
    compiled = torch.compile(model, backend="bk_dp", options=options)
    compiled(x).sum().backward()
    graphs = counters["stats"]["unique_graphs"]
    reports = [bkcompile.explain(model, x) for _ in range(10)]  # more than dynamo's recompile limit (8)
    assert all([row.param for row in r.rows] == ["0.weight", "0.bias", "2.weight", "2.bias"] for r in reports)
    assert counters["stats"]["unique_graphs"] == graphs + 10  # each explain traced its own copy
    reference = copy.deepcopy(model)
    for p in (*model.parameters(), *reference.parameters()):
        p.grad = None
    compiled(x).sum().backward()  # the user's compiled model: no recompile, still clipping
    assert counters["stats"]["unique_graphs"] == graphs + 10
    reference(x).sum().backward()
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    plain = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm()
    assert clipped <= 5 * 1.0 + 1e-6 < plain


class _MeanLoss(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x, y):
        return F.cross_entropy(self.fc(x), y)


def test_the_report_says_how_the_loss_scale_was_found() -> None:
    x = torch.randn(5, 4)
    outside = bkcompile.explain(_mlp(), x)
    assert outside.loss_scale == (
        "s = B, from loss_reduction='auto' (the default): the loss is computed outside the compiled model and "
        "taken as a mean over the batch, unchecked (LossReductionWarning)"
    )
    assert "loss scale: s = B, from loss_reduction='auto' (the default)" in str(outside)
    inside = bkcompile.explain(_MeanLoss(), x, torch.tensor([0, 1, 2, 0, 1]))
    assert inside.loss_scale.startswith(
        "s = the loss's total weight, from cross-entropy/nll loss, reduction='mean' (divided by its total weight) at "
    )
    assert "test_explain.py" in inside.loss_scale and "F.cross_entropy(self.fc(x), y)" in inside.loss_scale
    assert inside.to_dict()["loss_scale"] == inside.loss_scale
