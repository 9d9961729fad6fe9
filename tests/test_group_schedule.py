"""Clipping by groups without holding: each group's per-sample gradients are formed, normed, clipped, summed and
freed as the backward reaches the group (``passes/schedule.py``), for every clipping style and strategy, against
the oracle; and the graph holds no group's per-sample gradients past the next group's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import zoo
from helpers import assert_matches, expected_groups, raises_bk
from joint_graphs import run_until
from oracle import clipped_sum, compiled_grads
from torch import nn

import bkcompile

aten = torch.ops.aten
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default)


class Deep(nn.Module):
    """Four linear layers on (B, T, d) tokens: one clipping group per layer under layer-wise clipping."""

    def __init__(self, d: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, classes)
        )

    def forward(self, x):
        return self.layers(x).sum(1)


MODELS = {"deep": (Deep, (5, 6)), "transformer-block": (zoo.PreNormBlock, (4, 8)), "conv": (zoo.ConvNet, (3, 8, 8))}


def _groups(model: nn.Module, style: str, radius: float) -> list[tuple[list[str], float]]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if style != "groups":
        return expected_groups(names, style, radius)
    half = len(names) // 2  # two groups with thresholds of their own
    return [(names[:half], radius / 2), (names[half:], radius)]


def _option(groups, style: str):
    if style != "groups":
        return style
    return [{"params": tuple(names), "max_grad_norm": radius} for names, radius in groups]


def _check(model_name: str, style: str, strategy: str, compiler: str, dtype: torch.dtype, **compile_kwargs) -> None:
    make, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = make().to(dtype)
    x, y = torch.randn(7, *shape, dtype=dtype), torch.randint(0, 3, (7,))
    _, norms = clipped_sum(model, F.cross_entropy, (x,), (y,), max_grad_norm=float("inf"))
    radius = norms.median().item()
    groups = _groups(model, style, radius)
    want, _ = clipped_sum(model, F.cross_entropy, (x,), (y,), groups=groups)
    options = {
        "max_grad_norm": radius,
        "compiler": compiler,
        "clipping": _option(groups, style),
        "strategy": strategy,
        "loss_reduction": "mean",
    }
    got, _ = compiled_grads(model, (x,), F.cross_entropy, (y,), options, **compile_kwargs)
    assert_matches(got, want, dtype, tol=1e-4 if compiler == "inductor" else None)


@pytest.mark.parametrize("strategy", ["explicit", "ghost", "auto"])
@pytest.mark.parametrize("style", ["layer-wise", "param-wise", "groups", "all-layer"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_clipping_by_groups_matches_the_oracle(model_name: str, style: str, strategy: str) -> None:
    _check(model_name, style, strategy, "aot_eager", torch.float64)


@pytest.mark.slow
def test_layer_wise_explicit_with_inductor_and_a_dynamic_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")  # Inductor's strict checks, on as in a user's CI
    torch._dynamo.reset()
    _check("transformer-block", "layer-wise", "explicit", "inductor", torch.float32, dynamic=True)


# --- what the graph holds -----------------------------------------------------------------------------------


def _deep_loss(*args):
    *params, x = args
    h = x
    for i in range(0, len(params), 2):
        h = F.linear(h, params[i], params[i + 1]).tanh()
    return h.sum((1, 2)).mean()


def _deep_params() -> dict[str, torch.Tensor]:
    widths = [6, 8, 8, 8, 3]
    params = {}
    for i, (d, p) in enumerate(zip(widths, widths[1:], strict=False)):
        params[f"l{i}.weight"] = torch.randn(p, d, dtype=torch.float64, requires_grad=True)
        params[f"l{i}.bias"] = torch.randn(p, dtype=torch.float64, requires_grad=True)
    return params


def _per_sample_live_ranges(graph: torch.fx.Graph, batch: int) -> list[tuple[int, int]]:
    """(first, last) positions of each per-sample gradient's storage: a (B, n) value squared for a norm, followed
    back through views to the node that wrote it, alive until the last read of it or of any view of it."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    ranges = []
    for node in graph.find_nodes(op="call_function", target=aten.mul.Tensor):
        if node.args[0] is not node.args[1] or node.meta["val"].shape[0] != batch or node.meta["val"].dim() != 2:
            continue
        root = node.args[0]
        while root.target in VIEWS:
            root = root.args[0]
        aliases, stack = {root}, [root]
        while stack:
            for user in stack.pop().users:
                if user.target in VIEWS and user not in aliases:
                    aliases.add(user)
                    stack.append(user)
        ranges.append((position[root], max(position[u] for a in aliases for u in a.users)))
    return sorted(ranges)


@pytest.mark.parametrize("style, groups", [("layer-wise", 4), ("param-wise", 8), ("all-layer", 1)])
def test_no_per_sample_gradients_are_held_across_groups(style: str, groups: int) -> None:
    """Under layer-wise and param-wise clipping each group's per-sample gradients are read for the last time (the
    weighted sum) before the next group's are written; all-layer clipping holds them all until the clip."""
    params = _deep_params()
    x = torch.randn(6, 5, 6, dtype=torch.float64)
    state = run_until("clipping", _deep_loss, params, x, clipping=style, strategy="explicit")
    assert len(state.grouping.groups) == groups
    ranges = _per_sample_live_ranges(state.joint.gm.graph, 6)
    assert len(ranges) == 8  # a weight and a bias per layer
    overlapping = sum(1 for (_, end), (start, _) in zip(ranges, ranges[1:], strict=False) if start < end)
    layer_pairs = 4  # a layer's weight and bias are formed together
    assert overlapping == {"layer-wise": layer_pairs, "param-wise": 0, "all-layer": 7}[style]


# --- the cost model with several groups ---------------------------------------------------------------------


class Tokens(nn.Module):
    """Two linear layers over T tokens of width 64: p = d = 64 each."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.fc2(self.fc1(x).tanh()).sum(1)


FAST = {"compiler": "aot_eager"}
STATIC = {"compiler": "aot_eager", "dynamic_batch": False}


def _strategies(report) -> dict[str, tuple[str, str]]:
    return {row.param: (row.strategy, row.reason) for row in report.rows if row.param.endswith("weight")}


def test_auto_with_several_groups_bounds_the_largest_group() -> None:
    """At T = 32 explicit is the faster (at the pinned rates), and holds a weight's 8 x 64 x 64 float32 per-sample
    gradients (131 kB) against the ghost Grams' 2 x 8 x 32^2 (65.5 kB); a budget of 210 kB holds one layer's
    per-sample gradients and the other's Grams at once (all-layer clipping), and one group's at a time (layer-wise,
    param-wise)."""
    x = torch.randn(8, 32, 64)
    options = {"memory_budget": 210_000, **STATIC}
    assert sorted(_strategies(bkcompile.explain(Tokens(), x, **options)).values()) == [
        ("explicit", "faster"),
        ("ghost", "memory_budget"),
    ]
    for style in ("layer-wise", "param-wise"):
        report = bkcompile.explain(Tokens(), x, clipping=style, **options)
        assert set(_strategies(report).values()) == {("explicit", "faster")}
        assert report.held_bytes == 8 * 64 * 64 * 4 + (8 * 64 * 4 if style == "layer-wise" else 0)
    # the default budget, a quarter of the non-private peak (49 kB), holds neither: the leaner, ghost
    report = bkcompile.explain(Tokens(), x, clipping="layer-wise", **STATIC)
    assert set(_strategies(report).values()) == {("ghost", "memory_budget")}


def test_memory_budget_with_several_groups_bounds_the_largest_group() -> None:
    """A weight's per-sample gradients are 8 x 64 x 64 float32 (131 kB), a bias's 8 x 64 (2 kB), the ghost Grams
    2 x 8 x 32^2 (65.5 kB): a 160 kB budget holds one layer's per-sample gradients, not one and the other's Grams."""
    x = torch.randn(8, 32, 64)
    options = {"strategy": "fastest", "memory_budget": 160_000, **STATIC}
    assert set(_strategies(bkcompile.explain(Tokens(), x, clipping="layer-wise", **options)).values()) == {
        ("explicit", "faster")
    }
    assert set(_strategies(bkcompile.explain(Tokens(), x, **options)).values()) == {("ghost", "memory_budget")}


def test_memory_budget_under_a_dynamic_batch_is_evaluated_at_the_expected_batch_size() -> None:
    x = torch.randn(8, 32, 64)
    with raises_bk(bkcompile.OptionError, "expected_batch_size"):
        bkcompile.explain(Tokens(), x, memory_budget=210_000, **FAST)
    # at E = 8 as at the static batch of 8: one layer's per-sample gradients and the other's Grams fit, not two
    # layers' per-sample gradients; at E = 1 they would
    report = bkcompile.explain(Tokens(), x, memory_budget=210_000, expected_batch_size=8, **FAST)
    assert sorted(_strategies(report).values()) == [("explicit", "faster"), ("ghost", "memory_budget")]
