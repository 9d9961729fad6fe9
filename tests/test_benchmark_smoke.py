"""Smoke test of benchmarks/throughput.py: the tiny MLP, non-private aot_eager compile and bk_dp aot_eager, and the
CPU memory measures (the tensor peak against exact values, the probe against the gradients it must hold)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import throughput as bench  # noqa: E402

pytestmark = pytest.mark.slow  # the benchmark harness, its memory probe in subprocesses

METHODS = ["compile-aot_eager", "bk_dp-aot_eager"]


@pytest.fixture(scope="module")
def mlp_results():
    info, rows = bench.benchmark_model("mlp", METHODS, quick=True)
    bench.add_ratios(rows)
    return {"environment": bench.environment(), "workloads": {"mlp": info}, "rows": rows}


def test_every_method_trains_with_positive_throughput(mlp_results):
    rows = mlp_results["rows"]
    assert [row["method"] for row in rows] == METHODS
    for row in rows:
        assert "error" not in row, row["error"]
        assert row["samples_per_s"] > 0 and row["compile_s"] > 0
        assert len(row["rounds"]) == bench.QUICK_ROUNDS


def test_a_failing_method_is_a_row_of_the_report(mlp_results, tmp_path):
    failed = {"model": "mlp", "method": "opacus-ghost", "error": "failed: NotImplementedError: not here"}
    results = {**mlp_results, "rows": mlp_results["rows"] + [failed]}
    text = bench.write_results(results, tmp_path, "smoke")
    assert "| mlp | opacus-ghost | failed: NotImplementedError: not here |" in text
    assert json.loads((tmp_path / "smoke.json").read_text())["rows"][-1] == failed
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "smoke.png").stat().st_size > 0
    else:  # the bench extra is missing: the results are written all the same, without the plot
        assert not (tmp_path / "smoke.png").exists()


def test_cpu_tensor_peak_is_the_peak_of_live_tensors_in_a_steady_step():
    kept = {}

    def step() -> None:
        kept.pop("grad", None)  # as zero_grad(set_to_none=True): frees what the step before kept
        a = torch.ones(250_000)  # 1 MB
        b = torch.ones(500_000)  # 2 MB, while a is alive
        kept["grad"] = torch.ones(125_000)  # 0.5 MB, kept until the next step
        del a, b

    assert bench.cpu_tensor_peak(step) == 3_500_000


def test_memory_probe_counts_at_least_the_gradients():
    result = bench.probe_memory("mlp", "bk_dp-aot_eager", quick=True)
    gradient_bytes = 4 * sum(p.numel() for p in bench.workload("mlp", quick=True).build().parameters())
    assert result["peak_mb"] * bench.MB >= gradient_bytes and "rss_peak_mb" in result, (result, gradient_bytes)
