"""bkcompile's float64 PRV accountant (bkcompile/prv.py) against prv-accountant's long-double one, and its checks.

prv-accountant runs here with a domain 1.5 times its own: at small sigma (epsilon 20 and more) its unpadded
circular FFT wraps the composed mass above its domain onto the low end, which puts its epsilon up to 5e-6 below
what a wider domain gives (and what ours gives with its padding).
"""

from __future__ import annotations

import warnings

import pytest
from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant
from prv_accountant.accountant import compute_safe_domain_size

import bkcompile
import bkcompile.accountant
import bkcompile.prv


@pytest.fixture(autouse=True)
def _fresh_epsilon_cache():
    bkcompile.accountant._epsilon.cache_clear()
    yield
    bkcompile.accountant._epsilon.cache_clear()


def _prv_accountant(history, delta: float) -> tuple[float, float, float]:
    prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s) for q, s, _ in history]
    steps = [n for _, _, n in history]
    with warnings.catch_warnings():  # "Assuming that true epsilon < eps_max"
        warnings.simplefilter("ignore")
        domain = compute_safe_domain_size(prvs, steps, eps_error=0.01, delta_error=delta / 1000)
        accountant = PRVAccountant(
            prvs=prvs, max_self_compositions=steps, eps_error=0.01, delta_error=delta / 1000, eps_max=1.5 * domain
        )
        return accountant.compute_epsilon(delta=delta, num_self_compositions=steps)


def _epsilon(history, delta: float) -> bkcompile.accountant.Epsilon:
    accountant = bkcompile.PrivacyAccountant()
    for step in history:
        accountant.step(*step)
    return accountant.epsilon(delta)


# (history, delta): q from 1e-3 to 1, sigma 0.6 to 5, 1 to 10^4 steps, delta 1e-6 to 1e-4; the quickstart's
# history (batch 32 of 360 rows for 40 epochs); one history of three mechanisms.
SETTINGS = [
    ([(1.0, 5.0, 1)], 1e-4),
    ([(1e-3, 5.0, 10000)], 1e-4),
    ([(0.01, 1.0, 1000)], 1e-6),
    ([(0.0889, 1.399, 480)], 1e-5),
    ([(0.5, 0.6, 10)], 1e-5),
    ([(0.02, 3.0, 2000)], 1e-4),
    ([(1e-3, 0.6, 3000)], 1e-5),
    ([(0.05, 1.2, 50), (0.01, 0.9, 150), (0.2, 4.0, 10)], 1e-5),
]


@pytest.mark.parametrize("history, delta", SETTINGS)
def test_bounds_equal_prv_accountants(history, delta: float) -> None:
    result = _epsilon(history, delta)
    assert result.method == "prv"
    want = _prv_accountant(history, delta)
    got = (result.lower, result.estimate, result.upper)
    assert got == pytest.approx(want, abs=1e-6, rel=0)  # measured: at most 3.3e-7 apart


def test_where_prv_accountant_refused_the_mean_is_right_and_prv_resolves() -> None:
    # Batch 32 of 256 rows for 40 epochs: prv-accountant's quadrature puts the mean privacy loss at 0.0129 where
    # it is 0.0110226 (40 digits: 0.011022632358222033), and refuses ("Discrete mean differs ...").
    history = [(0.125, 1.0, 320)]
    mean, error = bkcompile.prv._truncated_mean(0.125, 1.0, -28.0, 28.0)
    assert mean == pytest.approx(0.011022632358222033, abs=1e-15) and error < 1e-14
    result = _epsilon(history, 1e-5)
    pld = 16.5552  # dp_accounting's PLD at its defaults (1 s here): a certified upper bound
    assert result.method == "prv" and result.lower <= pld
    assert result.estimate == pytest.approx(pld, abs=1e-4)  # measured: 16.55525


def test_a_discrete_mean_far_from_the_continuous_one_falls_back_to_pld(monkeypatch) -> None:
    history = [(0.01, 1.0, 100)]
    resolved = _epsilon(history, 1e-5)
    mean = bkcompile.prv._truncated_mean

    def wrong(q, sigma, low, high):
        right, error = mean(q, sigma, low, high)
        return right + 1e-3, error  # (prv-accountant's was 1.9e-3 off at q = 0.125, sigma = 1)

    monkeypatch.setattr(bkcompile.prv, "_truncated_mean", wrong)
    bkcompile.accountant._epsilon.cache_clear()
    result = _epsilon(history, 1e-5)
    assert result.method == "pld"
    assert "PRV: ArithmeticError: the discrete mean privacy loss is 0.001 from" in result.reason
    assert resolved.method == "prv" and resolved.lower <= result.upper
    assert result.upper == pytest.approx(resolved.estimate, abs=1e-4)
