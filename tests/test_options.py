"""Options are checked where they are given (bkcompile.compile, make_private, DPTrainer's PrivacyArguments), an
OptionError from torch.compile's first forward is itself (not dynamo's BackendCompilerFailed), and the Inductor
config of the bk_dp graphs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zoo
from helpers import assert_matches
from oracle import clipped_sum

import bkcompile


@pytest.mark.slow
def test_the_global_inductor_config_cannot_turn_the_pass_off() -> None:
    """``use_joint_graph_passes=False`` in the global config skips Inductor's joint-graph passes, bk_dp's pass
    among them: the bk_dp graphs turn them on for themselves, so the gradients are still clipped."""
    model, x, y = zoo.MLP().double(), torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="bk_dp", options={"max_grad_norm": 0.1})
    with torch._inductor.config.patch(use_joint_graph_passes=False):
        F.cross_entropy(compiled(x), y).backward()
    want, norms = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=0.1)
    assert (norms > 0.1).all()
    assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float64)


KNOWN = (
    "['batch_dim', 'check_passes', 'clip_fn', 'clip_gamma', 'clipping', 'compiler', 'dump', 'expected_batch_size', "
    "'graphs', 'loss_reduction', 'max_grad_norm', 'memory_budget', 'report', 'strategy']"
)
TYPO = f"unknown option 'stratgy' for backend 'bk_dp' (did you mean 'strategy'?); known options: {KNOWN}"
OPTIONS = {"max_grad_norm": 1.0, "compiler": "aot_eager"}


def test_compile_checks_the_options_before_it_returns() -> None:
    with pytest.raises(bkcompile.OptionError) as info:
        bkcompile.compile(zoo.MLP(), max_grad_norm=1.0, stratgy="ghost")
    assert str(info.value) == TYPO
    with pytest.raises(bkcompile.OptionError) as info:
        bkcompile.compile(zoo.MLP(), strategy="ghost")
    assert str(info.value) == (
        "option 'max_grad_norm' is required: the clipping threshold R, e.g. options={'max_grad_norm': 1.0}"
    )


def test_compile_trains_like_torch_compile_with_the_backend() -> None:
    model, x, y = zoo.MLP().double(), torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    twin = copy.deepcopy(model)
    compiled = bkcompile.compile(twin, max_grad_norm=0.1, compiler="aot_eager")
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is twin
    F.cross_entropy(compiled(x), y).backward()
    want, norms = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=0.1)
    assert (norms > 0.1).all()
    assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float64)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"stratgy": "ghost"}, TYPO),
        ({"clip_fn": "tanh"}, "option 'clip_fn' must be one of ('abadi', 'automatic'), got 'tanh'"),
    ],
)
def test_make_private_checks_the_options_before_it_returns(options: dict, message: str) -> None:
    model = zoo.MLP()
    data = torch.utils.data.TensorDataset(torch.randn(40, 6), torch.randint(0, 3, (40,)))
    with pytest.raises(bkcompile.OptionError) as info:
        bkcompile.make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            torch.utils.data.DataLoader(data, batch_size=8),
            max_grad_norm=1.0,
            target_delta=1e-5,
            noise_multiplier=1.0,
            **options,
        )
    assert str(info.value) == message


class Penalised(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x, y):
        return F.cross_entropy(self.fc(x), y) + 1e-2 * self.fc.weight.pow(2).sum()


def test_an_option_error_at_the_first_forward_is_an_option_error() -> None:
    """torch.compile(..., options=...) checks at the first forward; dynamo does not wrap the OptionError."""
    compiled = torch.compile(zoo.MLP(), backend="bk_dp", options={**OPTIONS, "stratgy": "ghost"})
    with pytest.raises(bkcompile.OptionError) as info:
        compiled(torch.randn(4, 6))
    assert not isinstance(info.value, torch._dynamo.exc.BackendCompilerFailed)
    assert str(info.value).splitlines()[0] == TYPO
    # one raised inside the pass (the data-independent term needs expected_batch_size) reaches the user too
    compiled = torch.compile(Penalised(), backend="bk_dp", options=OPTIONS)
    with pytest.raises(bkcompile.OptionError, match=r"^the loss adds a data-independent term .*'fc.weight'"):
        compiled(torch.randn(4, 6), torch.randint(0, 3, (4,))).backward()
