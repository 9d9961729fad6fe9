"""DPOptimizer: wraps a torch.optim optimizer; adds Gaussian noise to the clipped sums once per step."""

from __future__ import annotations

import torch

from bkcompile.accountant import PrivacyAccountant
from bkcompile.errors import BKError, PrivacyError
from bkcompile.norms import backward_count


class DPOptimizer:
    """DP-SGD's noise and averaging around any optimizer (SGD, Adam, AdamW, ...).

    The bk_dp backward leaves ``p.grad = sum_i C_i g_i`` (summed over every backward since the last
    ``zero_grad``: several micro-batches make one logical batch). ``step()`` then, once:
    ``p.grad = (p.grad + N(0, (noise_multiplier * max_grad_norm)^2)) / expected_batch_size`` and steps
    the wrapped optimizer. A step with no gradient (an empty Poisson batch) adds noise alone.

    Noise comes from ``generator`` when given (reproducible), else from a generator seeded with OS
    entropy. ``step()`` refuses gradients that no bk_dp backward produced since the last step.
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
        self._backwards_at_zero = backward_count()

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._backwards_at_zero = backward_count()

    def add_noise(self) -> None:
        """Noise and average the accumulated clipped sums in place (what ``step`` does before stepping)."""
        params = self._params()
        has_grad = any(p.grad is not None for p in params)
        if has_grad and backward_count() == self._backwards_at_zero:
            raise PrivacyError(
                "the gradients were not produced by a bk_dp backward since the last zero_grad(); stepping them "
                "would not be private. Compile the model with backend='bk_dp' and call zero_grad() before each "
                "logical batch"
            )
        std = self.noise_multiplier * self.max_grad_norm
        for p in params:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            noise = torch.normal(0.0, std, size=p.shape, generator=self.generator, dtype=p.dtype)
            p.grad = (grad + noise.to(p.device)) / self.expected_batch_size

    def step(self) -> None:
        self.add_noise()
        self.optimizer.step()
        if self.accountant is not None:
            self.accountant.step(self.sample_rate, self.noise_multiplier)
        self._backwards_at_zero = backward_count()

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "generator": self.generator.get_state(),
            "accountant": self.accountant.state_dict() if self.accountant is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.noise_multiplier = state["noise_multiplier"]
        self.generator.set_state(state["generator"])
        if self.accountant is not None and state["accountant"] is not None:
            self.accountant.load_state_dict(state["accountant"])
