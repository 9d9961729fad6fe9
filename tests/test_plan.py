"""The compile -> run contract (``bkcompile.plan``) and the clipping policy (``bkcompile.policy``): a graph's plan
lives as long as its compiled graph, and the policy's table agrees with the options."""

from __future__ import annotations

import gc
import types
import typing
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bkcompile
import bkcompile.compiler.backend
from bkcompile.compiler.options import CLIPPING_STYLES, ClipFn
from bkcompile.plan import GraphPlan
from bkcompile.policy import CLIP_FUNCTIONS, EPS, STYLES, ClipPolicy
from bkcompile.runtime.ledger import ledger_of, live_records


def test_every_clip_function_has_its_option_value_and_every_style_its_name() -> None:
    assert typing.get_args(ClipFn) == tuple(CLIP_FUNCTIONS)
    assert CLIPPING_STYLES == tuple(STYLES)


@pytest.mark.parametrize(
    "clip_fn, want",
    [("abadi", [1.0, 1.0, 2.0 / (8.0 + EPS)]), ("automatic", [2.0 / 0.5, 2.0 / 1.5, 2.0 / 8.5])],
)
def test_the_clip_factor_is_the_policy_s(clip_fn: str, want: list[float]) -> None:
    policy = ClipPolicy(max_grad_norm=2.0, clipping="all-layer", clip_fn=clip_fn, clip_gamma=0.5)
    norms = torch.tensor([0.0, 1.0, 8.0], dtype=torch.float64)
    got = policy.factor(norms, torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-15, atol=0)


def test_groups_without_a_threshold_share_max_grad_norm() -> None:
    policy = ClipPolicy(max_grad_norm=3.0, clipping="layer-wise", clip_fn="abadi", clip_gamma=0.01)
    assert policy.thresholds([None, 0.5, None, None]) == (3.0 / 3**0.5, 0.5, 3.0 / 3**0.5, 3.0 / 3**0.5)
    assert policy.thresholds([0.5]) == (0.5,)


def _call(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def _fresh_entry(number: int):
    """``_call`` with a code object of its own: each is compiled into graphs of its own."""
    name = f"plan_test_entry_{number}"
    code = _call.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, _call.__globals__, name)


def _train_one_step(number: int) -> weakref.ref:
    """Compile a small MLP (a piece for an odd ``number``), train it one step; a weak reference to it. A function
    of its own: the frames bk_dp reads while the model runs keep no locals of the test."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    options = {"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "mean"}
    if number % 2:
        options.update(graphs="several", strategy="ghost")
    compiled = torch.compile(_fresh_entry(number), backend="bk_dp", options=options)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    F.cross_entropy(compiled(model, x), y).backward()
    assert all([p.grad is not None for p in model.parameters()])
    return weakref.ref(model), weakref.ref(model[0].weight), weakref.ref(ledger_of(model))


@pytest.mark.slow
def test_models_compiled_and_dropped_leave_nothing_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """30 small MLPs, half of them in pieces (graphs="several", ghost norms: the plan keeps site graphs), each
    compiled, trained one step and dropped: the models, their parameters, their step ledgers, their joint graphs
    and their records are freed once dynamo forgets its graphs, and the table of records holds none of theirs."""
    torch._dynamo.reset()
    gc.collect()
    before = {record.key for record in live_records()}  # what earlier tests left alive is theirs
    joints: list[weakref.ref] = []
    privatize = bkcompile.compiler.backend.privatize

    def recording(gm, *args, **kwargs) -> GraphPlan:
        joints.append(weakref.ref(gm))
        return privatize(gm, *args, **kwargs)

    monkeypatch.setattr(bkcompile.compiler.backend, "privatize", recording)
    models, params, ledgers = zip(*[_train_one_step(number) for number in range(30)])
    records = [weakref.ref(record) for record in live_records() if record.key not in before]
    assert len(records) >= 30 and len(joints) >= 30
    assert any(r().plan.piece is not None and r().plan.piece.kept for r in records)
    torch._dynamo.reset()
    gc.collect()
    kinds = {"model": models, "parameter": params, "ledger": ledgers, "joint graph": joints, "record": records}
    alive = {name: [i for i, r in enumerate(refs) if r() is not None] for name, refs in kinds.items()}
    alive = {name: found for name, found in alive.items() if found}
    assert not alive, f"still alive: {alive}"
    assert {record.key for record in live_records()} <= before
