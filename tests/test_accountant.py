"""The accountant: equal to dp_accounting's PLD, errors as AccountingError, epsilon >= 0, sigma = 0 refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import bkcompile
import bkcompile.accountant

# (sample rate, noise multiplier, steps, delta): from full-batch to MNIST-sized Poisson training.
SETTINGS = [
    (0.01, 1.0, 1000, 1e-5),
    pytest.param(0.004, 1.1, 10000, 1e-5, marks=pytest.mark.slow),
    (0.1, 2.0, 500, 1e-6),
    pytest.param(256 / 60000, 1.1, 14062, 1e-5, marks=pytest.mark.slow),
    (1.0, 5.0, 100, 1e-5),
    (0.5, 0.8, 50, 1e-5),
]


@pytest.mark.parametrize("q, sigma, steps, delta", SETTINGS)
def test_epsilon_equals_dp_accounting_pld(q: float, sigma: float, steps: int, delta: float) -> None:
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.pld import pld_privacy_accountant

    pld = pld_privacy_accountant.PLDAccountant()
    pld.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    )
    want = pld.get_epsilon(delta)
    accountant = bkcompile.PrivacyAccountant()
    accountant.step(q, sigma, steps)
    assert accountant.get_epsilon(delta) == pytest.approx(want, rel=1e-4)  # measured: at most 4e-5 apart
    low, estimate, high = accountant.get_epsilon_bounds(delta)
    assert low <= want <= high
    assert accountant.get_epsilon(delta, bound="upper") == high
    assert 0 < high - estimate <= 0.012  # eps_error 0.01, plus the effect of delta_error = delta / 1000


def test_epsilon_is_never_negative() -> None:
    accountant = bkcompile.PrivacyAccountant()
    accountant.step(1e-4, 20.0, 1)  # PRV's raw estimate here is -1e-5
    low, estimate, high = accountant.get_epsilon_bounds(1e-5)
    assert low == 0.0 and estimate == 0.0 and 0 < high <= 0.01


def test_prv_accountant_failures_are_accounting_errors(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("Cannot compute epsilon")

    monkeypatch.setattr(bkcompile.accountant, "PRVAccountant", fail)
    accountant = bkcompile.PrivacyAccountant()
    accountant.step(0.01, 1.0, 10)
    with pytest.raises(bkcompile.AccountingError, match=r"prv-accountant cannot compute epsilon.*Cannot compute.*fix"):
        accountant.get_epsilon(1e-5)
    with pytest.raises(bkcompile.AccountingError, match="prv-accountant cannot compute epsilon"):
        bkcompile.get_noise_multiplier(1.0, 1e-5, 0.01, steps=10)


def test_bad_accounting_arguments_are_refused() -> None:
    accountant = bkcompile.PrivacyAccountant()
    accountant.step(0.01, 1.0, 10)
    with pytest.raises(bkcompile.AccountingError, match="bound must be"):
        accountant.get_epsilon(1e-5, bound="lower")
    with pytest.raises(bkcompile.AccountingError, match="delta must be in"):
        accountant.get_epsilon(1.5)
    with pytest.raises(bkcompile.AccountingError, match="steps must be a positive integer"):
        accountant.step(0.01, 1.0, 0)


def test_zero_noise_with_an_accountant_is_refused_at_construction() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(bkcompile.AccountingError, match="noise_multiplier=0 with an accountant.*drop the accountant"):
        bkcompile.DPOptimizer(
            torch.optim.SGD(model.parameters(), lr=1.0),
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
            sample_rate=0.1,
            accountant=bkcompile.PrivacyAccountant(),
        )
    data = torch.utils.data.TensorDataset(torch.randn(40, 3), torch.randint(0, 2, (40,)))
    with pytest.raises(bkcompile.AccountingError, match="noise_multiplier=0"):
        bkcompile.make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=1.0),
            torch.utils.data.DataLoader(data, batch_size=4),
            max_grad_norm=1.0,
            target_delta=1e-5,
            noise_multiplier=0.0,
        )


def test_get_epsilon_documents_estimate_and_upper_bound() -> None:
    doc = bkcompile.PrivacyAccountant.__doc__
    assert "estimate" in doc and "upper" in doc and "Opacus" in doc
    assert math.isclose(bkcompile.PrivacyAccountant().get_epsilon(1e-5), 0.0)
