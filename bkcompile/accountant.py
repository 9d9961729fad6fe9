"""Privacy accounting for the Poisson-subsampled Gaussian mechanism (add/remove-one neighbours).

How epsilon is computed (:meth:`PrivacyAccountant.epsilon`), in order:

1. The PRV accountant of Gopi, Lee and Wutschitz 2021 in float64 (:mod:`bkcompile.prv`), where it resolves:
   an estimate within ``eps_error`` of the true epsilon and certified bounds around it
   (``method="prv"``), 0.07 s for the quickstart's history (prv-accountant's long-double one: 0.6 s).
   It does not resolve where float64 cannot vouch for its sums (its domain's points times float64's eps
   not far below delta_error = delta / 1000: delta below about 6e-7 for the quickstart's history), nor
   where a numerical check fails. Its domain grows with the epsilon of one step at a tiny delta, so at
   small sigma it would hold 1e8 points and more; it is skipped beyond ``_PRV_MAX_POINTS``.
2. Where PRV does not resolve: dp-accounting's PLD accountant with a pessimistic discretisation, a
   certified upper bound (``method="pld"``), which equals PRV's estimate to about 1e-4 where both
   resolve. Its grid is coarser for a larger epsilon (``_pld_interval``), so it stays fast.
3. Should PLD fail as well: dp-accounting's RDP accountant, a looser certified upper bound
   (``method="rdp"``).

The noise search (:func:`get_noise_multiplier`) never calls PRV. It solves PLD's epsilon(sigma) =
target - eps_error in three or four PLD evaluations (0.05 to 0.3 s each): the first probe from a
vectorised RDP bound, the second from RDP scaled by PLD/RDP at the first, then secants.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Literal

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize, special

from bkcompile import prv
from bkcompile.errors import BKError


class AccountingError(BKError, ValueError):
    """Accountant arguments out of range, or a target epsilon no noise multiplier in range reaches."""


Method = Literal["exact", "prv", "pld", "rdp"]

# PRV's domain holds 2 L / mesh points (remark 5.6 and theorem 5.5 of Gopi et al. 2021): 0.1 s at 400,000
# points. At small sigma it would be 1e8 points and more (gigabytes); PLD answers instead.
_PRV_MAX_POINTS = 4_000_000
_MAX_SIGMA = 1e4  # the search's upper end


@dataclass(frozen=True)
class Epsilon:
    """Epsilon at a delta: (lower, estimate, upper) and the method that produced them.

    ``method="prv"``: PRV's estimate and its certified bounds. ``"pld"`` / ``"rdp"``: PRV did not
    resolve (``reason`` says why); ``estimate`` and ``upper`` are both the certified upper bound, and
    ``lower`` is 0 (no lower bound is computed). ``"exact"``: an empty history, epsilon 0.
    """

    lower: float
    estimate: float
    upper: float
    method: Method
    reason: str = ""


def _check(sample_rate: float, noise_multiplier: float) -> None:
    if not 0 < sample_rate <= 1:
        raise AccountingError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not noise_multiplier > 0:
        raise AccountingError(f"noise_multiplier must be positive, got {noise_multiplier}")


def _check_delta(delta: float, eps_error: float) -> None:
    if not 0 < delta < 1:
        raise AccountingError(f"delta must be in (0, 1), got {delta}; fix: use a delta well below 1/n for n rows")
    if not eps_error > 0:
        raise AccountingError(f"eps_error must be positive, got {eps_error}")


def steps_per_epoch(sample_rate: float) -> int:
    """Poisson steps that make one epoch: ceil(1 / q) (each example is seen once per epoch in expectation)."""
    return max(1, math.ceil(1 / sample_rate))


History = prv.History  # ((q, sigma, steps), ...)


# Integer Renyi orders from 2 to 256 (every one up to 16, then about 8% apart), and log C(alpha, k) for
# k = 0..alpha (-inf above alpha).
_ORDERS = np.unique(np.round(np.geomspace(2, 256, 64)))
_K = np.arange(0, 257, dtype=np.float64)
with np.errstate(invalid="ignore"):
    _LOG_BINOM = np.where(
        _K[None, :] <= _ORDERS[:, None],
        special.gammaln(_ORDERS[:, None] + 1)
        - special.gammaln(_K[None, :] + 1)
        - special.gammaln(np.maximum(_ORDERS[:, None] - _K[None, :], 0) + 1),
        -np.inf,
    )


def _rdp_epsilon(history: History, delta: float) -> float:
    """An RDP upper bound on epsilon at integer orders, vectorised (0.3 ms): the search's model.

    Order alpha of one step (Mironov et al. 2019): log A / (alpha - 1), with
    A = sum_k C(alpha, k) (1 - q)^(alpha - k) q^k exp((k^2 - k) / (2 sigma^2)); then the conversion to
    (epsilon, delta) of Balle et al. 2020, as in dp-accounting. Reported values come from dp-accounting.
    """
    rdp = np.zeros_like(_ORDERS)
    for q, sigma, steps in history:
        if q == 1:
            log_a = _ORDERS * (_ORDERS - 1) / (2 * sigma**2)
        else:
            with np.errstate(invalid="ignore"):  # (alpha - k) log(1 - q) is 0 * finite; -inf masks k > alpha
                terms = _LOG_BINOM + _K * math.log(q) + (_ORDERS[:, None] - _K) * math.log1p(-q)
            log_a = special.logsumexp(terms + (_K**2 - _K) / (2 * sigma**2), axis=1)
        rdp += steps * log_a / (_ORDERS - 1)
    eps = rdp + np.log1p(-1 / _ORDERS) - (math.log(delta) + np.log(_ORDERS)) / (_ORDERS - 1)
    return max(0.0, float(eps.min()))


def _dp_event(history: History) -> dp_accounting.DpEvent:
    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
            )
            for q, sigma, steps in history
        ]
    )


def _pld_interval(finest: float, rdp_epsilon: float) -> float:
    """PLD's grid: ``finest``, or 1e-5 of the (RDP) epsilon where that is coarser.

    The grid spans the privacy loss, which grows like 1 / sigma^2: a fixed grid at small sigma holds
    1e8 points and more (minutes, gigabytes). Relative to epsilon the coarser grid stays tight.
    """
    return max(finest, 1e-5 * rdp_epsilon)


def _pld_epsilon(history: History, delta: float, interval: float) -> float:
    """dp-accounting's PLD epsilon: a certified upper bound (pessimistic discretisation at ``interval``)."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=interval)
    accountant.compose(_dp_event(history))
    return max(0.0, float(accountant.get_epsilon(delta)))


def _prv_bounds(history: History, delta: float, eps_error: float) -> tuple[float, float, float] | str:
    """PRV's (lower, estimate, upper) clamped at 0 (:mod:`bkcompile.prv`), or why it does not resolve."""
    delta_error = delta / 1000
    try:
        half_domain = prv.domain_size(history, eps_error, delta_error, _rdp_epsilon)
        points = 2 * half_domain / prv.mesh_size(history, eps_error, delta_error)
        if points > _PRV_MAX_POINTS:
            return f"skipped, its domain would hold {points:.2g} points (more than {_PRV_MAX_POINTS:.0g})"
        bounds = prv.epsilon_bounds(history, delta, eps_error, delta_error, half_domain)
    except (ArithmeticError, MemoryError, RuntimeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    if not all(math.isfinite(b) for b in bounds):
        return f"it returned {bounds}"
    return tuple(max(0.0, float(b)) for b in bounds)


@functools.lru_cache(maxsize=64)
def _epsilon(history: History, delta: float, eps_error: float) -> Epsilon:
    """PRV where it resolves, else the PLD upper bound, else the RDP upper bound (see the module docstring)."""
    _check_delta(delta, eps_error)
    if not history:
        return Epsilon(0.0, 0.0, 0.0, "exact")
    bounds = _prv_bounds(history, delta, eps_error)
    if not isinstance(bounds, str):
        return Epsilon(*bounds, "prv")
    reason = f"PRV: {bounds}"
    try:
        upper = _pld_epsilon(history, delta, _pld_interval(1e-4, _rdp_epsilon(history, delta)))
        return Epsilon(0.0, upper, upper, "pld", reason)
    except (ArithmeticError, MemoryError, RuntimeError, ValueError) as error:
        reason += f"; dp-accounting's PLD fails: {type(error).__name__}: {error}"
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(_dp_event(history))
    upper = max(0.0, float(rdp.get_epsilon(delta)))
    return Epsilon(0.0, upper, upper, "rdp", reason)


class PrivacyAccountant:
    """Records (sample rate q, noise multiplier sigma, steps) and answers epsilon at a delta.

    Each recorded step is one Poisson-subsampled Gaussian mechanism under add/remove-one neighbouring
    datasets. ``get_epsilon`` returns the PRV accountant's *estimate* by default (within ``eps_error`` of the
    true epsilon; it agrees with dp_accounting's PLD accountant to about 1e-4), and
    ``get_epsilon(delta, bound="upper")`` its certified upper bound (what Opacus reports);
    ``get_epsilon_bounds`` gives (lower, estimate, upper). Where PRV does not resolve a history, both are
    dp-accounting's certified PLD upper bound (or RDP's, should PLD fail too): ``epsilon(delta)`` returns
    the :class:`Epsilon` with the method, and ``last_epsilon`` keeps the latest. Arguments out of range
    are ``AccountingError``; a valid history always gets an epsilon.
    """

    def __init__(self) -> None:
        self.history: list[list] = []  # [[q, sigma, steps], ...], consecutive equal (q, sigma) merged
        self.last_epsilon: Epsilon | None = None

    def step(self, sample_rate: float, noise_multiplier: float, steps: int = 1) -> None:
        _check(sample_rate, noise_multiplier)
        if not (isinstance(steps, int) and steps > 0):
            raise AccountingError(f"steps must be a positive integer, got {steps!r}")
        if self.history and self.history[-1][:2] == [sample_rate, noise_multiplier]:
            self.history[-1][2] += steps
        else:
            self.history.append([sample_rate, noise_multiplier, steps])

    def epsilon(self, delta: float, eps_error: float = 0.01) -> Epsilon:
        """Epsilon at ``delta`` with its bounds and method (cached for a history seen before)."""
        history = tuple((float(q), float(s), int(n)) for q, s, n in self.history)
        self.last_epsilon = _epsilon(history, float(delta), float(eps_error))
        return self.last_epsilon

    def get_epsilon_bounds(self, delta: float, eps_error: float = 0.01) -> tuple[float, float, float]:
        result = self.epsilon(delta, eps_error)
        return (result.lower, result.estimate, result.upper)

    def get_epsilon(self, delta: float, eps_error: float = 0.01, bound: str = "estimate") -> float:
        """Epsilon at ``delta``: PRV's ``"estimate"`` (default) or its ``"upper"`` bound (estimate + <= eps_error).

        Where PRV does not resolve, both are the fallback's certified upper bound (``last_epsilon.method``).
        """
        if bound not in ("estimate", "upper"):
            raise AccountingError(f"bound must be 'estimate' or 'upper', got {bound!r}")
        result = self.epsilon(delta, eps_error)
        return result.estimate if bound == "estimate" else result.upper

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
    ``PoissonLoader`` takes over that many epochs). The epsilon is dp-accounting's PLD upper bound, and
    the search keeps ``eps_error`` in reserve: the returned sigma (the passing end of a bracket of width
    <= ``tolerance``) has PLD epsilon <= target - eps_error, so that what the accountant reports after
    those steps (PRV's estimate, its upper bound = estimate + eps_error, or the PLD fallback) meets the
    target.

    Each probe is one PLD evaluation; each is placed tolerance / 3 beside the predicted root, on the side
    that closes the bracket, so that three or four probes do (after six, bisection). A sigma at which PLD
    cannot compute counts as too small.
    """
    if (steps is None) == (epochs is None):
        raise AccountingError("give exactly one of steps and epochs")
    _check(sample_rate, 1.0)
    _check_delta(delta, eps_error)
    if not target_epsilon > eps_error:
        raise AccountingError(
            f"target_epsilon must exceed eps_error = {eps_error} (the accuracy the search keeps in reserve), "
            f"got {target_epsilon}; fix: a larger target_epsilon, or a smaller eps_error"
        )
    if not tolerance >= 1e-6:
        raise AccountingError(f"tolerance must be at least 1e-6, got {tolerance}")
    if steps is None:
        steps = math.ceil(epochs * steps_per_epoch(sample_rate))
    if not (isinstance(steps, int) and steps > 0):
        raise AccountingError(f"steps must be a positive integer, got {steps!r}")
    goal = target_epsilon - eps_error

    def rdp(sigma: float) -> float:
        return max(_rdp_epsilon(((float(sample_rate), sigma, steps),), delta), 1e-300)

    def pld(sigma: float) -> float:
        # PLD's pessimism grows as steps * interval^2 (at most 2.3 steps interval^2 measured on 18 settings,
        # q from 1e-4 to 1; 3 here): keep it below a quarter of what tolerance changes in epsilon, at
        # least epsilon / sigma * tolerance.
        finest = min(max(math.sqrt(goal * tolerance / (12 * steps * sigma)), 2e-5), 1e-3)
        return _pld_epsilon(((float(sample_rate), sigma, steps),), delta, _pld_interval(finest, rdp(sigma)))

    probes: list[tuple[float, float]] = []  # (log sigma, log PLD epsilon) at each probe

    def predicted_root() -> float:
        """Secant in (log sigma, log epsilon) through the last two probes (a smooth, nearly straight curve);
        before that, where RDP(sigma) * (PLD / RDP at the first probe) = goal."""
        low, high = math.log(1e-3), math.log(_MAX_SIGMA)
        if len(probes) >= 2 and probes[-1][1] != probes[-2][1]:
            (x1, y1), (x2, y2) = probes[-2:]
            return math.exp(min(max(x2 + (math.log(goal) - y2) * (x2 - x1) / (y2 - y1), low), high))
        log_ratio = probes[-1][1] - math.log(rdp(math.exp(probes[-1][0]))) if probes else 0.0

        def excess(log_sigma: float) -> float:
            return log_ratio + math.log(rdp(math.exp(log_sigma)) / goal)

        if excess(high) > 0:
            return _MAX_SIGMA
        if excess(low) < 0:
            return 1e-3
        return math.exp(optimize.brentq(excess, low, high, xtol=1e-5))

    failing, passing = 0.0, math.inf  # the largest sigma seen to miss the goal, the smallest seen to meet it
    for probe in itertools.count():
        if passing - failing <= tolerance:
            return passing
        sigma = math.nan
        if probe < 6:  # aim tolerance / 3 beside the predicted root, on the side that closes the bracket
            root = predicted_root()
            sigma = root + tolerance / 3 if passing - root > root - failing else root - tolerance / 3
        if not failing < sigma < passing:  # bisection (nan compares False)
            sigma = 2 * max(failing, 0.5) if passing == math.inf else (failing + passing) / 2
        sigma = min(sigma, _MAX_SIGMA)
        try:
            epsilon = pld(sigma)
        except (ArithmeticError, MemoryError, RuntimeError, ValueError):
            epsilon = math.inf  # cannot compute: this sigma is too small
        if epsilon <= goal:
            passing = sigma
        elif sigma >= _MAX_SIGMA:
            raise AccountingError(
                f"no noise multiplier up to {_MAX_SIGMA:g} reaches epsilon {target_epsilon} at delta={delta} "
                f"after {steps} steps at sample rate {sample_rate} (epsilon {epsilon:.3g} there); fix: a larger "
                "target_epsilon or delta, fewer steps, or a smaller sample rate"
            )
        else:
            failing = sigma
        if 0 < epsilon < math.inf:
            probes.append((math.log(sigma), math.log(epsilon)))
