"""The time model: kernel rates calibrated once per machine and device and cached, each site's predicted seconds
from them, "auto" picking the faster strategy within the memory budget, the mix of strategies of all-layer clipping
against the oracle, and the report's lines for them. Every test but the calibration's runs with the rates the
conftest pins (``helpers.PINNED_RATES``)."""

from __future__ import annotations

import dataclasses
import json
import time
from types import SimpleNamespace

import helpers
import pytest
import torch
import zoo
from bkcompile.passes import cost
from helpers import PINNED_RATES, assert_matches, raises_bk
from oracle import clipped_sum, compiled_grads
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import bkcompile
from bkcompile.__main__ import main
from bkcompile.compiler import calibration

FAST = {"compiler": "aot_eager"}
STATIC = {"compiler": "aot_eager", "dynamic_batch": False}  # costs at the example's batch size


class Tokens(nn.Module):
    """Linear layers over T tokens (no bias: one site each), widths ``widths``."""

    def __init__(self, *widths: int) -> None:
        super().__init__()
        widths = widths or (64, 64)
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(widths, widths[1:], strict=False))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x).tanh()
        return x.sum(1)


def _strategies(report: bkcompile.CostReport) -> dict[str, tuple[str, str]]:
    return {row.param: (row.strategy, row.reason) for row in report.rows}


# --- the calibration ---------------------------------------------------------------------------------------------


def test_calibration_is_measured_once_cached_and_measured_again_on_request(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("BKCOMPILE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert calibration.cache_path() == tmp_path / "xdg" / "bkcompile" / "calibration.json"
    monkeypatch.setenv("BKCOMPILE_CACHE_DIR", str(tmp_path))
    assert calibration.cache_path() == tmp_path / "calibration.json" and calibration.load() == {}
    key = calibration.key(torch.device("cpu"), torch.float32)
    assert key.startswith("cpu ") and key.endswith(f" | torch {torch.__version__} | float32")

    report = bkcompile.explain(nn.Linear(4, 2), torch.randn(6, 4), **FAST)  # the first compile measures them
    (stored,) = calibration.load().values()
    assert list(calibration.load()) == [key] and stored.source.startswith("measured ")
    assert min(stored.mm, stored.bmm, stored.bandwidth) > 0 and stored.version == calibration.VERSION
    inners, sides, *_ = calibration.GRID["cpu"]
    assert [(k, s) for k, s, _ in stored.small] == [(k, s) for k in inners for s in sides]
    assert min(rate for _, _, rate in stored.small) > 0 and stored.fresh > 0
    assert report.rates == {
        "mm": stored.mm,
        "bmm": stored.bmm,
        "bandwidth": stored.bandwidth,
        "source": stored.source,
        "small": [list(point) for point in stored.small],
        "fresh": stored.fresh,
    }
    assert bkcompile.explain(nn.Linear(4, 3), torch.randn(6, 4), **FAST).rates == report.rates  # read, not measured

    old = {**dataclasses.asdict(stored), "version": calibration.VERSION - 1}  # measured before the grid existed
    (tmp_path / "calibration.json").write_text(json.dumps({key: old}))
    assert calibration.load() == {}  # measured again
    calibration.save(key, PINNED_RATES)  # pinned rates are used from then on
    assert bkcompile.explain(nn.Linear(4, 2), torch.randn(6, 4), **FAST).rates["source"] == "pinned by the tests"

    assert main(["calibrate", "--device", "cpu", "--dtype", "float32"]) == 0  # measured again on request
    out = capsys.readouterr().out
    assert out.startswith(f"{key}: mm ") and f"stored in {tmp_path / 'calibration.json'}" in out
    again = calibration.load()[key]
    assert again.source.startswith("measured ") and again != PINNED_RATES
    assert bkcompile.explain(nn.Linear(4, 2), torch.randn(6, 4), **FAST).rates["mm"] == again.mm


# --- the predicted time and the choice ----------------------------------------------------------------------------


def _linear_seconds(batch: int, tokens: int, p: int, d: int) -> tuple[float, float]:
    """(ghost, explicit) seconds of a float32 linear site at the pinned rates, by the kernels of
    ``site_kinds/matmul.py``: each the longer of its FLOPs at its rate and its bytes at the bandwidth."""
    rates, size = PINNED_RATES, 4

    def bmm(flops, values):
        return max(flops / rates.bmm, values * size / rates.bandwidth)

    def elementwise(values):
        return values * size / rates.bandwidth

    b, t = batch, tokens
    ghost = (
        bmm(2 * b * t * t * p, b * (t * p + t * t))
        + bmm(2 * b * t * t * d, b * (t * d + t * t))
        + elementwise(2 * b * t * t)
        + elementwise(2 * b * t * min(p, d))
    )
    replaced = max(2 * b * t * p * d / rates.mm, (b * t * p + b * t * d + p * d) * size / rates.bandwidth)
    explicit = (
        bmm(2 * b * t * p * d, b * (t * p + t * d + p * d))
        - replaced
        + elementwise(b * p * d)
        + elementwise(b * p * d + p * d)
    )
    return ghost, explicit


def test_predicted_seconds_of_a_linear_site_at_the_pinned_rates() -> None:
    report = bkcompile.explain(Tokens(64, 32), torch.randn(8, 5, 64), strategy="fastest", **STATIC)
    (row,) = report.rows
    assert row.sizes == {"B": "8", "T": "5", "p": "32", "d": "64"}
    ghost, explicit = _linear_seconds(8, 5, 32, 64)
    assert row.ghost_seconds == pytest.approx(ghost, rel=1e-12)
    assert row.explicit_seconds == pytest.approx(explicit, rel=1e-12)
    assert report.predicted_s == pytest.approx(ghost, rel=1e-12)  # the faster, chosen
    # a non-private step: the backward's product (the weight's gradient, 2 B T p d) and the forward's, half as many,
    # and its other kernels' outputs written and read once: tanh (B T p), the sum over tokens (B p), tanh's backward
    products = 1.5 * (2 * 8 * 5 * 64 * 32) / PINNED_RATES.mm
    elementwise = 2 * 4 * (8 * 5 * 32 + 8 * 32 + 8 * 5 * 32) / PINNED_RATES.bandwidth
    assert report.non_private_predicted_s == pytest.approx(products + elementwise, rel=1e-12)
    assert report.overhead == pytest.approx(ghost / report.non_private_predicted_s)


# at the pinned rates, p = d = 64, B = 8: ghost's Grams (2BT^2(p + d) FLOPs at the small-product rate) against
# explicit's per-sample products at that rate in place of one large product, and two passes over B p d values
@pytest.mark.parametrize(
    ("tokens", "strategy"), [(1, "ghost"), (8, "ghost"), (21, "ghost"), (23, "explicit"), (64, "explicit")]
)
def test_fastest_picks_the_faster_by_predicted_time(tokens: int, strategy: str) -> None:
    ghost, explicit = _linear_seconds(8, tokens, 64, 64)
    assert (ghost < explicit) == (strategy == "ghost")
    report = bkcompile.explain(Tokens(), torch.randn(8, tokens, 64), strategy="fastest", **STATIC)
    assert _strategies(report) == {"layers.0.weight": (strategy, "faster")}
    assert report.budget["bytes"] is None and "no limit" not in str(report)


def test_auto_keeps_the_faster_only_where_it_fits_the_budget() -> None:
    """At T = 64 explicit is the faster and holds 8 x 64 x 64 float32 per-sample gradients (131 kB), the ghost
    Grams 2 x 8 x 64^2 (262 kB): explicit is both faster and leaner. At T = 23 explicit is the faster, the ghost
    Grams hold 34 kB: the default budget (a quarter of the non-private peak, parameters, gradients and the kept
    activations) fits neither, and "auto" keeps the leaner; a budget of 140 kB fits explicit."""
    report = bkcompile.explain(Tokens(), torch.randn(8, 64, 64), **STATIC)
    assert _strategies(report) == {"layers.0.weight": ("explicit", "faster")}
    x = torch.randn(8, 23, 64)
    report = bkcompile.explain(Tokens(), x, **STATIC)
    peak = report.budget["non_private_peak"]
    assert report.budget["bytes"] == 0.25 * peak < 2 * 8 * 23**2 * 4
    assert _strategies(report) == {"layers.0.weight": ("ghost", "memory_budget")}
    assert report.held_bytes == 2 * 8 * 23**2 * 4
    report = bkcompile.explain(Tokens(), x, memory_budget=140_000, **STATIC)
    assert _strategies(report) == {"layers.0.weight": ("explicit", "faster")}
    assert report.held_bytes == 8 * 64 * 64 * 4 <= 140_000


@pytest.mark.parametrize("budget", ["1.25x", "2x", 100_000, 300_000])
@pytest.mark.parametrize(
    ("make", "shape"), [(lambda: Tokens(64, 48, 32, 16), (24, 64)), (zoo.ConvNet, (3, 8, 8))], ids=["tokens", "conv"]
)
def test_the_budget_is_respected(make, shape: tuple, budget) -> None:
    report = bkcompile.explain(make(), torch.randn(8, *shape), memory_budget=budget, **STATIC)
    leanest = min(mix["bytes"] for name, mix in report.mixes.items() if name != "best within the budget")
    if leanest <= report.budget["bytes"]:
        assert report.held_bytes <= report.budget["bytes"]
    if isinstance(budget, str):
        assert report.budget["bytes"] == pytest.approx((float(budget[:-1]) - 1) * report.budget["non_private_peak"])
    assert report.predicted_s == pytest.approx(report.mixes["best within the budget"]["seconds"])


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"memory_budget": "0.5x"}, "r >= 1"),
        ({"memory_budget": "fast"}, "'<r>x'"),
        ({"memory_budget": "1.25"}, "'<r>x'"),
        ({"memory_budget": 1.5}, "non-negative int"),
        ({"memory_budget": True}, "non-negative int"),
        ({"memory_budget": "nanx"}, "'<r>x'"),
        ({"memory_budget": "1.25x", "strategy": "ghost"}, "strategy 'auto' or 'fastest'"),
    ],
)
def test_bad_budgets_are_refused(options: dict, fragment: str) -> None:
    with raises_bk(bkcompile.OptionError, fragment):
        bkcompile.explain(zoo.MLP(), torch.randn(8, 6), **options)


# --- the mix of all-layer clipping --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "shape"),
    [(lambda: Tokens(64, 48, 32, 16), (24, 64)), (zoo.PreNormBlock, (6, 8))],
    ids=["tokens", "transformer-block"],
)
def test_the_mix_within_a_budget_matches_the_oracle(make, shape: tuple) -> None:
    """A budget halfway between the bytes of the leaner of all ghost and all explicit and those of the faster
    strategy everywhere: some parameters at their faster strategy (the most seconds saved per byte first), the
    others at their leaner, within the budget; the clipped gradients equal the oracle's."""
    torch.manual_seed(0)
    model = make().to(torch.float64)
    x = torch.randn(7, *shape, dtype=torch.float64)
    free = bkcompile.explain(model, x, strategy="fastest", **STATIC).mixes
    lean = min(free["all ghost"]["bytes"], free["all explicit"]["bytes"])
    budget = int((lean + free["best within the budget"]["bytes"]) / 2)
    options = {"max_grad_norm": 0.1, "compiler": "aot_eager", "loss_reduction": "sum", "memory_budget": budget}
    got, _ = compiled_grads(model, (x,), lambda out: out.sum(), (), options)
    report = bkcompile.last_report()
    chosen = {reason for strategy, reason in _strategies(report).values() if strategy != "direct"}
    assert {"faster", "memory_budget"} <= chosen  # a mix
    assert report.held_bytes <= budget < free["best within the budget"]["bytes"]
    assert report.predicted_s == pytest.approx(report.mixes["best within the budget"]["seconds"])
    want, _ = clipped_sum(model, lambda out: out.sum(), (x,), (), max_grad_norm=0.1)
    assert_matches(got, want, torch.float64)


# --- the report ---------------------------------------------------------------------------------------------------


def test_the_report_shows_the_predicted_time_the_budget_and_the_ceiling() -> None:
    """Two layers at T = 23, explicit the faster for both; each one's ghost Grams hold 33.9 kB, the per-sample
    gradients 98.3 kB (64 x 48) and 49.2 kB (48 x 32): a 90 kB budget holds the second's, the most seconds saved per
    byte, and the first's Grams."""
    report = bkcompile.explain(Tokens(64, 48, 32), torch.randn(8, 23, 64), memory_budget=90_000, **STATIC)
    assert _strategies(report) == {
        "layers.0.weight": ("ghost", "memory_budget"),
        "layers.1.weight": ("explicit", "faster"),
    }
    assert report.held_bytes == 2 * 8 * 23**2 * 4 + 8 * 48 * 32 * 4
    text = " ".join(str(report).split())  # wrapped lines joined
    assert "rates: mm 10 GFLOP/s, bmm 4 GFLOP/s, bandwidth 5 GB/s (pinned by the tests)" in text
    assert "memory budget: 90 kB, 90000 bytes (option memory_budget); non-private peak " in text
    assert f"the norm work holds {report.held_bytes / 1e3:.3g} kB" in text
    best, ghost, explicit = (report.mixes[k] for k in ("best within the budget", "all ghost", "all explicit"))
    assert ghost["fits"] and not explicit["fits"] and best["seconds"] < ghost["seconds"]
    assert best["seconds"] == pytest.approx(report.predicted_s)
    overhead = best["seconds"] / report.non_private_predicted_s
    assert report.ceiling == pytest.approx(overhead) and report.to_dict()["ceiling"] == report.ceiling
    joined = text.replace(". ", ".")  # a number wrapped after its dot
    assert f"ceiling for the budget: best within the budget {100 * overhead:.1f}% ({1 / (1 + overhead):.2f}x" in joined
    assert ", over the budget)" in text.split("all explicit")[1] and text.count("predicted overhead") == 1
    row = report.rows[0]
    assert f"{row.ghost_seconds * 1e6:.3g} us, " in text and "seconds, FLOPs, bytes" in report.to_markdown()


def test_small_products_run_at_the_rate_of_their_shape() -> None:
    """The grid's rates interpolated in the logarithms of inner, side and rate, the edges' outside the grid; a
    linear site's Grams (T x width)(width x T) and per-sample products (p x T)(T x d) at their own shapes."""
    grid = tuple((k, s, 1e7 * k * s) for k in (4, 64) for s in (16, 256))  # log rate = log k + log s + const
    rates = calibration.Rates(mm=1e10, bmm=4e9, bandwidth=5e9, source="a grid", small=grid)
    assert rates.small_rate(16, 4, 16) == pytest.approx(64e7) and rates.small_rate(8, 16, 32) == pytest.approx(256e7)
    assert rates.small_rate(1, 1, 1) == pytest.approx(64e7)  # the grid's edges outside it
    assert rates.small_rate(1000, 1000, 1000) == pytest.approx(64 * 256e7)
    assert calibration.Rates(1e10, 4e9, 5e9).small_rate(8, 16, 32) == 4e9  # no grid: bmm
    helpers.pin_rates(rates)
    try:
        (row,) = bkcompile.explain(Tokens(64, 32), torch.randn(8, 5, 64), strategy="fastest", **STATIC).rows
    finally:
        helpers.pin_rates()
    size, t, p, d, b = 4, 5, 32, 64, 8

    def small(rows, inner, columns, values):
        flops = 2 * b * rows * inner * columns
        return max(flops / rates.small_rate(rows, inner, columns), values * size / rates.bandwidth)

    ghost = (
        small(t, p, t, b * (t * p + t * t))
        + small(t, d, t, b * (t * d + t * t))
        + (2 * b * t * t + 2 * b * t * min(p, d)) * size / rates.bandwidth
    )
    replaced = max(2 * b * t * p * d / rates.mm, (b * t * p + b * t * d + p * d) * size / rates.bandwidth)
    explicit = small(p, t, d, b * (t * p + t * d + p * d)) - replaced + (2 * b * p * d + p * d) * size / rates.bandwidth
    assert row.ghost_seconds == pytest.approx(ghost, rel=1e-12)
    assert row.explicit_seconds == pytest.approx(explicit, rel=1e-12)


class ThreeHeads(nn.Module):
    """Three projections of one input (query, key and value), without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(64, 32, bias=False) for _ in range(3))

    def forward(self, x):
        return (self.q(x).tanh() + self.k(x).tanh() * self.v(x)).sum(1)


def test_projections_of_one_input_share_its_gram_matrix() -> None:
    """The input's Gram matrix runs once for the three sites (the graph's common-subexpression elimination): each
    site's ghost time counts a third of it."""
    report = bkcompile.explain(ThreeHeads(), torch.randn(8, 5, 64), strategy="ghost", **STATIC)
    ghost, _ = _linear_seconds(8, 5, 32, 64)
    gram = max(2 * 8 * 5 * 5 * 64 / PINNED_RATES.bmm, 8 * (5 * 64 + 5 * 5) * 4 / PINNED_RATES.bandwidth)
    assert [row.ghost_seconds for row in report.rows] == pytest.approx([ghost - 2 * gram / 3] * 3, rel=1e-12)
    assert report.predicted_s == pytest.approx(3 * ghost - 2 * gram, rel=1e-12)


def test_values_held_across_the_backward_are_written_to_new_memory() -> None:
    """All-layer clipping holds every per-sample gradient until the clip, in memory newly allocated each step:
    their bytes are written at the fresh rate too; layer-wise, each group's are freed before the next's."""
    x, model = torch.randn(8, 23, 64), Tokens(64, 48, 32)
    helpers.pin_rates(dataclasses.replace(PINNED_RATES, fresh=1e9))
    try:
        held = bkcompile.explain(model, x, strategy="explicit", **STATIC)
        grouped = bkcompile.explain(model, x, strategy="explicit", clipping="layer-wise", **STATIC)
    finally:
        helpers.pin_rates()
    pinned = bkcompile.explain(model, x, strategy="explicit", **STATIC)
    for row, by_group, at_pinned, (p, d) in zip(held.rows, grouped.rows, pinned.rows, [(48, 64), (32, 48)]):
        assert row.explicit_seconds == pytest.approx(at_pinned.explicit_seconds + 8 * p * d * 4 / 1e9, rel=1e-12)
        assert by_group.explicit_seconds == pytest.approx(at_pinned.explicit_seconds, rel=1e-12)
    assert "new memory written at 1 GB/s" in " ".join(str(held).split())


def test_the_non_private_step_s_attention_runs_at_the_small_products_rate() -> None:
    """A fused attention's forward: 2 L S (E + Ev) FLOPs per head, at the rate of a head's (L x E)(E x S)
    product; its output is the attention's (a getitem: no kernel of its own)."""
    batch, heads, rows, keys, width, out = 2, 3, 7, 5, 8, 4
    q, k, v = torch.randn(batch, heads, rows, width), torch.randn(batch, heads, keys, width), torch.randn(2, 3, 5, out)
    attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    gm = make_fx(lambda q, k, v: attention(q, k, v)[0], tracing_mode="fake")(q, k, v)
    grid = tuple((i, s, 1e7 * i * s) for i in (4, 64) for s in (4, 64))
    rates = calibration.Rates(mm=1e10, bmm=4e9, bandwidth=5e9, source="a grid", small=grid)
    flops = 2 * batch * heads * rows * keys * (width + out)
    assert cost.other_seconds(SimpleNamespace(gm=gm), {}, rates) == pytest.approx(
        flops / rates.small_rate(rows, width, keys), rel=1e-12
    )


def test_calibration_keeps_each_kernel_s_fastest_run_and_keys_a_cpu_by_its_threads() -> None:
    delays = iter([0.0, 0.2, 0.001, 0.2, 0.2, 0.2])  # the warm-up, then a busy machine but for one run
    seconds = calibration._fastest_seconds(lambda: time.sleep(next(delays)), torch.device("cpu"))
    assert 0.001 <= seconds < 0.1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = calibration.key(torch.device("cpu"), torch.float32)
        torch.set_num_threads(2)
        two = calibration.key(torch.device("cpu"), torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert ", 1 threads | " in one and ", 2 threads | " in two
