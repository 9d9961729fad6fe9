"""Instances of one model class: dynamo compiles the graph once and reuses it for every instance (the
parameters are graph inputs), yet each call clips into the ledger and clip state of the parameters it
passes (norms, adaptive thresholds and counts, backward counts), exact against the oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import raises_bk
from oracle import clipped_sum
from torch._dynamo.utils import counters

import bkcompile
from bkcompile.errors import ClipOnceError, PrivacyError
from bkcompile.runtime.ledger import ledger_of

R = 0.1
OPTIONS = {"max_grad_norm": R, "compiler": "aot_eager", "loss_reduction": "mean"}  # _loss: a batch mean
TOL = 1e-10
SIZES = {"A": 5, "B": 5}  # one batch size: a second one would make dynamo recompile for dynamic shapes


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


class _BrokenNet(_Net):
    """Two graphs (pieces of the model, clipped together at the end of the backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h)


def _instances(net: type[nn.Module] = _Net) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: net().double() for name in SIZES}


def _batches() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return {
        name: (torch.randn(size, 6, dtype=torch.double, generator=generator), torch.randint(0, 3, (size,)))
        for name, size in SIZES.items()
    }


def _loss(compiled: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(compiled(x), y)


def _check_against_oracle(models, batches) -> None:
    for name, model in models.items():
        want, norms = clipped_sum(model, F.cross_entropy, (batches[name][0],), (batches[name][1],), max_grad_norm=R)
        for param_name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[param_name], rtol=TOL, atol=TOL, msg=f"{name}.{param_name}")
        torch.testing.assert_close(bkcompile.last_per_sample_norms(model), norms, rtol=TOL, atol=0, msg=name)
        state = ledger_of(model).last_state()
        assert state.backwards == 1, name
        assert state.rows.tolist() == [SIZES[name]], name  # this model's rows only
        assert state.below.tolist() == [float((norms <= R).sum())], name


def _backwards(compiled, batches, interleaved: bool) -> None:
    """One after the other (forward and backward of A, then of B), or interleaved in one step (both forwards,
    then both backwards)."""
    if interleaved:
        losses = [_loss(compiled[name], batches[name]) for name in compiled]
        for loss in losses:
            loss.backward()
    else:
        for name in compiled:
            _loss(compiled[name], batches[name]).backward()


def _train(interleaved: bool, net: type[nn.Module] = _Net):
    models, batches = _instances(net), _batches()
    compiled = {name: torch.compile(m, backend="bk_dp", options=OPTIONS) for name, m in models.items()}
    graphs = counters["stats"]["unique_graphs"]
    _backwards(compiled, batches, interleaved)
    # the graphs of the first instance, reused for the second
    assert counters["stats"]["unique_graphs"] - graphs == (2 if net is _BrokenNet else 1)
    return models, batches


MODES = pytest.mark.parametrize("interleaved", [False, True], ids=["one_after_the_other", "interleaved"])


@MODES
@pytest.mark.parametrize("net", [_Net, _BrokenNet], ids=["one_graph", "pieces"])
def test_each_instance_clips_into_its_own_ledger(interleaved: bool, net: type[nn.Module]) -> None:
    models, batches = _train(interleaved, net)
    assert ledger_of(models["A"]) is not ledger_of(models["B"])
    assert ledger_of(models["A"]).last_state() is not ledger_of(models["B"]).last_state()
    _check_against_oracle(models, batches)


@MODES
def test_a_dp_optimizer_steps_each_instance(interleaved: bool) -> None:
    models, batches = _instances(), _batches()
    compiled = {name: torch.compile(m, backend="bk_dp", options=OPTIONS) for name, m in models.items()}
    optimizers = {
        name: bkcompile.DPOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.5),
            noise_multiplier=0.0,
            max_grad_norm=R,
            expected_batch_size=SIZES[name],
            adaptive_clipping=bkcompile.AdaptiveClipping(count_noise=1.0, learning_rate=0.5),
        )
        for name, m in models.items()
    }
    for step in range(2):
        for optimizer in optimizers.values():
            optimizer.zero_grad()
        _backwards(compiled, batches, interleaved)
        before = {name: [p.detach().clone() for p in m.parameters()] for name, m in models.items()}
        wants = {
            name: clipped_sum(m, F.cross_entropy, *((b[0],), (b[1],)), max_grad_norm=_threshold(m))[0]
            for (name, m), b in zip(models.items(), batches.values())
        }
        counts = {name: ledger_of(m).last_state().rows.tolist() for name, m in models.items()}
        assert counts == {name: [float(size)] for name, size in SIZES.items()}, step  # adaptive counts per model
        for optimizer in optimizers.values():
            optimizer.step()
        for name, model in models.items():
            for old, (param_name, p) in zip(before[name], model.named_parameters()):
                want = old - 0.5 * wants[name][param_name] / SIZES[name]
                torch.testing.assert_close(p.detach(), want, rtol=TOL, atol=TOL, msg=f"{step} {name}.{param_name}")
    thresholds = {name: _threshold(m) for name, m in models.items()}
    assert thresholds["A"] != R and thresholds["B"] != R and thresholds["A"] != thresholds["B"]


def _threshold(model: nn.Module) -> float:
    (state,) = ledger_of(model).states
    return float(state.thresholds[0])


def test_one_optimizer_over_two_instances_is_refused() -> None:
    models, batches = _instances(), _batches()
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD([p for m in models.values() for p in m.parameters()], lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=R,
        expected_batch_size=10,
    )
    optimizer.zero_grad()
    compiled = {name: torch.compile(m, backend="bk_dp", options=OPTIONS) for name, m in models.items()}
    _backwards(compiled, batches, interleaved=True)
    with pytest.raises(PrivacyError, match="different clipping groups reached one DP optimizer step"):
        optimizer.step()


def test_one_instance_called_twice_in_one_backward_is_still_refused() -> None:
    models, batches = _instances(), _batches()
    compiled = torch.compile(models["A"], backend="bk_dp", options=OPTIONS)
    loss = _loss(compiled, batches["A"]) + _loss(compiled, batches["B"])
    with raises_bk(ClipOnceError, "the compiled model was called twice before one backward"):
        loss.backward()


def test_one_loss_over_two_instances_is_refused_like_two_models() -> None:
    """One backward through two whole-model calls is refused whether the instances share a graph or not: at the
    backward, blocks compiled one by one and independent models look alike (each clips its own part)."""
    models, batches = _instances(), _batches()
    compiled = {name: torch.compile(m, backend="bk_dp", options=OPTIONS) for name, m in models.items()}
    loss = sum(_loss(compiled[name], batches[name]) for name in models)
    with raises_bk(ClipOnceError, "two bk_dp graphs ran in one backward"):
        loss.backward()


def test_a_backward_run_by_compiled_autograd_is_refused() -> None:
    """Compiled autograd runs the graph's backward outside torch's autograd engine, so no call's tap is among the
    running node's inputs: the clip state of the call cannot be found, and the backward refuses to clip."""
    models, batches = _instances(), _batches()
    compiled = torch.compile(models["A"], backend="bk_dp", options=OPTIONS)
    loss = _loss(compiled, batches["A"])
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
        with raises_bk(PrivacyError, "ran outside the call that produced it", "not compiled autograd"):
            loss.backward()
    assert all(p.grad is None for p in models["A"].parameters())
