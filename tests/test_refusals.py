"""Constructs the pass cannot prove per-sample raise the package's error, naming the op and source line."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import raises_bk

import bkcompile

OPTIONS = {"max_grad_norm": 1.0, "compiler": "aot_eager"}  # a loss the model returns: recognised
TRAIN = {**OPTIONS, "loss_reduction": "mean"}  # _train_step's loss, a batch mean outside the model


def _train_step(model: nn.Module, x: torch.Tensor, options: dict = TRAIN) -> None:
    compiled = torch.compile(model, backend="bk_dp", options=options)
    compiled(x).sum(1).mean().backward()


def test_batch_norm_in_training_mode() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
    with raises_bk(bkcompile.SampleMixingError, "batch_norm", "module '1' (BatchNorm1d)", "GroupNorm"):
        _train_step(model, torch.randn(8, 4))


class BatchCentred(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x - x.mean(dim=0))  # a mean over the batch inside the model


def test_forward_mean_over_the_batch() -> None:
    with raises_bk(bkcompile.SampleMixingError, "aten.sub.Tensor", "x - x.mean(dim=0)", "fix:"):
        _train_step(BatchCentred(), torch.randn(8, 4))


@torch.library.custom_op("bktest::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


mystery.register_autograd(
    lambda ctx, g: g * torch.cos(ctx.saved_tensors[0]),
    setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]),
)


class UsesMystery(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return mystery(self.fc(x))


class UsesSin(UsesMystery):
    """The same maths with torch.sin, for the torch.func oracle (custom ops have no vmap rule)."""

    def forward(self, x):
        return torch.sin(self.fc(x))


def test_op_without_rule() -> None:
    with raises_bk(bkcompile.UnsupportedOpError, "bktest.mystery", "mystery(self.fc(x))", "register_batch_rule"):
        _train_step(UsesMystery(), torch.randn(5, 4))


def test_registered_rule_makes_a_custom_op_work() -> None:
    import copy

    from helpers import assert_matches
    from oracle import clipped_sum

    model = UsesMystery().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    loss = lambda out: out.sum(1).mean()  # noqa: E731
    twin = copy.deepcopy(model)
    bkcompile.register_batch_rule(torch.ops.bktest.mystery.default)(bkcompile.compiler.rules.pointwise)
    try:
        _train_step(twin, x, {"max_grad_norm": 0.3, "compiler": "aot_eager", "loss_reduction": "mean"})
    finally:
        from bkcompile.passes.ops import LAWS

        LAWS.pop(torch.ops.bktest.mystery.default)
    reference = UsesSin().double()
    reference.load_state_dict(model.state_dict())
    want, _ = clipped_sum(reference, loss, (x,), max_grad_norm=0.3)
    assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float64)


def test_frozen_conv_layer_is_fine() -> None:
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(6, 2))
    model[0].requires_grad_(False)
    _train_step(model, torch.randn(4, 2, 4))
    assert model[2].weight.grad is not None and model[0].weight.grad is None


def test_embedding_scaled_by_batch_frequency_is_refused() -> None:
    model = nn.Sequential(nn.Embedding(7, 4, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(12, 2))
    with raises_bk(bkcompile.SampleMixingError, "scale_grad_by_freq", "frequency in the whole batch"):
        _train_step(model, torch.randint(0, 7, (5, 3)))


def test_instance_norm_with_running_stats_is_refused() -> None:
    model = nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.InstanceNorm1d(3, track_running_stats=True), nn.Flatten(), nn.Linear(6, 2)
    )
    with raises_bk(bkcompile.SampleMixingError, "running statistics", "track_running_stats=False"):
        _train_step(model, torch.randn(4, 2, 4))


class TokenMeanLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x, labels):
        logits = self.fc(x)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def test_token_mean_over_the_whole_batch() -> None:
    compiled = torch.compile(TokenMeanLM(), backend="bk_dp", options=OPTIONS)
    with raises_bk(bkcompile.LossReductionError, "cross_entropy", "per-sample loss"):
        compiled(torch.randn(3, 6, 4), torch.randint(0, 5, (3, 6))).backward()


class MaskNormalised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x, mask):
        per_token = self.fc(x).squeeze(-1) * mask
        return per_token.sum() / mask.sum()  # normaliser over the whole batch


def test_normaliser_that_depends_on_other_samples() -> None:
    compiled = torch.compile(MaskNormalised(), backend="bk_dp", options=OPTIONS)
    with raises_bk(bkcompile.SampleMixingError, "aten.div.Tensor", "per-sample loss"):
        compiled(torch.randn(3, 6, 4), (torch.rand(3, 6) > 0.3).float()).backward()


class SumLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, y):
        return F.cross_entropy(self.fc(x), y, reduction="sum")


def test_loss_reduction_option_that_contradicts_the_loss() -> None:
    compiled = torch.compile(SumLoss(), backend="bk_dp", options={**OPTIONS, "loss_reduction": "mean"})
    with raises_bk(bkcompile.LossReductionError, "loss_reduction='mean'", "'sum'"):
        compiled(torch.randn(5, 4), torch.randint(0, 3, (5,))).backward()


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"max_grad_norm": 1.0, "clip": 1}, "'clip'"),
        ({"max_grad_norm": "1"}, "'max_grad_norm' must be a float"),
        ({"max_grad_norm": 0.0}, "'max_grad_norm' must be positive"),
        ({"max_grad_norm": -2}, "'max_grad_norm' must be positive"),
        ({}, "'max_grad_norm' is required"),
        ({"max_grad_norm": 1.0, "loss_reduction": "avg"}, "'loss_reduction'"),
        ({"max_grad_norm": 1.0, "compiler": "eager"}, "'compiler'"),
        ({"max_grad_norm": 1.0, "batch_dim": -1}, "'batch_dim'"),
    ],
)
def test_bad_options_are_named(options: dict, fragment: str) -> None:
    with raises_bk(bkcompile.OptionError, fragment):
        _train_step(nn.Linear(4, 2), torch.randn(3, 4), options)


def test_recompile_limit_is_an_error_not_an_eager_run() -> None:
    # past the limit dynamo would run the model eagerly (unclipped); importing bkcompile makes that an error
    model = nn.Linear(3, 2)
    compiled = torch.compile(model, backend="bk_dp", options=TRAIN, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=1):
        compiled(torch.randn(4, 3)).sum(1).mean().backward()
        model.double()
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            compiled(torch.randn(4, 3, dtype=torch.float64))


class _Ema(nn.Module):
    """A buffer written from a batch statistic under no_grad (never read in the same forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.register_buffer("ema", torch.zeros(4))

    def forward(self, x):
        with torch.no_grad():
            self.ema.mul_(0.9).add_(0.1 * x.mean(0))
        return self.fc(x)


@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize(
    "make, buffer",
    [
        (
            lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2)),
            "1.running_mean",
        ),
        (_Ema, "ema"),
    ],
    ids=["batch_norm", "ema"],
)
def test_a_buffer_written_from_the_batch_is_refused_at_every_batch_size(make, buffer: str, size: int) -> None:
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(size, 2, 4, 4, dtype=torch.float64) if buffer != "ema" else torch.randn(size, 4).double()
    before = {k: v.clone() for k, v in model.named_buffers()}
    compiled = torch.compile(model, backend="bk_dp", options={**OPTIONS, "loss_reduction": "sum"})
    with raises_bk(bkcompile.SampleMixingError, f"it writes the buffer {buffer!r} from the batch", "pass: buffers"):
        compiled(x).sum().backward()
    assert all(torch.equal(v, before[k]) for k, v in model.named_buffers())  # nothing reached the buffers


def test_a_buffer_counter_of_steps_is_allowed() -> None:
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.register_buffer("steps", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            self.steps.add_(1)  # the same for every batch: no sample data
            return self.fc(x)

    model = Counting().double()
    compiled = torch.compile(model, backend="bk_dp", options={**OPTIONS, "loss_reduction": "sum"})
    for size in (1, 3):
        compiled(torch.randn(size, 4).double()).sum().backward()
    assert model.steps.item() == 2


class _MaskFromOtherRows(nn.Module):
    """A padding mask edited in place as transformers 4.50's Llama builds it (``mask[..., :n] = ...``, a copy into
    a slice, allowed), then each sample's rows overwritten with the previous sample's (refused)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, keep):
        scores = self.q(x) @ self.k(x).transpose(1, 2)  # (B, T, T)
        mask = torch.zeros_like(scores)
        n = keep.shape[1]
        mask[:, :, :n] = mask[:, :, :n].masked_fill(keep[:, None, :] == 0, -1e9)
        mask[1:, :, :n] = mask[:-1, :, :n].clone()  # sample i reads sample i - 1's padding
        return (scores + mask).softmax(-1).sum((1, 2))


def test_a_copy_into_a_slice_from_other_samples_rows_is_refused() -> None:
    torch.manual_seed(0)
    x, keep = torch.randn(3, 5, 4), torch.ones(3, 5, dtype=torch.long)
    keep[1, 3:] = 0
    options = {"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "mean"}
    compiled = torch.compile(_MaskFromOtherRows(), backend="bk_dp", options=options)
    with raises_bk(bkcompile.SampleMixingError, "slices the sample axis", "mask[:-1, :, :n]"):
        compiled(x, keep).mean().backward()


def test_transformers_older_than_the_oldest_supported_release(monkeypatch) -> None:
    """A graph running transformers code on a release before 4.57 is refused with the version and the fix (the
    release string patched: CI runs one release)."""
    import transformers.activations

    monkeypatch.setattr(transformers, "__version__", "4.51.3")
    model = nn.Sequential(nn.Linear(4, 6), transformers.activations.NewGELUActivation(), nn.Linear(6, 2))
    with raises_bk(
        bkcompile.NotSupportedYetError,
        "transformers 4.51.3 is older than 4.57, the oldest release bkcompile supports",
        "(transformers/activations.py:",
        "finfo(float64).min",
        "fix: upgrade transformers: pip install -U 'transformers>=4.57'",
    ):
        _train_step(model, torch.randn(8, 4))
