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
    """prv-accountant's (lower, estimate, upper) for the composed history, clamped at 0 (epsilon is >= 0)."""
    if not history:
        return (0.0, 0.0, 0.0)
    if not 0 < delta < 1:
        raise AccountingError(f"delta must be in (0, 1), got {delta}")
    if not eps_error > 0:
        raise AccountingError(f"eps_error must be positive, got {eps_error}")
    prvs = [PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s) for q, s, _ in history]
    steps = [n for _, _, n in history]
    try:
        accountant = PRVAccountant(
            prvs=prvs, max_self_compositions=steps, eps_error=eps_error, delta_error=delta / 1000
        )
        bounds = accountant.compute_epsilon(delta=delta, num_self_compositions=steps)
    except (ArithmeticError, MemoryError, RuntimeError, ValueError) as error:
        raise AccountingError(
            f"prv-accountant cannot compute epsilon at delta={delta} for the history "
            f"(sample rate, noise multiplier, steps) {history}: {type(error).__name__}: {error}. Such a setting "
            "is outside what it resolves (epsilon in the hundreds, or delta near 0 or 1); fix: use a larger noise "
            "multiplier or an ordinary delta, or a larger eps_error"
        ) from error
    return tuple(max(0.0, float(b)) for b in bounds)


class PrivacyAccountant:
    """Records (sample rate q, noise multiplier sigma, steps) and answers epsilon at a delta.

    Each recorded step is one Poisson-subsampled Gaussian mechanism under add/remove-one neighbouring
    datasets. ``get_epsilon`` returns prv-accountant's *estimate* by default (within ``eps_error`` of the
    true epsilon of the composition; it agrees with dp_accounting's PLD accountant to about 1e-4), and
    ``get_epsilon(delta, bound="upper")`` its certified upper bound (what Opacus reports);
    ``get_epsilon_bounds`` gives (lower, estimate, upper). Errors of the computation are ``AccountingError``.
    """

    def __init__(self) -> None:
        self.history: list[list] = []  # [[q, sigma, steps], ...], consecutive equal (q, sigma) merged

    def step(self, sample_rate: float, noise_multiplier: float, steps: int = 1) -> None:
        _check(sample_rate, noise_multiplier)
        if not (isinstance(steps, int) and steps > 0):
            raise AccountingError(f"steps must be a positive integer, got {steps!r}")
        if self.history and self.history[-1][:2] == [sample_rate, noise_multiplier]:
            self.history[-1][2] += steps
        else:
            self.history.append([sample_rate, noise_multiplier, steps])

    def get_epsilon_bounds(self, delta: float, eps_error: float = 0.01) -> tuple[float, float, float]:
        return _epsilon(self.history, delta, eps_error)

    def get_epsilon(self, delta: float, eps_error: float = 0.01, bound: str = "estimate") -> float:
        """Epsilon at ``delta``: PRV's ``"estimate"`` (default) or its ``"upper"`` bound (estimate + <= eps_error)."""
        if bound not in ("estimate", "upper"):
            raise AccountingError(f"bound must be 'estimate' or 'upper', got {bound!r}")
        return self.get_epsilon_bounds(delta, eps_error)[1 if bound == "estimate" else 2]

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
