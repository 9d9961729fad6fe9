"""The cost model and strategies: every strategy equals the oracle on every site kind, the choice flips where
the cost model says, a memory budget flips it back, and the report carries the expected expressions."""

from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
import sys

import pytest
import sympy
import torch
import zoo
from helpers import assert_matches, raises_bk
from test_oracle import CASES, run_case
from torch import nn

import bkcompile

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = {"compiler": "aot_eager"}  # explain's batch is dynamic, as training's
STATIC = {"compiler": "aot_eager", "dynamic_batch": False}  # costs at the example's sizes
# site kinds: matmul + sum (mlp), bmm (einsum), embedding (text), conv (convnet, 1-d and 3-d), mv (a vector
# parameter), several sites (tied)
KIND_CASES = [
    "mlp",
    "raw-params-einsum",
    "vector-parameter-mv",
    "embedding-padding-mha-masks",
    "convnet-depthwise-transposed",
    "conv1d-instancenorm-conv3d",
    "tied-embeddings-sdpa-lm",
]


def _check_strategy(name: str, strategy: str, dtype: torch.dtype, compiler: str) -> None:
    case = CASES[name]
    got, want, *_ = run_case(
        dataclasses.replace(case, options={**case.options, "strategy": strategy}), 7, dtype, compiler
    )
    assert_matches(got, want, dtype)


@pytest.mark.parametrize("strategy", ["ghost", "explicit", "auto", "fastest"])
@pytest.mark.parametrize("name", KIND_CASES)
def test_every_strategy_matches_the_oracle(name: str, strategy: str) -> None:
    _check_strategy(name, strategy, torch.float64, "aot_eager")
    chosen = {row.strategy for row in bkcompile.last_report().rows}
    if strategy in ("ghost", "explicit"):
        assert strategy in chosen and chosen <= {strategy, "direct", "explicit"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "strategy"),
    [
        ("convnet-depthwise-transposed", "ghost"),
        ("tied-embeddings-sdpa-lm", "explicit"),
        ("embedding-padding-mha-masks", "auto"),
    ],
)
def test_strategies_with_inductor(name: str, strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")  # Inductor's strict checks, on as in a user's CI
    _check_strategy(name, strategy, torch.float32, "inductor")


class Tokens(nn.Module):
    """One linear layer over T tokens of width 64: p = d = 64."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(x).sum(1)


def _row(report: bkcompile.CostReport, param: str) -> bkcompile.compiler.report.SiteRow:
    return next(row for row in report.rows if row.param == param)


# explain's dynamic batch: the costs count B = 1. At the pinned rates (helpers.PINNED_RATES) ghost's Grams take
# longer than explicit's per-sample products and passes from T = 24 on (test_time_model.py has the formulas); "auto"
# keeps the faster where it fits the default budget (a quarter of the non-private peak, 11.2 kB at T = 45), else
# the leaner: ghost holds 2T^2 values per sample, explicit pd = 4096, so ghost is the leaner up to T = 45
@pytest.mark.parametrize(
    ("tokens", "strategy", "reason"),
    [
        (1, "ghost", "faster"),
        (16, "ghost", "faster"),
        (45, "ghost", "memory_budget"),
        (46, "explicit", "faster"),
        (64, "explicit", "faster"),
    ],
)
def test_auto_choice_is_the_faster_within_the_budget(tokens: int, strategy: str, reason: str) -> None:
    row = _row(bkcompile.explain(Tokens(), torch.randn(8, tokens, 64), **FAST), "fc.weight")
    assert (row.strategy, row.reason) == (strategy, reason)


# "fastest": the faster by the predicted time, without a memory limit: ghost up to T = 23 at B = 1
@pytest.mark.parametrize(
    ("tokens", "strategy"),
    [(1, "ghost"), (4, "ghost"), (16, "ghost"), (23, "ghost"), (24, "explicit"), (64, "explicit")],
)
def test_fastest_choice_flips_with_sequence_length(tokens: int, strategy: str) -> None:
    report = bkcompile.explain(Tokens(), torch.randn(8, tokens, 64), strategy="fastest", **FAST)
    assert _row(report, "fc.weight").strategy == strategy


def test_memory_budget_flips_the_fastest_choice_back() -> None:
    x = torch.randn(8, 32, 64)
    assert _row(bkcompile.explain(Tokens(), x, strategy="fastest", **STATIC), "fc.weight").strategy == "explicit"
    # explicit holds 8 * 64 * 64 float32 per-sample gradients (131 kB); the ghost Grams 2 * 8 * 32^2 (65.5 kB)
    report = bkcompile.explain(Tokens(), x, strategy="fastest", memory_budget=80_000, **STATIC)
    row = _row(report, "fc.weight")
    assert (row.strategy, row.reason) == ("ghost", "memory_budget")
    assert report.total_bytes <= 80_000


def test_memory_budget_that_nothing_meets_warns() -> None:
    with pytest.warns(UserWarning, match="over memory_budget=10"):
        bkcompile.explain(Tokens(), torch.randn(8, 16, 64), strategy="fastest", memory_budget=10, **STATIC)


def _same(text: str, expected: sympy.Expr) -> bool:
    return sympy.simplify(sympy.sympify(text, locals={s.name: s for s in expected.free_symbols}) - expected) == 0


def test_report_expressions_for_a_linear_and_a_conv_site() -> None:
    B, T, p, d, G = sympy.symbols("B T p d G", positive=True, integer=True)
    linear = _row(bkcompile.explain(Tokens(), torch.randn(8, 5, 64), **STATIC), "fc.weight")
    assert linear.sizes == {"B": "8", "T": "5", "p": "64", "d": "64"}
    assert _same(linear.ghost_time, B * (2 * T**2 * (p + d) + T**2))
    assert _same(linear.ghost_memory, 4 * 2 * B * T**2)  # float32 bytes
    assert _same(linear.explicit_time, 3 * B * p * d) and _same(linear.explicit_memory, 4 * B * p * d)
    assert linear.ghost_values == (8 * (2 * 25 * 128 + 25), 4 * 2 * 8 * 25)

    conv = _row(bkcompile.explain(zoo.ConvNet(), torch.randn(4, 3, 8, 8), **STATIC), "depthwise.weight")
    assert conv.sizes == {"B": "4", "T": "16", "G": "8", "p": "1", "d": "9"}  # 4x4 outputs, 8 groups of 1x(1*3*3)
    assert _same(conv.ghost_time, G * B * (2 * T**2 * (p + d) + T**2))
    assert _same(conv.explicit_memory, 4 * G * B * p * d)
    assert conv.explicit_values == (3 * 8 * 4 * 9, 4 * 8 * 4 * 9)


def test_report_counts_the_padded_gram() -> None:
    B, T, p, d, G = sympy.symbols("B T p d G", positive=True, integer=True)
    report = bkcompile.explain(zoo.ConvGeometries(), torch.randn(4, 3, 8, 8), strategy="ghost", **STATIC)
    padded = next(row for row in report.rows if row.param == "padded.weight")  # 8x8 outputs, 10x10 padded input
    assert padded.sizes == {"B": "4", "T": "64", "G": "1", "p": "4", "d": "27"}
    assert _same(padded.ghost_time, G * B * (2 * T**2 * p + 2 * 100**2 * d / 9 + 9 * T**2 + T**2))
    strided = next(row for row in report.rows if row.param == "strided.weight")
    assert _same(strided.ghost_time, G * B * (2 * T**2 * (p + d) + T**2))


def test_report_as_text_markdown_dict_and_on_compile(capsys: pytest.CaptureFixture) -> None:
    report = bkcompile.explain(zoo.MLP(), torch.randn(8, 6), **FAST)
    text, markdown, data = str(report), report.to_markdown(), report.to_dict()
    assert "net.0.weight" in text and "| net.0.weight | matmul |" in markdown
    assert data["rows"][0]["param"] == "net.0.weight" and data["overhead"] == report.overhead > 0
    compiled = torch.compile(
        zoo.MLP(),
        backend="bk_dp",
        options={"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "mean", "report": True},
    )
    compiled(torch.randn(8, 6))
    assert "bk_dp cost model: 6 sites, B = 8" in capsys.readouterr().out


def test_dynamic_batch_report_keeps_b_symbolic() -> None:
    options = {"max_grad_norm": 1.0, "compiler": "aot_eager", "loss_reduction": "mean"}
    compiled = torch.compile(zoo.MLP(), backend="bk_dp", options=options)
    x = torch.randn(8, 6)
    bkcompile.mark_batch_dynamic(x)
    compiled(x)
    report = bkcompile.last_report()
    assert report.batch_dynamic and report.batch != "8" and "dynamic" in str(report)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"strategy": "fast"}, "strategy"),
        ({"memory_budget": -1}, "memory_budget"),
        ({"memory_budget": 10**6, "strategy": "explicit"}, "strategy 'auto' or 'fastest'"),
        ({"report": "yes"}, "report"),
    ],
)
def test_bad_cost_options_are_refused(options: dict, fragment: str) -> None:
    with raises_bk(bkcompile.OptionError, fragment):
        bkcompile.explain(zoo.MLP(), torch.randn(8, 6), **options)


@pytest.mark.slow  # a fresh interpreter
def test_command_line_prints_the_table() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bkcompile",
            "explain",
            "examples/models.py:small_cnn",
            "--input-shape",
            "4,3,16,16",
            "--option",
            "strategy='explicit'",
            "--compiler",
            "aot_eager",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^bk_dp cost model: 10 sites, B = u\d+ \(dynamic: the costs count B = 1", done.stdout, re.M)
    assert "0.weight   conv" in done.stdout and "explicit (strategy='explicit')" in done.stdout


@pytest.mark.parametrize(
    "conv, weight, groups, stride, flops",
    [
        # the weight's gradient alone (the data needs none): 2 * output elements * (C_in / groups * k^2)
        (torch.nn.functional.conv2d, (8, 3, 3, 3), 2, 2, 2 * (4 * 8 * 4 * 4) * (3 * 9)),
        # transposed: 2 * input elements * (C_out / groups * k^2)
        (torch.nn.functional.conv_transpose2d, (6, 5, 3, 3), 1, 2, 2 * (4 * 6 * 9 * 9) * (5 * 9)),
    ],
    ids=["grouped-strided", "transposed"],
)
def test_backward_flops_count_each_convolution_gradient_as_its_forward(conv, weight, groups, stride, flops) -> None:
    from bkcompile.passes.batch_axis import backward_nodes
    from bkcompile.passes.cost import backward_flops, compiled_sizes
    from joint_graphs import capture

    def fn(w, x):
        return conv(x, w, stride=stride, groups=groups).sum()

    channels = weight[0] if conv is torch.nn.functional.conv_transpose2d else weight[1] * groups
    joint, fake_mode = capture(fn, {"w": torch.randn(weight, requires_grad=True)}, torch.randn(4, channels, 9, 9))
    assert backward_flops(joint, backward_nodes(joint), compiled_sizes(fake_mode)) == flops


def test_cost_expressions_evaluate_at_the_compiled_sizes() -> None:
    """A site's sizes are expressions of the graph's shape symbols: each expression is evaluated with the compiled
    sizes put in, through torch's integer functions too, and a symbol with no compiled size (an unbacked batch)
    counts as 1."""
    from bkcompile.passes.cost import evaluate, evaluate_all
    from torch.utils._sympy.functions import FloorDiv

    B, T, p, d = sympy.symbols("B T p d", positive=True, integer=True)
    s0, s1 = sympy.symbols("s0 s1", positive=True, integer=True)
    sizes = {B: s0, T: 2 * s1, p: 64, d: 32}
    compiled = {s0: 8}  # s1 has none
    exprs = [B * T * p, T**2 * (p + d), sympy.Max(B, 3), FloorDiv(B * T, 3), sympy.Integer(7)]
    assert evaluate_all(exprs, sizes, compiled) == [1024.0, 384.0, 8.0, 5.0, 7.0]
    assert evaluate(s0 * s1, {}, {s0: 8, s1: 3}) == 24.0
