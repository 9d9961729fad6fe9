"""Privacy accounting with prv-accountant (Poisson-subsampled Gaussian mechanism)."""

from __future__ import annotations

import math

from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

from bkcompile.errors import BKError


class AccountingError(BKError, ValueError):
    """Accountant arguments out of range, or a target epsilon no noise multiplier in range reaches."""


def _check(sample_rate: float, noise_multiplier: float) -> None:
    if not 0 < sample_rate <= 1:
        raise AccountingError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not noise_multiplier > 0:
        raise AccountingError(f"noise_multiplier must be positive, got {noise_multiplier}")


def steps_per_epoch(sample_rate: float) -> int:
    """Poisson steps that make one epoch: ceil(1 / q) (each example is seen once per epoch in expectation)."""
    return max(1, math.ceil(1 / sample_rate))


def _epsilon(history: list[list], delta: float, eps_error: float) -> tuple[float, float, float]:
    if not history:
        return (0.0, 0.0, 0.0)
    if not 0 < delta < 1:
        raise AccountingError(f"delta must be in (0, 1), got {delta}")
    prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s) for q, s, _ in history]
    steps = [n for _, _, n in history]
    accountant = PRVAccountant(prvs=prvs, max_self_compositions=steps, eps_error=eps_error, delta_error=delta / 1000)
    return tuple(accountant.compute_epsilon(delta=delta, num_self_compositions=steps))


class PrivacyAccountant:
    """Records (sample rate q, noise multiplier sigma, steps) and answers epsilon at a delta.

    ``get_epsilon`` returns prv-accountant's estimate; ``get_epsilon_bounds`` its (lower, estimate, upper)
    with |error| <= ``eps_error``.
    """

    def __init__(self) -> None:
        self.history: list[list] = []  # [[q, sigma, steps], ...], consecutive equal (q, sigma) merged

    def step(self, sample_rate: float, noise_multiplier: float, steps: int = 1) -> None:
        _check(sample_rate, noise_multiplier)
        if self.history and self.history[-1][:2] == [sample_rate, noise_multiplier]:
            self.history[-1][2] += steps
        else:
            self.history.append([sample_rate, noise_multiplier, steps])

    def get_epsilon_bounds(self, delta: float, eps_error: float = 0.01) -> tuple[float, float, float]:
        return _epsilon(self.history, delta, eps_error)

    def get_epsilon(self, delta: float, eps_error: float = 0.01) -> float:
        return self.get_epsilon_bounds(delta, eps_error)[1]

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [list(h) for h in state["history"]]


def get_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int | None = None,
    epochs: float | None = None,
    tolerance: float = 0.01,
    eps_error: float = 0.01,
) -> float:
    """The smallest sigma (to within ``tolerance``) whose epsilon after the given steps is <= target.

    Give ``steps`` or ``epochs`` (steps = ceil(epochs * steps_per_epoch(sample_rate)), the steps a
    ``PoissonLoader`` takes over that many epochs). The returned sigma always meets
    the target: it is the upper end of the bisection bracket.
    """
    if (steps is None) == (epochs is None):
        raise AccountingError("give exactly one of steps and epochs")
    if not target_epsilon > 0:
        raise AccountingError(f"target_epsilon must be positive, got {target_epsilon}")
    _check(sample_rate, 1.0)
    if steps is None:
        steps = math.ceil(epochs * steps_per_epoch(sample_rate))

    def epsilon(sigma: float) -> float:
        return _epsilon([[sample_rate, sigma, steps]], delta, eps_error)[2]

    low, high = 0.1, 1.0
    while epsilon(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise AccountingError(f"no noise multiplier up to 1e4 reaches epsilon {target_epsilon}")
    while high - low > tolerance:
        middle = (low + high) / 2
        if epsilon(middle) > target_epsilon:
            low = middle
        else:
            high = middle
    return high
