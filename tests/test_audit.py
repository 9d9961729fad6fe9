"""The privacy audit: estimator values against hand-computed binomial tails and Gaussian-DP formulas, and the
canary game through bk_dp, DPOptimizer and the accountant (sound with noise, detecting without noise or clipping)."""

from __future__ import annotations

import math
import re
from statistics import NormalDist

import bkcompile.passes.clip as clip_pass
import numpy as np
import pytest
import torch

from bkcompile import DPOptimizer
from bkcompile.__main__ import main
from bkcompile.audit import (
    AuditError,
    CanaryGame,
    CanaryScoreAuditor,
    epsilon_from_gdp,
    epsilon_one_run,
    gdp_delta,
    gdp_epsilon,
    gdp_mu_lower_bound,
    one_run_p_value,
    run_canary_game,
)

aten = torch.ops.aten


def binomial_tail(v: int, r: int, p: float) -> float:
    """P[Binomial(r, p) >= v], summed by hand."""
    return sum(math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(v, r + 1))


def logistic(eps: float) -> float:
    return 1 / (1 + math.exp(-eps))


# --- the one-run estimator -------------------------------------------------------------------------------------


def test_p_value_at_epsilon_zero_is_a_fair_coin_tail() -> None:
    assert one_run_p_value(8, 10, 0.0) == pytest.approx((45 + 10 + 1) / 1024, rel=1e-12)


def test_all_guesses_right_give_the_logit_of_the_significance_root() -> None:
    # P[Binomial(10, p) >= 10] = p^10 = 0.05  <=>  p = 0.05^(1/10), eps = log(p / (1 - p))
    p = 0.05**0.1
    assert epsilon_one_run(10, 10, significance=0.05) == pytest.approx(math.log(p / (1 - p)), abs=1e-7)


@pytest.mark.parametrize("correct, guesses, significance", [(45, 50, 0.05), (170, 200, 0.01), (9, 12, 0.1)])
def test_bound_is_where_the_binomial_tail_reaches_the_significance(
    correct: int, guesses: int, significance: float
) -> None:
    eps = epsilon_one_run(correct, guesses, significance=significance)
    assert eps > 0
    assert binomial_tail(correct, guesses, logistic(eps)) == pytest.approx(significance, rel=1e-6)
    assert binomial_tail(correct, guesses, logistic(eps + 1e-3)) > significance  # the largest rejected epsilon


def test_with_delta_the_p_value_adds_twice_m_delta_alpha() -> None:
    m, r, v, delta, eps = 20, 6, 6, 1e-3, 1.5
    p = logistic(eps)
    pmf = [math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(r + 1)]
    alpha = max(sum(pmf[v - j] for j in range(1, i + 1)) / i for i in range(1, v + 1))
    want = binomial_tail(v, r, p) + 2 * m * delta * alpha
    assert one_run_p_value(v, r, eps, delta, m) == pytest.approx(want, rel=1e-10)
    bound = epsilon_one_run(v, r, delta, 0.2, canaries=m)
    assert 0 < bound < epsilon_one_run(v, r, 0.0, 0.2)  # delta makes the bound weaker
    assert one_run_p_value(v, r, bound, delta, m) == pytest.approx(0.2, rel=1e-6)


def test_guesses_no_better_than_chance_reject_nothing() -> None:
    assert epsilon_one_run(5, 10) == 0.0
    assert epsilon_one_run(0, 0) == 0.0


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"correct": 11, "guesses": 10}, "0 <= correct <= guesses"),
        ({"correct": 5, "guesses": 10, "delta": 1e-5}, "needs canaries"),
        ({"correct": 5, "guesses": 10, "significance": 1.5}, "significance must be in (0, 1)"),
    ],
)
def test_bad_estimator_input_is_refused(kwargs: dict, fragment: str) -> None:
    with pytest.raises(AuditError, match=re.escape(fragment)):
        epsilon_one_run(**kwargs)


# --- the Gaussian-DP fit ---------------------------------------------------------------------------------------


def test_gdp_delta_at_zero_is_the_total_variation_of_two_unit_gaussians() -> None:
    normal = NormalDist()
    assert gdp_delta(1.0, 0.0) == pytest.approx(normal.cdf(0.5) - normal.cdf(-0.5), rel=1e-12)
    eps = gdp_epsilon(1.0, 1e-5)
    assert gdp_delta(1.0, eps) == pytest.approx(1e-5, rel=1e-6)
    # delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
    assert gdp_delta(2.0, 1.0) == pytest.approx(normal.cdf(0.5) - math.e * normal.cdf(-1.5), rel=1e-12)


def test_gdp_fit_of_separated_scores_is_the_clopper_pearson_bound() -> None:
    # 50 in above 50 out: at the separating threshold both counts are 0, and each rate's Clopper-Pearson upper
    # bound at level a = 0.05 / (2 * 100 thresholds) is 1 - a^(1/50), so mu >= 2 Phi^-1(a^(1/50)).
    ins, outs = np.arange(50) + 100.0, np.arange(50.0)
    level = 0.05 / (2 * 100)
    mu = 2 * NormalDist().inv_cdf(level ** (1 / 50))
    assert gdp_mu_lower_bound(ins, outs, 0.05) == pytest.approx(mu, rel=1e-9)
    assert epsilon_from_gdp(ins, outs, 1e-5) == pytest.approx(gdp_epsilon(mu, 1e-5), rel=1e-9)


def test_gdp_fit_of_gaussian_scores_stays_below_their_mu() -> None:
    rng = np.random.default_rng(0)
    auditor = CanaryScoreAuditor(rng.normal(1.0, 1.0, 3000), rng.normal(0.0, 1.0, 3000))
    assert 0.7 < gdp_mu_lower_bound(auditor.in_scores, auditor.out_scores) <= 1.0
    assert 0 < auditor.epsilon_from_gdp(1e-5) <= gdp_epsilon(1.0, 1e-5)
    assert 0 < auditor.epsilon_one_run(750, 1e-5) <= gdp_epsilon(1.0, 1e-5)


def test_auditor_counts_top_and_bottom_guesses() -> None:
    auditor = CanaryScoreAuditor([5.0, 4.0, 0.5], [3.0, 1.0, 0.0])
    assert auditor.guess_counts(1) == (2, 2)  # 5.0 in (right), 0.0 out (right)
    assert auditor.guess_counts(2) == (3, 4)  # + 4.0 in (right), 0.5 out (wrong)
    with pytest.raises(AuditError, match="guesses per side"):
        auditor.guess_counts(4)


# --- the canary game through the pipeline ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_game_is_sound_with_noise(seed: int) -> None:
    game = CanaryGame(noise_multiplier=1.0, steps=10, canaries=400, seed=seed, sample_rate=0.5)
    result = run_canary_game(game)
    assert 0 < result.epsilon_lower_bound <= result.epsilon  # the audit has power, and the claim holds
    assert 0 < result.gdp_lower_bound <= result.epsilon
    assert result.correct <= result.guesses


@pytest.mark.parametrize("seed", [0, 1])
def test_game_is_sound_at_a_small_epsilon(seed: int) -> None:
    result = run_canary_game(CanaryGame(noise_multiplier=5.0, steps=1, canaries=1000, seed=seed))
    assert result.epsilon < 0.8
    assert result.epsilon_lower_bound <= result.epsilon and result.gdp_lower_bound <= result.epsilon


def test_game_detects_missing_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    # The accountant records sigma = 20 (epsilon 0.34 at 1e-5); the optimizer adds no noise.
    monkeypatch.setattr(DPOptimizer, "_gradient_noise_multiplier", lambda self: 0.0)
    result = run_canary_game(CanaryGame(noise_multiplier=20.0, steps=4, canaries=400, seed=0))
    assert result.epsilon < 0.5
    assert result.correct == result.guesses  # every guess right
    assert result.epsilon_lower_bound > 8 * result.epsilon


def test_game_detects_clipping_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # The graph still records the norms (the optimizer sees a bk_dp backward), but every clip factor is 1.
    clip_weights = clip_pass.clip_weights

    def unclipped(emit, squares, grouping, key, factor, options):
        weights = clip_weights(emit, squares, grouping, key, factor, options)
        ones = {name: emit(aten.div.Tensor, w, w) for name, w in weights.items()}
        return ones if factor is None else {name: emit(aten.mul.Tensor, w, factor) for name, w in ones.items()}

    monkeypatch.setattr(clip_pass, "clip_weights", unclipped)
    result = run_canary_game(CanaryGame(noise_multiplier=5.0, steps=1, canaries=1000, seed=0))
    assert result.epsilon < 0.8  # with clipping the same game bounds nothing: 0.0 (seeds 0-2 of 400 canaries)
    assert result.epsilon_lower_bound > 4 * result.epsilon
    assert result.gdp_lower_bound > 8 * result.epsilon


def test_game_refuses_bad_settings() -> None:
    with pytest.raises(AuditError, match="sample_rate must be in"):
        CanaryGame(noise_multiplier=1.0, steps=1, canaries=10, seed=0, sample_rate=0.0)
    with pytest.raises(AuditError, match="canaries >= 2"):
        CanaryGame(noise_multiplier=1.0, steps=1, canaries=1, seed=0)


# --- the command -----------------------------------------------------------------------------------------------

LAST_LINE = re.compile(r"^empirical epsilon lower bound (\d+\.\d+) <= epsilon (\d+\.\d+|inf)$")


def test_audit_command_prints_a_progress_bar_and_the_bound_last(capsys: pytest.CaptureFixture) -> None:
    assert main(["audit", "--noise-multiplier", "2", "--steps", "5", "--canaries", "200", "--seed", "3"]) == 0
    out, err = capsys.readouterr()
    assert "5/5 steps" in err and "[" + "#" * 30 + "]" in err
    found = LAST_LINE.match(out.strip().splitlines()[-1])
    assert found, out
    lower, epsilon = float(found.group(1)), float(found.group(2))
    assert 0 < lower <= epsilon


def test_audit_command_without_noise_claims_nothing(capsys: pytest.CaptureFixture) -> None:
    args = ["audit", "--noise-multiplier", "0", "--steps", "8", "--canaries", "200", "--sample-rate", "0.5"]
    assert main(args) == 0
    found = LAST_LINE.match(capsys.readouterr().out.strip().splitlines()[-1])
    assert found and found.group(2) == "inf" and float(found.group(1)) > 2


def test_audit_command_refuses_bad_arguments(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["audit", "--noise-multiplier", "-1", "--steps", "5", "--canaries", "200"])
    assert info.value.code == 2
    assert "noise_multiplier must be >= 0" in capsys.readouterr().err
