"""A white-box canary game through the real pipeline: bk_dp's clipping, DPOptimizer's noise, the accountant.

Setup (Steinke, Nasr and Jagielski 2023, with gradient canaries): m Dirac canaries, canary j a sample
whose gradient is ``scale * R`` times the unit vector of coordinate j of a ``Linear(m, 1)`` weight (its
input row is ``scale * R * e_j`` and each sample's loss is its output), so clipping brings each to norm
exactly R, the sensitivity the noise is calibrated to. Each canary is in the training set with
probability 1/2; training is DP-SGD with Poisson sampling at rate q, noise multiplier sigma, T steps,
through a bk_dp-compiled model and :class:`bkcompile.DPOptimizer`.

The auditor sees every released update (the noisy averaged gradient) and scores canary j by the sum over
steps of the update's coordinate j: ``R * (steps j was sampled) + N(0, T sigma^2 R^2)`` for an included
canary, the noise alone for one left out. It guesses "in" for the k highest scores and "out" for the k
lowest, for each k in a few fixed choices (m/2 down to m/32 per side), each at significance / (number of
choices) so that the best of them is still a sound bound (union bound).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from bkcompile.accountant import PrivacyAccountant
from bkcompile.audit.estimators import AuditError, CanaryScoreAuditor
from bkcompile.data import PoissonLoader
from bkcompile.optimizer import DPOptimizer

CANARY_SCALE = 10.0  # a canary's gradient norm before clipping, in units of R: clipping must act on it
GUESS_FRACTIONS = (2, 4, 8, 16, 32)  # guesses per side: m / f for each f (while at least one)


@dataclasses.dataclass(frozen=True)
class CanaryGame:
    """The settings of one audit run."""

    noise_multiplier: float
    steps: int
    canaries: int
    seed: int
    sample_rate: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    significance: float = 0.05
    compiler: str = "aot_eager"

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or not math.isfinite(self.noise_multiplier):
            raise AuditError(f"noise_multiplier must be >= 0 and finite, got {self.noise_multiplier}")
        if self.steps < 1 or self.canaries < 2:
            raise AuditError(f"need steps >= 1 and canaries >= 2, got steps={self.steps}, canaries={self.canaries}")
        if not 0 < self.sample_rate <= 1:
            raise AuditError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if not 0 < self.delta < 1 or not 0 < self.significance < 1:
            raise AuditError(f"delta and significance must be in (0, 1), got {self.delta}, {self.significance}")


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """What the game observed and the bounds it gives."""

    included: torch.Tensor  # (m,) bool: the canaries in the training set
    scores: torch.Tensor  # (m,) float64: each canary's summed released update on its coordinate
    guesses: int  # guesses made by the best choice of k (2k)
    correct: int  # right among them
    epsilon_lower_bound: float  # one-run bound (Steinke et al.) at delta, the best k, union-bounded
    gdp_lower_bound: float  # Gaussian-DP fit (Nasr et al.) at delta
    epsilon: float  # the accountant's epsilon at delta (inf without noise)


def _train(game: CanaryGame, included: torch.Tensor, generator: torch.Generator, progress: Callable[[int], None]):
    m, radius = game.canaries, game.max_grad_norm
    model = torch.nn.Linear(m, 1, bias=False, dtype=torch.float64)
    torch.nn.init.zeros_(model.weight)
    options = {"max_grad_norm": radius, "compiler": game.compiler, "loss_reduction": "mean"}  # the loop's .mean()
    compiled = torch.compile(model, backend="bk_dp", options=options)
    rows = CANARY_SCALE * radius * torch.eye(m, dtype=torch.float64)[included]
    loader = PoissonLoader(rows, sample_rate=game.sample_rate, steps=game.steps, generator=generator)
    noisy = game.noise_multiplier > 0
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=game.noise_multiplier,
        max_grad_norm=radius,
        expected_batch_size=game.sample_rate * m / 2,  # data-independent: the expected number of canaries
        sample_rate=game.sample_rate if noisy else None,
        accountant=PrivacyAccountant() if noisy else None,
        generator=generator,
    )
    scores = torch.zeros(m, dtype=torch.float64)
    for step, (x,) in enumerate(loader):
        optimizer.zero_grad()
        if len(x):
            compiled(x).mean().backward()  # each sample's loss is its output
        before = model.weight.detach().clone()
        optimizer.step()
        scores += (before - model.weight.detach())[0]  # the released update, on each canary's coordinate
        progress(step + 1)
    epsilon = optimizer.accountant.get_epsilon(game.delta) if noisy else math.inf
    return scores, epsilon


def run_canary_game(game: CanaryGame, progress: Callable[[int], None] = lambda step: None) -> AuditResult:
    """Play ``game``; ``progress(step)`` is called after each training step."""
    generator = torch.Generator().manual_seed(game.seed)
    included = torch.rand(game.canaries, generator=generator, dtype=torch.float64) < 0.5
    if included.all() or not included.any():  # the estimators need canaries on both sides
        raise AuditError(f"every canary fell on one side with seed {game.seed}; use more canaries or another seed")
    scores, epsilon = _train(game, included, generator, progress)
    auditor = CanaryScoreAuditor(scores[included].numpy(), scores[~included].numpy())
    choices = [game.canaries // f for f in GUESS_FRACTIONS if game.canaries // f >= 1]
    level = game.significance / len(choices)
    bounds = [(auditor.epsilon_one_run(k, game.delta, level), *auditor.guess_counts(k)) for k in choices]
    best, correct, guesses = max(bounds)
    return AuditResult(
        included=included,
        scores=scores,
        guesses=guesses,
        correct=correct,
        epsilon_lower_bound=best,
        gdp_lower_bound=auditor.epsilon_from_gdp(game.delta, game.significance),
        epsilon=epsilon,
    )
