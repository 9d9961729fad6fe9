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
from torch._inductor.utils import fresh_cache

import bkcompile
import bkcompile.compiler.backend
from bkcompile.compiler.options import parse_options


@pytest.mark.slow
def test_the_global_inductor_config_cannot_turn_the_pass_off() -> None:
    """``use_joint_graph_passes=False`` in the global config skips Inductor's joint-graph passes, bk_dp's pass
    among them: the bk_dp graphs turn them on for themselves, so the gradients are still clipped."""
    model, x, y = zoo.MLP().double(), torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="bk_dp", options={"max_grad_norm": 0.1, "loss_reduction": "mean"})
    with torch._inductor.config.patch(use_joint_graph_passes=False):
        F.cross_entropy(compiled(x), y).backward()
    want, norms = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=0.1)
    assert (norms > 0.1).all()
    assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float64)


KNOWN = (
    "['batch_dim', 'check_passes', 'clip_fn', 'clip_gamma', 'clipping', 'compiler', 'dump', 'expected_batch_size', "
    "'graphs', 'inductor', 'loss_reduction', 'max_grad_norm', 'memory_budget', 'mode', 'report', 'strategy']"
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
    compiled = bkcompile.compile(twin, max_grad_norm=0.1, compiler="aot_eager", loss_reduction="mean")
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
        (
            {"mode": "max-autotune"},
            "option 'mode' cannot be 'max-autotune': it turns on CUDA graphs (triton.cudagraphs), which bk_dp does "
            "not support yet. Fix: mode='default' or 'max-autotune-no-cudagraphs' (max_autotune and "
            "coordinate_descent_tuning, without CUDA graphs), and other Inductor config entries as "
            "options={'inductor': {...}}",
        ),
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


def test_torch_compiles_mode_argument_is_refused_with_the_fix() -> None:
    compiled = torch.compile(zoo.MLP(), backend="bk_dp", mode="max-autotune-no-cudagraphs")
    with pytest.raises(bkcompile.OptionError) as info:
        compiled(torch.randn(4, 6))
    assert str(info.value).splitlines()[0] == (
        "torch.compile(..., backend='bk_dp', mode='max-autotune-no-cudagraphs'): torch takes mode or options, not "
        "both, and bk_dp needs options (max_grad_norm). Fix: options={'max_grad_norm': R, 'mode': "
        "'max-autotune-no-cudagraphs'}, or bkcompile.compile(model, max_grad_norm=R, mode='max-autotune-no-cudagraphs')"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"mode": "lite"},
            "option 'mode' cannot be 'lite': it turns off Inductor's joint-graph passes, where bk_dp clips the "
            "per-sample gradients. Fix: mode='default' or 'max-autotune-no-cudagraphs' (max_autotune and "
            "coordinate_descent_tuning, without CUDA graphs), and other Inductor config entries as "
            "options={'inductor': {...}}",
        ),
        ({"mode": "fast"}, "option 'mode' must be one of ('default', 'max-autotune-no-cudagraphs'), got 'fast'"),
        (
            {"inductor": {"use_joint_graph_passes": False}},
            "option 'inductor' cannot set 'use_joint_graph_passes': bk_dp sets it (bk_dp's privatizing pass is one "
            "of them). Fix: leave it out",
        ),
        (
            {"inductor": {"joint_custom_pre_pass": None}},
            "option 'inductor' cannot set 'joint_custom_pre_pass': bk_dp sets it (bk_dp's privatizing pass runs "
            "there). Fix: leave it out",
        ),
        (
            {"inductor": {"triton.cudagraphs": True}},
            "option 'inductor' cannot set 'triton.cudagraphs': bk_dp sets it (bk_dp does not support CUDA graphs "
            "yet). Fix: leave it out",
        ),
        (
            {"inductor": {"coordinate_descent_tunning": True}},
            "option 'inductor': 'coordinate_descent_tunning' is not an Inductor config entry (did you mean "
            "'coordinate_descent_tuning'?)",
        ),
        ({"inductor": {"max_autotune": 1}}, "option 'inductor': 'max_autotune' takes a bool, got int 1"),
        (
            {"inductor": ["max_autotune"]},
            "option 'inductor' must be a dict of Inductor config entries, e.g. {'coordinate_descent_tuning': True}; "
            "got ['max_autotune']",
        ),
        (
            {"compiler": "aot_eager", "mode": "max-autotune-no-cudagraphs"},
            "option 'mode' configures Inductor, and compiler='aot_eager'. Fix: leave 'mode' out, or "
            "compiler='inductor'",
        ),
    ],
)
def test_bad_modes_and_inductor_entries_are_refused_with_the_fix(options: dict, message: str) -> None:
    with pytest.raises(bkcompile.OptionError) as info:
        bkcompile.compile(zoo.MLP(), max_grad_norm=1.0, **options)
    assert str(info.value) == message


def test_mode_and_inductor_entries_are_kept_in_the_options() -> None:
    inductor = {"max_autotune_gemm_backends": "ATEN", "cpp-wrapper": True}  # "-" for "_", as torch.compile takes
    options = parse_options({"max_grad_norm": 1.0, "mode": "max-autotune-no-cudagraphs", "inductor": inductor})
    assert options.mode == "max-autotune-no-cudagraphs"
    assert options.inductor == (("cpp_wrapper", True), ("max_autotune_gemm_backends", "ATEN"))


@pytest.mark.slow
def test_a_compile_mode_reaches_inductor_and_trains_as_the_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    """mode="max-autotune-no-cudagraphs" and an ``inductor`` entry are Inductor's config while it runs the
    privatizing pass on the joint graph (read inside the pass), for the bk_dp graphs only."""
    seen = []
    privatize = bkcompile.compiler.backend.privatize

    def recording(*args, **kwargs):
        config = torch._inductor.config
        seen.append((config.max_autotune, config.coordinate_descent_tuning, config.max_autotune_gemm_backends))
        return privatize(*args, **kwargs)

    monkeypatch.setattr(bkcompile.compiler.backend, "privatize", recording)
    model, x, y = zoo.MLP().double(), torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    twin = copy.deepcopy(model)
    # ATen's GEMMs only: max_autotune has one choice per matrix product and benchmarks nothing (quick on a CPU)
    compiled = bkcompile.compile(
        twin,
        max_grad_norm=0.1,
        loss_reduction="mean",
        mode="max-autotune-no-cudagraphs",
        inductor={"max_autotune_gemm_backends": "ATEN"},
    )
    with fresh_cache():  # an earlier run's cached graph would load its saved plan, and the pass would not run
        F.cross_entropy(compiled(x), y).backward()
    assert seen == [(True, True, "ATEN")]
    config = torch._inductor.config
    assert (config.max_autotune, config.coordinate_descent_tuning) == (False, False)  # outside: untouched
    want, norms = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=0.1)
    assert (norms > 0.1).all()
    assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float64)
