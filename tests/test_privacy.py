"""DP training pieces: accountant, noise, virtual batches, empty batches, end to end against eager DP-SGD."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracle import clipped_sum

import bkcompile

OPTIONS = {"max_grad_norm": 0.5, "compiler": "aot_eager", "loss_reduction": "mean"}


@pytest.mark.parametrize(
    "q, sigma, steps, delta",
    [(0.05, 1.1, 300, 1e-5), (0.01, 0.8, 1000, 1e-6), (0.2, 2.0, 50, 1e-5), (1.0, 5.0, 20, 1e-5)],
)
def test_epsilon_agrees_with_dp_accounting(q: float, sigma: float, steps: int, delta: float) -> None:
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(event)
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(event)
    accountant = bkcompile.PrivacyAccountant()
    accountant.step(q, sigma, steps)
    low, estimate, high = accountant.get_epsilon_bounds(delta)
    pld_eps = pld.get_epsilon(delta)
    assert low - 0.02 <= pld_eps <= high + 0.02  # within PRV's bounds (and PLD's own discretisation)
    assert estimate <= rdp.get_epsilon(delta)


@pytest.mark.slow  # two dozen accountant evaluations
def test_noise_multiplier_search_round_trips() -> None:
    sigma = bkcompile.get_noise_multiplier(3.0, 1e-5, 0.02, steps=500, tolerance=0.005)
    accountant = bkcompile.PrivacyAccountant()
    accountant.step(0.02, sigma, 500)
    assert accountant.get_epsilon_bounds(1e-5)[2] <= 3.0
    accountant = bkcompile.PrivacyAccountant()
    accountant.step(0.02, sigma - 0.02, 500)
    assert accountant.get_epsilon(1e-5) > 3.0 - 0.02


def _compiled_linear(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(5, 3).double()
    return model, torch.compile(model, backend="bk_dp", options=OPTIONS)


def test_noise_has_the_right_standard_deviation() -> None:
    model = nn.Linear(200, 50)
    inner = torch.optim.SGD(model.parameters(), lr=0.0)
    optimizer = bkcompile.DPOptimizer(
        inner,
        noise_multiplier=1.3,
        max_grad_norm=0.7,
        expected_batch_size=4.0,
        generator=torch.Generator().manual_seed(0),
    )
    optimizer.zero_grad()
    optimizer.step()  # an empty batch: noise only
    noise = model.weight.grad * 4.0
    assert abs(noise.std().item() - 1.3 * 0.7) < 0.02 * 1.3 * 0.7  # 10,000 draws: 1% standard error
    assert abs(noise.mean().item()) < 0.03


def test_accumulated_micro_batches_equal_one_big_batch_without_noise() -> None:
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    grads = []
    for chunks in (1, 3):
        model, compiled = _compiled_linear()
        optimizer = bkcompile.DPOptimizer(
            torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=12
        )
        optimizer.zero_grad()
        for xs, ys in zip(x.chunk(chunks), y.chunk(chunks)):
            F.cross_entropy(compiled(xs), ys).backward()
        optimizer.step()
        grads.append(model.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_gradients_not_from_bk_dp_are_refused() -> None:
    model = nn.Linear(5, 3)
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4
    )
    optimizer.zero_grad()
    F.cross_entropy(model(torch.randn(4, 5)), torch.randint(0, 3, (4,))).backward()  # plain eager backward
    with pytest.raises(bkcompile.PrivacyError, match="not produced by a bk_dp backward"):
        optimizer.step()


def test_training_without_noise_equals_eager_dp_sgd() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    reference = copy.deepcopy(model)
    data = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    loader = bkcompile.PoissonLoader(*data, sample_rate=0.3, steps=5, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="bk_dp", options=OPTIONS)
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=0.0, max_grad_norm=0.5, expected_batch_size=12.0
    )
    reference_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        optimizer.step()
        summed, _ = clipped_sum(reference, F.cross_entropy, (x,), (y,), max_grad_norm=0.5)
        for name, p in reference.named_parameters():
            p.grad = summed[name] / 12.0
        reference_opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)


def test_poisson_batches_vary_include_empty_and_do_not_recompile() -> None:
    from torch._dynamo.utils import counters

    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    loader = bkcompile.PoissonLoader(x, y, sample_rate=0.3, steps=30, generator=torch.Generator().manual_seed(3))
    model, compiled = _compiled_linear()
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=0.5,
        expected_batch_size=1.8,
        generator=torch.Generator().manual_seed(0),
    )
    counters.clear()
    sizes = set()
    for xb, yb in loader:
        sizes.add(len(xb))
        optimizer.zero_grad()
        if len(xb):
            F.cross_entropy(compiled(xb), yb).backward()
        before = model.weight.detach().clone()
        optimizer.step()
        assert not torch.equal(before, model.weight)  # every step moves, the empty ones by noise alone
    assert 0 in sizes and len(sizes) >= 4
    assert counters["stats"]["unique_graphs"] == 1


def test_make_private_refuses_bad_arguments() -> None:
    model = nn.Linear(5, 3)
    data = torch.utils.data.TensorDataset(torch.randn(50, 5), torch.randint(0, 3, (50,)))
    loader = torch.utils.data.DataLoader(data, batch_size=10)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(bkcompile.BKError, match="exactly one of noise_multiplier"):
        bkcompile.make_private(model, sgd, loader, max_grad_norm=1.0, target_delta=1e-5)
    with pytest.raises(bkcompile.BKError, match="exactly one of noise_multiplier"):
        bkcompile.make_private(
            model, sgd, loader, max_grad_norm=1.0, target_delta=1e-5, noise_multiplier=1.0, target_epsilon=2.0, epochs=1
        )
    with pytest.raises(bkcompile.BKError, match="already compiled"):
        bkcompile.make_private(
            torch.compile(model), sgd, loader, max_grad_norm=1.0, target_delta=1e-5, noise_multiplier=1.0
        )
    big = torch.utils.data.DataLoader(data, batch_size=80)
    with pytest.raises(bkcompile.BKError, match="outside"):
        bkcompile.make_private(model, sgd, big, max_grad_norm=1.0, target_delta=1e-5, noise_multiplier=1.0)
    with pytest.warns(UserWarning, match="1/n"):
        bkcompile.make_private(model, sgd, loader, max_grad_norm=1.0, target_delta=0.1, noise_multiplier=1.0)


def test_accountant_state_survives_a_resume() -> None:
    model = nn.Linear(5, 3)
    first = bkcompile.DPOptimizer(
        torch.optim.Adam(model.parameters()),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=5,
        sample_rate=0.1,
        accountant=bkcompile.PrivacyAccountant(),
    )
    for _ in range(7):
        first.zero_grad()
        first.step()
    resumed = bkcompile.DPOptimizer(
        torch.optim.Adam(model.parameters()),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=5,
        sample_rate=0.1,
        accountant=bkcompile.PrivacyAccountant(),
    )
    resumed.load_state_dict(first.state_dict())
    assert resumed.accountant.history == [[0.1, 1.0, 7]]
    assert resumed.accountant.get_epsilon(1e-5) == first.accountant.get_epsilon(1e-5)
