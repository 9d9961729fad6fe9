"""Empirical lower bounds on epsilon from a canary game (what a claimed (epsilon, delta) must not fall below).

Two estimators, both sound at the given significance (the probability that the bound exceeds the true
epsilon is at most ``significance``):

- **one run** (Steinke, Nasr and Jagielski 2023, "Privacy auditing with one (1) training run",
  arXiv:2305.08846): m canaries, each included in training independently with probability 1/2; an
  auditor makes r guesses (in or out; abstaining on the rest) of which v are right. Under (eps, 0)-DP
  the number right is stochastically dominated by Binomial(r, p), p = e^eps / (1 + e^eps), so
  ``P[v or more right] <= P[Binomial(r, p) >= v]``; under (eps, delta)-DP their bound adds
  ``2 m delta alpha`` with ``alpha = max_{1<=i<=v} P[v - i <= Binomial(r, p) < v] / i``. The lower bound
  is the largest eps that this p-value rejects.
- **Gaussian DP fit** (Nasr et al. 2023, "Tight auditing of differentially private machine learning";
  f-DP of Dong, Roth and Su): every threshold test on the scores has false positive and false negative
  rates that a mu-GDP mechanism bounds by ``FNR >= Phi(Phi^-1(1 - FPR) - mu)``. Clopper-Pearson upper
  bounds of both rates at every threshold (Bonferroni over the thresholds and the two rates) give a lower
  confidence bound on mu, which is converted to epsilon at delta. The scores must be independent trials,
  as the scores of Dirac canaries are (each reads only its own coordinate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, special, stats

from bkcompile.errors import BKError


class AuditError(BKError, ValueError):
    """Arguments of an audit estimator or of the canary game out of range."""


def _check_significance(significance: float) -> None:
    if not 0 < significance < 1:
        raise AuditError(f"significance must be in (0, 1), got {significance}")


def one_run_p_value(correct: int, guesses: int, epsilon: float, delta: float = 0.0, canaries: int = 0) -> float:
    """An upper bound on P[``correct`` or more right out of ``guesses``] under (epsilon, delta)-DP.

    ``canaries`` (m, each included with probability 1/2) enters through delta's term only.
    """
    p = special.expit(epsilon)  # e^eps / (1 + e^eps): the accuracy of eps-DP randomized response
    tail = float(stats.binom.sf(correct - 1, guesses, p))
    if delta == 0 or correct == 0:
        return tail
    below = np.cumsum(stats.binom.pmf(correct - np.arange(1, correct + 1), guesses, p))  # P[v-i <= Bin < v]
    alpha = float(np.max(below / np.arange(1, correct + 1)))
    return min(1.0, tail + 2 * canaries * delta * alpha)


def epsilon_one_run(
    correct: int, guesses: int, delta: float = 0.0, significance: float = 0.05, *, canaries: int | None = None
) -> float:
    """The largest epsilon that ``correct`` right guesses out of ``guesses`` reject at ``significance``.

    With ``delta > 0`` give ``canaries`` (m >= guesses, each included with probability 1/2): the bound
    of Steinke et al. for (epsilon, delta)-DP. Returns 0.0 when even epsilon = 0 is not rejected.
    """
    _check_significance(significance)
    if not (isinstance(correct, (int, np.integer)) and isinstance(guesses, (int, np.integer))) or not (
        0 <= correct <= guesses
    ):
        raise AuditError(f"need integers 0 <= correct <= guesses, got correct={correct}, guesses={guesses}")
    if not 0 <= delta < 1:
        raise AuditError(f"delta must be in [0, 1), got {delta}")
    if delta > 0 and (canaries is None or canaries < guesses):
        raise AuditError(
            f"with delta > 0 the bound needs canaries (the number of canaries m >= guesses), got canaries={canaries}"
        )
    m = canaries or 0

    def excess(eps: float) -> float:  # <= 0 where eps is rejected; increasing in eps
        return one_run_p_value(correct, guesses, eps, delta, m) - significance

    if excess(0.0) > 0:
        return 0.0
    high = 1.0
    while excess(high) <= 0:
        high *= 2
    return float(optimize.brentq(excess, high / 2 if high > 1 else 0.0, high, xtol=1e-9))


def _clopper_pearson_upper(count: np.ndarray, total: int, significance: float) -> np.ndarray:
    """One-sided upper confidence bounds of a binomial rate from ``count`` successes out of ``total``."""
    return np.where(count < total, stats.beta.ppf(1 - significance, count + 1, total - count), 1.0)


def gdp_delta(mu: float, epsilon: float) -> float:
    """delta(epsilon) of mu-Gaussian DP: Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Dong, Roth, Su)."""
    if mu <= 0:
        return 0.0
    high = stats.norm.logcdf(-epsilon / mu + mu / 2)
    low = epsilon + stats.norm.logcdf(-epsilon / mu - mu / 2)
    return float(math.exp(high) * -math.expm1(low - high)) if low < high else 0.0


def gdp_epsilon(mu: float, delta: float) -> float:
    """The epsilon at which mu-Gaussian DP has the given delta (0 when mu = 0)."""
    if not 0 < delta < 1:
        raise AuditError(f"delta must be in (0, 1), got {delta}")
    if mu <= 0 or gdp_delta(mu, 0.0) <= delta:
        return 0.0
    high = 1.0
    while gdp_delta(mu, high) > delta:
        high *= 2
    return float(optimize.brentq(lambda eps: gdp_delta(mu, eps) - delta, 0.0, high, xtol=1e-9))


def _scores(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0 or not np.isfinite(array).all():
        raise AuditError(f"{name} must be a non-empty sequence of finite numbers")
    return array


def gdp_mu_lower_bound(
    in_scores: Sequence[float] | np.ndarray, out_scores: Sequence[float] | np.ndarray, significance: float = 0.05
) -> float:
    """A lower confidence bound on mu from in/out scores (higher score: guessed in); 0 if none is positive."""
    _check_significance(significance)
    ins, outs = np.sort(_scores(in_scores, "in_scores")), np.sort(_scores(out_scores, "out_scores"))
    thresholds = np.union1d(ins, outs)  # test "in" when score >= threshold
    false_negatives = np.searchsorted(ins, thresholds, side="left")
    false_positives = outs.size - np.searchsorted(outs, thresholds, side="left")
    level = significance / (2 * thresholds.size)
    fnr = _clopper_pearson_upper(false_negatives, ins.size, level)
    fpr = _clopper_pearson_upper(false_positives, outs.size, level)
    with np.errstate(divide="ignore"):
        mu = stats.norm.isf(fpr) - stats.norm.ppf(fnr)
    return float(max(0.0, np.max(mu)))


def epsilon_from_gdp(
    in_scores: Sequence[float] | np.ndarray,
    out_scores: Sequence[float] | np.ndarray,
    delta: float,
    significance: float = 0.05,
) -> float:
    """An epsilon lower bound at ``delta`` from the Gaussian-DP fit of in/out canary scores."""
    return gdp_epsilon(gdp_mu_lower_bound(in_scores, out_scores, significance), delta)


class CanaryScoreAuditor:
    """Scores of canaries that were in training (``in_scores``) and that were not (``out_scores``).

    Higher scores mean "in". ``epsilon_one_run`` guesses the ``guesses`` top scores in and the
    ``guesses`` bottom scores out (abstaining on the middle); ``epsilon_from_gdp`` fits Gaussian DP.
    """

    def __init__(self, in_scores: Sequence[float] | np.ndarray, out_scores: Sequence[float] | np.ndarray) -> None:
        self.in_scores = _scores(in_scores, "in_scores")
        self.out_scores = _scores(out_scores, "out_scores")

    @property
    def canaries(self) -> int:
        return self.in_scores.size + self.out_scores.size

    def guess_counts(self, guesses: int) -> tuple[int, int]:
        """(right, made) for ``guesses`` "in" guesses at the top scores and as many "out" at the bottom."""
        if not 0 < 2 * guesses <= self.canaries:
            raise AuditError(f"guesses per side must be in [1, canaries / 2 = {self.canaries // 2}], got {guesses}")
        scores = np.concatenate([self.in_scores, self.out_scores])
        member = np.arange(scores.size) < self.in_scores.size
        order = np.argsort(scores, kind="stable")
        right = int(member[order[-guesses:]].sum()) + int((~member[order[:guesses]]).sum())
        return right, 2 * guesses

    def epsilon_one_run(self, guesses: int, delta: float = 0.0, significance: float = 0.05) -> float:
        right, made = self.guess_counts(guesses)
        return epsilon_one_run(right, made, delta, significance, canaries=self.canaries)

    def epsilon_from_gdp(self, delta: float, significance: float = 0.05) -> float:
        return epsilon_from_gdp(self.in_scores, self.out_scores, delta, significance)
