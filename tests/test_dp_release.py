"""What a DP step releases: adaptive clipping's counts and gradient as one Gaussian mechanism of the recorded
multiplier (a neighbouring-dataset check), noise precision, and the secret part of the optimizer's state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import bkcompile

D, G = 50, 4


class FourGroups(nn.Module):
    """Four weights, each seeing its own quarter of the input: sample i's gradient of weight k is x[i, k]."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = nn.ModuleList(nn.Linear(D, 1, bias=False) for _ in range(G))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(part(x[:, k]) for k, part in enumerate(self.parts))


@pytest.mark.parametrize("count_noise", [3.2, 10.0])
def test_adaptive_step_is_no_weaker_than_the_recorded_gaussian_mechanism(count_noise: float) -> None:
    """Run one step on D and on D plus one sample z with the same noise; in units of each released
    quantity's noise std, the outputs move by 1 / sigma_true (Gaussian mechanism). z's group norms equal
    the thresholds: it moves the clipped sum by the full sensitivity and every count as far as it can."""
    torch.manual_seed(0)
    data = torch.randn(6, G, D, dtype=torch.float64) * 0.1
    z = torch.randn(1, G, D, dtype=torch.float64)
    thresholds = z[0].norm(dim=1) * (1 + 1e-9)  # z counts as "below" its thresholds, and is clipped by ~1e-6 only
    model = FourGroups().double()
    compiled = torch.compile(
        model,
        backend="bk_dp",
        options={
            "max_grad_norm": 1.0,
            "compiler": "aot_eager",
            "loss_reduction": "sum",
            "clipping": [{"params": f"parts.{k}.*", "max_grad_norm": float(r)} for k, r in enumerate(thresholds)],
        },
    )
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=6,
        sample_rate=0.01,
        accountant=bkcompile.PrivacyAccountant(),
        generator=torch.Generator().manual_seed(7),
        adaptive_clipping=bkcompile.AdaptiveClipping(count_noise=count_noise),
    )
    noise_state = optimizer.generator.get_state()
    released = []
    for batch in (data, torch.cat([data, z])):
        bkcompile.mark_batch_dynamic(batch)
        optimizer.zero_grad()
        compiled(batch).sum().backward()
        optimizer.step()
        release = optimizer.last_release
        gradient = torch.cat([p.grad.flatten() for p in model.parameters()]) * 6  # the noisy clipped sum
        released.append((gradient, release))
        state = optimizer.state_dict()  # resume at the start, to step D + z with the same thresholds and noise
        state["clip_state"]["thresholds"] = torch.tensor(state["clip_state"]["initial"], dtype=torch.float64)
        state["secret"]["noise_generator"] = noise_state
        optimizer.load_state_dict(state)
    (g0, r0), (g1, r1) = released
    gradient_std = float(r0.gradient_noise_std)
    assert gradient_std == float(r1.gradient_noise_std) and r0.count_noise_std == count_noise
    shift = (g1 - g0).pow(2).sum() / gradient_std**2 + (r1.counts - r0.counts).pow(2).sum() / count_noise**2
    true_sigma = shift.item() ** -0.5
    for q, sigma, _ in optimizer.accountant.history:  # what the accountant recorded for these steps
        assert q == 0.01
        assert sigma <= true_sigma * (1 + 1e-6)  # epsilon is not under-reported
        assert true_sigma <= sigma * (1 + 1e-4)  # and z is the worst case: no noise is wasted
    assert torch.allclose(r1.counts - r0.counts, torch.full((G,), 0.5, dtype=torch.float64))  # 1/2 per count


def test_low_precision_noise_is_drawn_and_summed_in_float32() -> None:
    model = nn.Linear(300, 200).bfloat16()
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=1.3,
        max_grad_norm=0.7,
        expected_batch_size=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    optimizer.zero_grad()
    optimizer.step()  # an empty batch: noise alone, averaged
    reference = torch.Generator().manual_seed(0)
    for p in model.parameters():
        std = torch.tensor(1.3 * 0.7, dtype=torch.float64).float()
        noise = torch.normal(0.0, 1.0, size=p.shape, generator=reference, dtype=torch.float32) * std
        assert p.grad.dtype == torch.bfloat16
        assert torch.equal(p.grad, (noise / 3.0).bfloat16())  # one rounding, not two


def test_the_noise_generator_state_is_a_separate_secret() -> None:
    model = nn.Linear(4, 2)
    compiled = torch.compile(model, backend="bk_dp", options={"max_grad_norm": 1.0, "compiler": "aot_eager"})

    def make() -> bkcompile.DPOptimizer:
        return bkcompile.DPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            expected_batch_size=4,
            sample_rate=0.1,
            accountant=bkcompile.PrivacyAccountant(),
            generator=torch.Generator().manual_seed(3),
        )

    optimizer = make()
    optimizer.zero_grad()
    optimizer.step()
    full, public = optimizer.state_dict(), optimizer.state_dict(include_secret=False)
    secret = optimizer.generator.get_state()
    assert torch.equal(full["secret"]["noise_generator"], secret)
    assert "secret" not in public and not _holds(public, secret)
    assert [k for k in full if k != "secret"] == list(public)
    assert not _holds(compiled.state_dict(), secret) and not _holds(model.state_dict(), secret)
    resumed = make()
    resumed.load_state_dict(full)  # resumes the noise stream: the same next draw
    assert torch.equal(resumed.generator.get_state(), secret)
    own = make()
    before = own.generator.get_state()
    own.load_state_dict(public)  # without the secret: its own generator is kept
    assert torch.equal(own.generator.get_state(), before)
    assert own.accountant.history == [[0.1, 1.0, 1]]


def _holds(state, secret: torch.Tensor) -> bool:
    if isinstance(state, torch.Tensor):
        return state.dtype == secret.dtype and state.shape == secret.shape and torch.equal(state, secret)
    if isinstance(state, dict):
        return any(_holds(v, secret) for v in state.values())
    if isinstance(state, (list, tuple)):
        return any(_holds(v, secret) for v in state)
    return False


def test_adaptive_count_noise_formula() -> None:
    from bkcompile.optimizer import gradient_noise_multiplier

    # G centred counts, each moved by 1/2: sensitivity sqrt(G)/2 against count noise 3.2
    sigma_grad = gradient_noise_multiplier(1.0, 3.2, 4)
    assert (sigma_grad**-2 + 4 / (4 * 3.2**2)) ** -0.5 == pytest.approx(1.0)
    assert gradient_noise_multiplier(0.0, 3.2, 4) == 0.0  # a non-private run (no accountant): no noise at all
    with pytest.raises(bkcompile.PrivacyError, match=f"raise count_noise above {math.sqrt(4) / 2:.3g}"):
        gradient_noise_multiplier(1.0, 0.9, 4)
