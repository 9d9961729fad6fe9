"""The backend as a user meets it: registration, dynamic batch sizes, inference."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import zoo
from helpers import assert_matches, raises_bk
from oracle import clipped_sum
from torch._dynamo.utils import counters

import bkcompile
from bkcompile.errors import find_error


@pytest.mark.slow  # a fresh interpreter
def test_backend_name_works_without_importing_bkcompile() -> None:
    script = textwrap.dedent(
        """
        import sys, torch
        model = torch.nn.Linear(3, 2)
        assert "bkcompile" not in sys.modules
        options = {"max_grad_norm": 1e-3, "compiler": "aot_eager", "loss_reduction": "sum"}
        compiled = torch.compile(model, backend="bk_dp", options=options)
        compiled(torch.randn(4, 3)).sum(1).sum().backward()
        total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
        assert total <= 4 * 1e-3 + 1e-9, total   # four samples, each clipped to norm 1e-3
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_a_failure_inside_inductor_is_a_bkcompile_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception of Inductor's compile of a graph the pass accepted reaches the user as a NotSupportedYetError:
    torch's first line, that it is in torch's compiler, the fixes; torch's exception chained as the cause."""
    from torch._inductor import compile_fx

    failure = RuntimeError("GuardOnDataDependentSymNode: Eq(3*u0, 1)\n  a long lowering dump")

    def failing(*args, **kwargs):
        raise failure

    monkeypatch.setattr(compile_fx, "compile_fx_inner", failing)
    model = torch.compile(
        torch.nn.Linear(3, 2), backend="bk_dp", options={"max_grad_norm": 1.0, "loss_reduction": "sum"}
    )
    with raises_bk(
        bkcompile.NotSupportedYetError,
        "torch's compiler (Inductor) failed on bk_dp graph #",
        "RuntimeError: GuardOnDataDependentSymNode: Eq(3*u0, 1)\n",
        "the failure is inside torch's compiler, not a privacy refusal",
        "fix: compile with compiler='aot_eager'",
        "give the model a static batch",
        "please report the issue",
    ) as info:
        model(torch.randn(4, 3)).sum().backward()
    error = find_error(info.value, bkcompile.NotSupportedYetError)
    assert error.__cause__ is failure
    assert "a long lowering dump" not in str(error)


def test_changed_batch_size_does_not_recompile() -> None:
    model = zoo.PreNormBlock().double()
    twin = copy.deepcopy(model)
    compiled = torch.compile(
        twin, backend="bk_dp", options={"max_grad_norm": 0.05, "compiler": "aot_eager", "loss_reduction": "mean"}
    )
    counters.clear()
    for batch in (7, 1, 32, 3):
        x = torch.randn(batch, 4, 8, dtype=torch.float64)
        y = torch.randint(0, 3, (batch,))
        bkcompile.mark_batch_dynamic(x, y)
        twin.zero_grad(set_to_none=True)
        F.cross_entropy(compiled(x), y).backward()
        want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=0.05)
        assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float64)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_inductor_loss_inside_with_dynamic_batch_and_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")  # Inductor's strict checks, on as in a user's CI
    model = zoo.MLPWithLoss("mean").double()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="bk_dp", options={"max_grad_norm": 0.1})
    for batch in (6, 11):
        x, y = torch.randn(batch, 6, dtype=torch.float64), torch.randint(0, 3, (batch,))
        bkcompile.mark_batch_dynamic(x, y)
        twin.zero_grad(set_to_none=True)
        compiled(x, y).backward()
        want, _ = clipped_sum(model, lambda loss: loss, (x, y), (), max_grad_norm=0.1)
        assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, y), model(x, y))


def test_inference_returns_the_model_outputs() -> None:
    model = zoo.PreNormBlock()
    options = {"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "mean"}  # eval with grad: compiled
    compiled = torch.compile(model, backend="bk_dp", options=options)  # for training, a loss outside
    x = torch.randn(5, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    model.eval()
    torch.testing.assert_close(compiled(x), model(x))


class WithConstant(torch.nn.Module):
    """A plain tensor attribute (not a buffer) is module state: the same for every sample."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 3)
        self.scale = torch.linspace(0.5, 1.5, 3)

    def forward(self, x):
        return self.fc(x) * self.scale


def test_plain_tensor_attributes_are_replicated() -> None:
    model = torch.nn.Sequential(WithConstant()).double()
    twin = copy.deepcopy(model)
    compiled = torch.compile(
        twin, backend="bk_dp", options={"max_grad_norm": 0.2, "compiler": "aot_eager", "loss_reduction": "mean"}
    )
    x = torch.randn(5, 3, dtype=torch.float64)
    loss = lambda out: out.sum(1).mean()  # noqa: E731
    loss(compiled(x)).backward()
    want, _ = clipped_sum(model, loss, (x,), max_grad_norm=0.2)
    assert_matches({k: p.grad for k, p in twin.named_parameters()}, want, torch.float64)


def test_find_error_follows_the_wrapped_cause_and_context_chain() -> None:
    refusal = bkcompile.SampleMixingError("mixes samples")
    wrapped = RuntimeError("dynamo")
    wrapped.inner_exception = refusal  # what BackendCompilerFailed keeps
    outer = ValueError("outer")
    outer.__context__ = wrapped
    assert find_error(outer) is refusal
    assert find_error(outer, bkcompile.SampleMixingError) is refusal
    assert find_error(outer, bkcompile.OptionError) is None
    looped = ValueError("loop")
    looped.__cause__ = looped
    assert find_error(looped) is None
