"""Smoke test of benchmarks/quickstart_vs_opacus.py: one seed, two epochs, each method (needs the bench extra)."""

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains the quick-start model twice

pytest.importorskip("opacus")
pytest.importorskip("sklearn")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quickstart_vs_opacus as bench  # noqa: E402


@pytest.mark.parametrize("run", [bench.run_bkcompile, bench.run_opacus], ids=["bkcompile", "opacus"])
def test_two_epochs_reach_an_accuracy_within_the_target_epsilon(run):
    result = run(seed=0, epochs=2)
    assert 0 <= result["accuracy"] <= 1
    assert result["epsilon"] <= bench.qs.EPSILON * 1.01
    assert 0 < result["make_private_s"] + result["first_epoch_s"] < result["seconds"]
