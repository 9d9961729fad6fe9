"""The accountant: equal to dp_accounting's PLD, errors as AccountingError, epsilon >= 0, sigma = 0 refused.

Where the PRV accountant does not resolve, epsilon is dp_accounting's PLD upper bound (marked ``"pld"``); the
noise search is checked against dp_accounting's PLD computed here, and timed.
"""

from __future__ import annotations

import math
import time

import dp_accounting
import pytest
import torch
import torch.nn as nn
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

import bkcompile
import bkcompile.accountant
import bkcompile.prv


@pytest.fixture(autouse=True)
def _fresh_epsilon_cache():
    """Epsilon is cached per history: a test that breaks an accountant must not leave its answers behind."""
    bkcompile.accountant._epsilon.cache_clear()
    yield
    bkcompile.accountant._epsilon.cache_clear()


def _event(history):
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
            )
            for q, sigma, steps in history
        ]
    )


def _pld_epsilon(history, delta: float) -> float:
    """dp_accounting's PLD accountant at its defaults, computed independently of bkcompile."""
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(_event(history))
    return accountant.get_epsilon(delta)


def _rdp_epsilon(history, delta: float, orders=None) -> float:
    accountant = rdp_privacy_accountant.RdpAccountant(orders)
    accountant.compose(_event(history))
    return accountant.get_epsilon(delta)


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
    assert accountant.last_epsilon.method == "prv"
    low, estimate, high = accountant.get_epsilon_bounds(delta)
    assert low <= want <= high
    assert accountant.get_epsilon(delta, bound="upper") == high
    assert 0 < high - estimate <= 0.012  # eps_error 0.01, plus the effect of delta_error = delta / 1000


def test_epsilon_is_never_negative() -> None:
    accountant = bkcompile.PrivacyAccountant()
    accountant.step(1e-4, 20.0, 1)  # PRV's raw estimate here is -1e-5
    low, estimate, high = accountant.get_epsilon_bounds(1e-5)
    assert low == 0.0 and estimate == 0.0 and 0 < high <= 0.01


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


def test_where_prv_fails_epsilon_is_dp_accounting_pld_upper_bound() -> None:
    # Batch 32 of 256 rows for 40 epochs at delta 1e-8: PRV refuses (float64 rounding over its 424,000 points
    # is not far below delta_error = 1e-11).
    accountant = bkcompile.PrivacyAccountant()
    accountant.step(0.125, 1.0, 320)
    result = accountant.epsilon(1e-8)
    want = _pld_epsilon([(0.125, 1.0, 320)], 1e-8)
    assert result.method == "pld" and "PRV: ArithmeticError: float64 rounding over" in result.reason
    assert want <= result.upper <= want * (1 + 1e-5)
    assert result.upper <= _rdp_epsilon([(0.125, 1.0, 320)], 1e-8)
    assert accountant.get_epsilon(1e-8) == accountant.get_epsilon(1e-8, bound="upper") == result.upper
    assert accountant.get_epsilon_bounds(1e-8) == (0.0, result.upper, result.upper)
    assert accountant.last_epsilon is result


def test_any_prv_failure_falls_back_to_pld_then_rdp(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("Cannot compute epsilon")

    history = [(0.01, 1.0, 10)]
    monkeypatch.setattr(bkcompile.prv, "epsilon_bounds", fail)
    accountant = bkcompile.PrivacyAccountant()
    accountant.step(*history[0])
    result = accountant.epsilon(1e-5)
    assert result.method == "pld" and result.reason == "PRV: RuntimeError: Cannot compute epsilon"
    assert result.upper == pytest.approx(_pld_epsilon(history, 1e-5), rel=1e-9)  # the same grid, 1e-4

    monkeypatch.setattr(bkcompile.accountant, "_pld_epsilon", fail)
    bkcompile.accountant._epsilon.cache_clear()
    result = accountant.epsilon(1e-5)
    assert result.method == "rdp" and "PLD fails: RuntimeError" in result.reason
    assert result.upper == pytest.approx(_rdp_epsilon(history, 1e-5), rel=1e-12)
    assert result.upper >= _pld_epsilon(history, 1e-5)


def test_prv_is_skipped_where_its_domain_would_be_huge() -> None:
    accountant = bkcompile.PrivacyAccountant()
    accountant.step(0.125, 0.1, 320)  # PRV: 3.5e8 points, minutes; dp_accounting's PLD at 1e-4: minutes too
    start = time.perf_counter()
    result = accountant.epsilon(1e-5)
    assert time.perf_counter() - start < 10  # measured: 0.13 s
    assert result.method == "pld" and "skipped, its domain would hold 3.5e+08 points" in result.reason
    assert 3000 < result.upper <= _rdp_epsilon([(0.125, 0.1, 320)], 1e-5)  # RDP: 10501; PLD at 1e-3: 3228.4


@pytest.mark.slow  # dp_accounting's PLD as the reference: 1.5 s
def test_a_history_of_several_noise_multipliers_is_composed() -> None:
    history = [(0.125, 0.9, 50), (0.125, 1.2, 100)]
    accountant = bkcompile.PrivacyAccountant()
    for step in history:
        accountant.step(*step)
    result = accountant.epsilon(1e-5)
    want = _pld_epsilon(history, 1e-5)  # a certified upper bound
    assert result.method == "prv" and result.lower <= want
    assert result.estimate == pytest.approx(want, abs=1e-4)


def test_empty_history_is_exactly_zero() -> None:
    result = bkcompile.PrivacyAccountant().epsilon(1e-5)
    assert (result.lower, result.estimate, result.upper, result.method) == (0.0, 0.0, 0.0, "exact")


def test_vectorised_rdp_equals_dp_accounting_rdp_at_the_same_orders() -> None:
    orders = list(bkcompile.accountant._ORDERS)
    for history in (
        [(0.125, 1.5, 320)],
        [(1.0, 5.0, 100)],
        [(0.001, 0.5, 100000)],
        [(0.1, 2.0, 500), (0.02, 1.0, 300)],
    ):
        want = _rdp_epsilon(history, 1e-5, orders)
        assert bkcompile.accountant._rdp_epsilon(tuple(history), 1e-5) == pytest.approx(want, rel=1e-9)


# (target epsilon, sample rate, epochs): batch 32 of 256 rows (where PRV fails below sigma 1.45), then
# q = 0.01 for 10 and 100 epochs.
SEARCHES = [
    (8.0, 0.125, 40),
    (1.0, 0.01, 10),
    (3.0, 0.01, 10),
    pytest.param(8.0, 0.01, 10, marks=pytest.mark.slow),
    pytest.param(1.0, 0.01, 100, marks=pytest.mark.slow),
    pytest.param(3.0, 0.01, 100, marks=pytest.mark.slow),
    pytest.param(8.0, 0.01, 100, marks=pytest.mark.slow),  # the check at 10,000 steps takes 2 s
]


@pytest.mark.parametrize("target, q, epochs", SEARCHES)
def test_noise_search_meets_the_target_by_dp_accounting_pld(target: float, q: float, epochs: int) -> None:
    sigma = bkcompile.get_noise_multiplier(target, 1e-5, q, epochs=epochs)  # its time: the closing note, not a test
    steps = epochs * math.ceil(1 / q)
    epsilon = _pld_epsilon([(q, sigma, steps)], 1e-5)
    assert 0.97 * target <= epsilon <= target - 0.01  # eps_error = 0.01 kept in reserve
    assert _pld_epsilon([(q, sigma - 0.01, steps)], 1e-5) > target - 0.01  # the smallest, to tolerance 0.01
    accountant = bkcompile.PrivacyAccountant()
    accountant.step(q, sigma, steps)
    assert accountant.get_epsilon(1e-5, bound="upper") <= target


def test_noise_search_takes_a_sigma_that_cannot_be_computed_as_too_small(monkeypatch) -> None:
    pld = bkcompile.accountant._pld_epsilon

    def refuse_below_1_55(history, delta, interval):
        if history[0][1] < 1.55:
            raise RuntimeError("cannot compute")
        return pld(history, delta, interval)

    monkeypatch.setattr(bkcompile.accountant, "_pld_epsilon", refuse_below_1_55)
    sigma = bkcompile.get_noise_multiplier(8.0, 1e-5, 0.125, epochs=40)
    assert 1.55 <= sigma <= 1.56 and _pld_epsilon([(0.125, sigma, 320)], 1e-5) <= 8.0  # unrefused: 1.5575


def test_bad_input_to_the_accountant_and_the_search_is_refused() -> None:
    accountant = bkcompile.PrivacyAccountant()
    for q, sigma, match in [(0.0, 1.0, "sample_rate must be in"), (1.5, 1.0, "sample_rate"), (0.1, -1.0, "noise_mult")]:
        with pytest.raises(bkcompile.AccountingError, match=match):
            accountant.step(q, sigma)
    for delta in (0.0, 1.0, -1e-5):
        with pytest.raises(bkcompile.AccountingError, match=r"delta must be in \(0, 1\).*fix"):
            accountant.get_epsilon(delta)
        with pytest.raises(bkcompile.AccountingError, match="delta must be in"):
            bkcompile.get_noise_multiplier(3.0, delta, 0.01, steps=100)
    with pytest.raises(bkcompile.AccountingError, match="sample_rate must be in"):
        bkcompile.get_noise_multiplier(3.0, 1e-5, 1.5, steps=100)
    with pytest.raises(bkcompile.AccountingError, match="exactly one of steps and epochs"):
        bkcompile.get_noise_multiplier(3.0, 1e-5, 0.01, steps=100, epochs=1)
    with pytest.raises(bkcompile.AccountingError, match="target_epsilon must exceed eps_error.*fix"):
        bkcompile.get_noise_multiplier(0.01, 1e-5, 0.01, steps=100)


def test_an_unreachable_target_is_an_accounting_error() -> None:
    # 10^6 full-batch steps at delta 1e-10: epsilon 0.577 even at sigma 10^4.
    with pytest.raises(bkcompile.AccountingError, match=r"no noise multiplier up to 10000 .* 0\.577 there.*fix"):
        bkcompile.get_noise_multiplier(0.5, 1e-10, 1.0, steps=10**6)
