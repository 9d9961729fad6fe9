"""The release is sealed: with a DPOptimizer, a step's clipped sum stays in the ledger until DPOptimizer.step(),
which alone writes p.grad (noised). Every road around it (an edited p.grad, another optimizer, a parameter
frozen, removed or left out of the DP optimizer) is refused or cannot change what is released."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from oracle import clipped_sum

import bkcompile

R = 0.5
OPTIONS = {"max_grad_norm": R, "compiler": "aot_eager", "loss_reduction": "mean"}  # the losses here: batch means
B = 4


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batch(size: int = B, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 6, dtype=torch.float64, generator=generator), torch.randint(
        0, 3, (size,), generator=generator
    )


def _dp(params, lr: float = 0.0) -> bkcompile.DPOptimizer:
    return bkcompile.DPOptimizer(
        torch.optim.SGD(params, lr=lr), noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=B
    )


def _backward(model: nn.Module, x, y) -> None:
    F.cross_entropy(torch.compile(model, backend="bk_dp", options=OPTIONS)(x), y).backward()


def test_the_clipped_sum_never_reaches_p_grad_before_step() -> None:
    model = _mlp()
    optimizer = _dp(model.parameters())
    x, y = _batch()
    _backward(model, x, y)
    assert all(p.grad is None for p in model.parameters())  # nothing un-noised to edit, step or read
    optimizer.step()
    want, _ = clipped_sum(_mlp(), F.cross_entropy, (x,), (y,), max_grad_norm=R)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad * B, want[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("edit", ["in_place", "through_data", "zero_grad_keeps_tensors"])
def test_an_edited_released_gradient_does_not_change_the_next_release(edit: str) -> None:
    """p.grad after a step is the noised gradient; editing it before the next step changes nothing released."""
    model = _mlp()
    optimizer = _dp(model.parameters())
    x, y = _batch()
    _backward(model, x, y)
    optimizer.step()
    if edit == "zero_grad_keeps_tensors":
        optimizer.zero_grad(set_to_none=False)
    x2, y2 = _batch(seed=2)
    _backward(model, x2, y2)
    for p in model.parameters():
        (p.grad.data if edit == "through_data" else p.grad).mul_(1000)
    optimizer.step()
    want, _ = clipped_sum(_mlp(), F.cross_entropy, (x2,), (y2,), max_grad_norm=R)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad * B, want[name], rtol=1e-10, atol=1e-12, msg=name)


def test_a_gradient_set_by_hand_between_backward_and_step_is_refused() -> None:
    model = _mlp()
    optimizer = _dp(model.parameters())
    _backward(model, *_batch())
    model[2].weight.grad = torch.full_like(model[2].weight, 1000.0)
    with pytest.raises(bkcompile.UnclippedGradientError, match=r"'2.weight': p.grad holds a gradient that neither"):
        optimizer.step()
    assert model[0].weight.grad is None  # refused before any release


def test_another_optimizer_over_a_parameter_the_dp_optimizer_holds_is_refused() -> None:
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = _dp(model.parameters())  # held: a DP optimizer that is gone releases nothing
    plain = torch.optim.SGD(model[2].parameters(), lr=1.0)
    _backward(model, *_batch())
    with pytest.raises(bkcompile.ReleaseError, match=r"SGD.step\(\) would update a parameter of shape \(3, 8\)"):
        plain.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    optimizer.step()  # the DP optimizer still releases the step


def test_a_model_parameter_left_out_of_the_dp_optimizer_is_refused_at_the_backward() -> None:
    """A DPOptimizer over the first layer, a plain optimizer over the head: the head's clipped sum would be
    stepped un-noised, so the backward that clips it is refused."""
    model = _mlp()
    optimizer = _dp(model[0].parameters())
    torch.optim.SGD(model[2].parameters(), lr=1.0)
    with pytest.raises(bkcompile.ReleaseError, match=r"parameter '2.weight' was clipped, but the DPOptimizer"):
        _backward(model, *_batch())
    assert all(p.grad is None for p in model.parameters())
    assert optimizer.param_groups[0]["params"][0] is model[0].weight


def test_a_parameter_frozen_between_backward_and_step_is_refused() -> None:
    model = _mlp()
    optimizer = _dp(model.parameters(), lr=1.0)
    _backward(model, *_batch())
    model[2].bias.requires_grad_(False)
    with pytest.raises(bkcompile.UnclippedGradientError, match=r"'2.bias': frozen \(requires_grad=False\) between"):
        optimizer.step()


def test_a_parameter_removed_from_the_optimizer_between_backward_and_step_is_refused() -> None:
    model = _mlp()
    optimizer = _dp(model.parameters(), lr=1.0)
    _backward(model, *_batch())
    optimizer.param_groups[0]["params"] = optimizer.param_groups[0]["params"][:-1]
    with pytest.raises(bkcompile.UnclippedGradientError, match=r"'2.bias': holds a clipped sum of this step but was"):
        optimizer.step()


def test_noise_is_added_only_by_step() -> None:
    assert not hasattr(bkcompile.DPOptimizer, "add_noise")


def test_the_plain_path_keeps_the_clipped_sum_in_p_grad() -> None:
    model = _mlp()
    x, y = _batch()
    _backward(model, x, y)
    want, _ = clipped_sum(_mlp(), F.cross_entropy, (x,), (y,), max_grad_norm=R)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-10, atol=1e-12, msg=name)


# --- a torch.optim.Optimizer: schedulers, param groups ----------------------------------------------------------


@pytest.mark.parametrize(
    "schedule",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: 1 / (epoch + 1)),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.4, total_steps=4),
    ],
    ids=["StepLR", "LambdaLR", "OneCycleLR"],
)
def test_lr_schedulers_drive_the_dp_optimizer(schedule) -> None:
    model = _mlp()
    optimizer = _dp(model.parameters(), lr=0.4)
    assert isinstance(optimizer, torch.optim.Optimizer)
    scheduler = schedule(optimizer)
    reference = schedule(torch.optim.SGD(_mlp().parameters(), lr=0.4))
    x, y = _batch()
    for _ in range(3):
        optimizer.zero_grad()
        _backward(model, x, y)
        optimizer.step()
        scheduler.step()
        reference.optimizer.step()
        reference.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference.optimizer.param_groups[0]["lr"])
    assert optimizer.optimizer.param_groups is optimizer.param_groups


def test_add_param_group_holds_the_new_parameters() -> None:
    model = _mlp()
    optimizer = _dp(model[0].parameters())
    optimizer.add_param_group({"params": list(model[2].parameters()), "lr": 0.0})
    x, y = _batch()
    _backward(model, x, y)  # the head is held now: no refusal
    optimizer.step()
    want, _ = clipped_sum(_mlp(), F.cross_entropy, (x,), (y,), max_grad_norm=R)
    torch.testing.assert_close(model[2].weight.grad * B, want["2.weight"], rtol=1e-10, atol=1e-12)


def test_step_takes_no_closure() -> None:
    model = _mlp()
    optimizer = _dp(model.parameters())
    with pytest.raises(bkcompile.BKError, match="takes no closure"):
        optimizer.step(lambda: 0.0)


# --- rows once: every drawn row clipped exactly once per step ----------------------------------------------------


def test_two_backwards_over_one_batch_in_one_step_are_refused() -> None:
    model = _mlp()
    optimizer = _dp(model.parameters())
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    x, y = _batch()
    F.cross_entropy(cm(x), y).backward()
    with pytest.raises(bkcompile.ClipOnceError, match="clips rows that a backward earlier in this step clipped"):
        F.cross_entropy(cm(x), y).backward()
    optimizer.zero_grad()  # a new step: the same batch may be clipped again
    F.cross_entropy(cm(x), y).backward()
    optimizer.step()


@pytest.mark.parametrize("parts", [[(0, 3), (2, 5)], [(0, 5), (4, 5)]], ids=["overlapping", "contained"])
def test_overlapping_micro_batches_are_refused(parts) -> None:
    model = _mlp()
    _keep = _dp(model.parameters())
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    x, y = _batch(5)
    (a, b), (c, d) = parts
    F.cross_entropy(cm(x[a:b]), y[a:b]).backward()
    with pytest.raises(bkcompile.ClipOnceError, match="fix: split the batch into disjoint micro-batches"):
        F.cross_entropy(cm(x[c:d]), y[c:d]).backward()
    assert _keep is not None


def _loader_and_optimizer(model: nn.Module, x, y, **kwargs):
    loader = bkcompile.PoissonLoader(x, y, sample_rate=0.5, generator=torch.Generator().manual_seed(0))
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=R, data_loader=loader, **kwargs
    )
    return loader, optimizer


def test_a_step_with_no_batch_drawn_from_the_accounted_loader_is_refused() -> None:
    """Training from the DataLoader given to make_private instead of the Poisson loader it returned."""
    model = _mlp()
    x, y = _batch(16)
    _, optimizer = _loader_and_optimizer(model, x, y)
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    for xb, yb in torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True):
        F.cross_entropy(cm(xb), yb).backward()
        with pytest.raises(bkcompile.ReleaseError, match="with no batch drawn since the last step"):
            optimizer.step()
        break


@pytest.mark.parametrize("road", ["part_of_the_batch", "a_copy_twice"])
def test_rows_clipped_must_be_the_drawn_batch(road: str) -> None:
    model = _mlp()
    x, y = _batch(16)
    loader, optimizer = _loader_and_optimizer(model, x, y)
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    xb, yb = next(iter(loader))
    assert len(xb) >= 3
    if road == "part_of_the_batch":
        F.cross_entropy(cm(xb[:2]), yb[:2]).backward()
    else:  # copies are new memory: the count still sees row 0-1 twice
        for _ in range(2):
            F.cross_entropy(cm(xb[:2].clone()), yb[:2].clone()).backward()
        F.cross_entropy(cm(xb[2:]), yb[2:]).backward()
    with pytest.raises(
        bkcompile.ReleaseError, match=rf"this step clipped \d+ rows, and the batch drawn .* has {len(xb)}"
    ):
        optimizer.step()


def test_micro_batches_of_the_drawn_batch_step_exactly() -> None:
    model = _mlp()
    x, y = _batch(16)
    loader, optimizer = _loader_and_optimizer(model, x, y)
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    xb, yb = next(iter(loader))
    for xs, ys in bkcompile.micro_batches((xb, yb), 3):
        F.cross_entropy(cm(xs), ys).backward()
    optimizer.step()
    want, _ = clipped_sum(_mlp(), F.cross_entropy, (xb,), (yb,), max_grad_norm=R)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad * loader.expected_batch_size, want[name], rtol=1e-10, atol=1e-12)


def test_an_accountant_rate_that_disagrees_with_the_loader_in_use_is_refused() -> None:
    model = _mlp()
    x, y = _batch(16)
    loader = bkcompile.PoissonLoader(x, y, sample_rate=0.5, generator=torch.Generator().manual_seed(0))
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=1.0,
        max_grad_norm=R,
        expected_batch_size=8,
        sample_rate=0.01,
        accountant=bkcompile.PrivacyAccountant(),
    )
    cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
    xb, yb = next(iter(loader))
    F.cross_entropy(cm(xb), yb).backward()
    with pytest.raises(bkcompile.ReleaseError, match="drawn by a PoissonLoader at sample rate 0.5, and the accountant"):
        optimizer.step()
    assert optimizer.accountant.history == []


@pytest.mark.parametrize("max_size", [16, 3, 1])
def test_micro_batches_of_a_drawn_batch_move_the_update_by_at_most_2r(max_size: int) -> None:
    """Replace one drawn sample of the dataset by an outlier: the step released from the drawn batch, in
    micro-batches or whole, moves by at most 2R before noise."""
    x, y = _batch(16)
    first = next(iter(_loader_and_optimizer(_mlp(), x, y)[0]))[0][0]
    outlier = x.clone()
    outlier[(x == first).all(1)] = 50.0  # a row the seeded loader draws
    released = []
    for data in (x, outlier):
        model = _mlp()
        loader, optimizer = _loader_and_optimizer(model, data, y)
        cm = torch.compile(model, backend="bk_dp", options=OPTIONS)
        xb, yb = next(iter(loader))  # the same seed: the same rows of both datasets
        for xs, ys in bkcompile.micro_batches((xb, yb), max_size):
            F.cross_entropy(cm(xs), ys).backward()
        optimizer.step()
        released.append(torch.cat([p.grad.flatten() for p in model.parameters()]) * loader.expected_batch_size)
    moved = (released[0] - released[1]).norm()
    assert 0 < moved <= 2 * R * (1 + 1e-9)


@pytest.mark.slow
def test_the_readme_accumulation_recipe_under_inductor_with_a_dynamic_batch() -> None:
    """The default path: Inductor, a Poisson batch (dynamic size) larger than max_size, split by micro_batches."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    loader = bkcompile.PoissonLoader(x, y, sample_rate=0.5, generator=torch.Generator().manual_seed(0))
    optimizer = bkcompile.DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), noise_multiplier=0.0, max_grad_norm=R, data_loader=loader
    )
    cm = bkcompile.compile(model, max_grad_norm=R, loss_reduction="mean")
    for step, (xb, yb) in enumerate(loader):
        assert len(xb) > 5
        for xs, ys in bkcompile.micro_batches((xb, yb), 5):
            F.cross_entropy(cm(xs), ys).backward()
        optimizer.step()
        want, _ = clipped_sum(reference, F.cross_entropy, (xb,), (yb,), max_grad_norm=R)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad * loader.expected_batch_size, want[name], rtol=1e-4, atol=1e-5)
        if step == 1:
            break
