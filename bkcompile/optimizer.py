"""DPOptimizer: wraps a torch.optim optimizer; adds Gaussian noise to the clipped sums once per step."""

from __future__ import annotations

import dataclasses
import math

import torch

from bkcompile.accountant import PrivacyAccountant
from bkcompile.errors import BKError, PrivacyError
from bkcompile.ledger import audit, ledger_for, refuse_step, start_step
from bkcompile.norms import ClipState


@dataclasses.dataclass(frozen=True)
class AdaptiveClipping:
    """Quantile-tracking thresholds (Andrew et al.): after each step every group's threshold moves as
    ``R_g <- R_g * exp(-learning_rate * (b_g - target_quantile))``, where ``b_g`` is the fraction of the
    step's samples whose group norm was <= R_g, counted with Gaussian noise of standard deviation
    ``count_noise`` (default: expected batch size / 20). The gradient noise is raised so that the step
    stays one Gaussian mechanism with the optimizer's noise_multiplier (what the accountant records)."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise: float | None = None

    def __post_init__(self) -> None:
        if not (0 < self.target_quantile < 1 and self.learning_rate > 0) or (
            self.count_noise is not None and self.count_noise <= 0
        ):
            raise BKError("adaptive clipping needs 0 < target_quantile < 1, learning_rate > 0, count_noise > 0")


def gradient_noise_multiplier(noise_multiplier: float, count_noise: float, groups: int) -> float:
    """sigma_grad with (sigma_grad^-2 + (2 count_noise / sqrt(G))^-2)^(-1/2) = noise_multiplier: the G noisy
    counts (each sample moves each by at most 1, sensitivity sqrt(G) / 2 once centred) and the gradient
    together cost what one Gaussian mechanism with noise_multiplier costs."""
    budget = noise_multiplier**-2 - (2 * count_noise / math.sqrt(groups)) ** -2
    if budget <= 0:
        raise PrivacyError(
            f"the count noise {count_noise:.3g} of adaptive clipping over {groups} groups spends more than the whole "
            f"noise multiplier {noise_multiplier:.3g}; raise count_noise above "
            f"{math.sqrt(groups) * noise_multiplier / 2:.3g}"
        )
    return budget**-0.5


class DPOptimizer:
    """DP-SGD's noise and averaging around any optimizer (SGD, Adam, AdamW, ...).

    The bk_dp backward leaves ``p.grad = sum_i C_i g_i`` (summed over every backward since the last
    ``zero_grad``: several micro-batches make one logical batch). ``step()`` then, once:
    ``p.grad = (p.grad + N(0, (noise_multiplier * sensitivity)^2)) / expected_batch_size`` and steps
    the wrapped optimizer. The sensitivity is that of the compiled model's clipping, sqrt(sum_g R_g^2)
    over its clipping groups (R = max_grad_norm for all-layer clipping; max_grad_norm until a backward
    has run). A step with no gradient (an empty Poisson batch) adds noise alone. With
    ``adaptive_clipping`` the thresholds follow a target quantile of the norms (:class:`AdaptiveClipping`).

    Noise comes from ``generator`` when given (reproducible), else from a generator seeded with OS
    entropy. ``step()`` proves from the model's step ledger (:mod:`bkcompile.ledger`) that every
    gradient it steps is exactly the sum of what bk_dp clips wrote since ``zero_grad()``, and refuses
    the step otherwise. Nothing in the step synchronises with the host: thresholds, counts and the
    noise scale stay on the model's device.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        sample_rate: float | None = None,
        accountant: PrivacyAccountant | None = None,
        generator: torch.Generator | None = None,
        adaptive_clipping: AdaptiveClipping | None = None,
    ) -> None:
        if noise_multiplier < 0 or max_grad_norm <= 0 or expected_batch_size <= 0:
            raise BKError("noise_multiplier must be >= 0, max_grad_norm and expected_batch_size > 0")
        if accountant is not None and sample_rate is None:
            raise BKError("an accountant needs the sample_rate of each step")
        self.optimizer = optimizer
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.sample_rate = sample_rate
        self.accountant = accountant
        if generator is None:
            generator = torch.Generator()
            generator.seed()  # OS entropy
        self.generator = generator
        self.adaptive_clipping = adaptive_clipping
        self._clip_state: ClipState | None = None  # the clipping of the model whose gradients this steps
        ledger_for(self._params())  # the model's step ledger, shared with its graphs once they compile
        self._start_logical_batch()

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._start_logical_batch()

    def _start_logical_batch(self) -> None:
        """Gradients and clip counts before this point do not count toward the next step."""
        start_step(self._params())

    def add_noise(self) -> None:
        """Noise and average the accumulated clipped sums in place (what ``step`` does before stepping)."""
        params = self._params()
        self._take_clip_state(params)
        std = self._gradient_noise_multiplier() * self._sensitivity_tensor()
        for p in params:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            noise = torch.normal(0.0, 1.0, size=p.shape, generator=self.generator, dtype=p.dtype).to(p.device)
            p.grad = (grad + noise * std.to(device=p.device, dtype=p.dtype)) / self.expected_batch_size

    @property
    def sensitivity(self) -> float:
        """The L2 sensitivity the noise is scaled to: sqrt(sum_g R_g^2) of the model's clipping groups."""
        return float(self._sensitivity_tensor())

    def _sensitivity_tensor(self) -> torch.Tensor:
        if self._clip_state is None:
            return torch.tensor(self.max_grad_norm, dtype=torch.float64)
        return self._clip_state.sensitivity_tensor()

    def _take_clip_state(self, params: list[torch.nn.Parameter]) -> None:
        """The clip state of this step's gradients, after the ledger has proved they are clipped sums."""
        found = audit(params)
        if found.problems:
            raise refuse_step(found.problems)
        if len({(clip.state, clip.params) for clip in found.clips}) > 1:
            raise PrivacyError(
                "gradients from graphs with different clipping groups reached one DP optimizer step (several "
                "models, or blocks compiled one by one); use one optimizer per bk_dp model, compiled as one graph"
            )
        if found.clips:
            self._clip_state = next(iter(found.clips)).state

    def _gradient_noise_multiplier(self) -> float:
        if self.adaptive_clipping is None or self._clip_state is None:
            return self.noise_multiplier
        return gradient_noise_multiplier(self.noise_multiplier, self._count_noise(), len(self._clip_state.groups))

    def _count_noise(self) -> float:
        return self.adaptive_clipping.count_noise or self.expected_batch_size / 20

    def _adapt_thresholds(self) -> None:
        """Move each group's threshold toward the target quantile by its privatised count of samples under it."""
        state, rule = self._clip_state, self.adaptive_clipping
        noise = torch.normal(
            0.0, self._count_noise(), size=state.below.shape, generator=self.generator, dtype=torch.float64
        )
        fraction = (state.below + noise.to(state.below.device)) / self.expected_batch_size
        state.thresholds.mul_(torch.exp(-rule.learning_rate * (fraction - rule.target_quantile)))

    def step(self) -> None:
        self.add_noise()
        if self.adaptive_clipping is not None and self._clip_state is not None:
            self._adapt_thresholds()
        if self._clip_state is not None:
            self._clip_state.reset_counts()
        self.optimizer.step()
        if self.accountant is not None:
            self.accountant.step(self.sample_rate, self.noise_multiplier)
        start_step(self._params())  # the noised gradients are released: what follows starts anew

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "generator": self.generator.get_state(),
            "accountant": self.accountant.state_dict() if self.accountant is not None else None,
            "clip_state": None
            if self._clip_state is None
            else {
                "groups": self._clip_state.groups,
                "params": self._clip_state.names,
                "initial": self._clip_state.initial,
                "thresholds": self._clip_state.thresholds.clone(),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise_multiplier = state["noise_multiplier"]
        self.generator.set_state(state["generator"])
        if self.accountant is not None and state["accountant"] is not None:
            self.accountant.load_state_dict(state["accountant"])
        clip = state.get("clip_state")
        if clip is not None:  # adapted thresholds resume where they were (the graphs read the ledger's state)
            ledger_for(self._params()).restore_thresholds(
                clip["groups"], clip["params"], clip["initial"], clip["thresholds"]
            )
