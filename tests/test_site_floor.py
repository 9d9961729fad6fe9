"""benchmarks/site_floor.py: the two strategies it times compute the same clipped-and-weighted sum as per-sample
gradients formed one sample at a time, and a model's table has a row per site of its report."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import site_floor  # noqa: E402


@pytest.mark.parametrize("p, d", [(3, 5), (5, 3)])  # either operand the narrower one
def test_ghost_and_explicit_compute_the_norm_weighted_sum_of_per_sample_products(p: int, d: int) -> None:
    torch.manual_seed(0)
    batch, rows = 4, 6
    g, a = torch.randn(batch * rows, p, dtype=torch.float64), torch.randn(batch * rows, d, dtype=torch.float64)
    w = torch.rand(batch, dtype=torch.float64)
    per_sample = [g[i * rows : (i + 1) * rows].t() @ a[i * rows : (i + 1) * rows] for i in range(batch)]
    expected = sum(w[i] * per_sample[i].pow(2).sum() * per_sample[i] for i in range(batch))
    torch.testing.assert_close(site_floor.ghost(g, a, w), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(site_floor.explicit(g, a, w).view(p, d), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(site_floor.ordinary(g, a), sum(per_sample), rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # explain and a non-private Inductor compile of the tiny MLP
def test_the_mlp_has_a_timed_row_per_linear_weight_whose_choice_columns_agree() -> None:
    rows, step_s, floor_s = site_floor.model_floor("mlp", "layer-wise", repeats=2, quick=True, compile_fns=False)
    weights = [row for row in rows if ".weight |" in row]
    assert len(weights) == 3 and all("not timed" not in row for row in weights)
    assert all("| not timed |" in row for row in rows if row not in weights)  # the biases: per-sample sums
    for row in weights:
        cells = [c.strip() for c in row.strip("|").split("|")]
        cheaper, auto, same = cells[6], cells[7], cells[8]
        assert cheaper in ("ghost", "explicit") and same == ("yes" if cheaper == auto else "no")
    assert step_s > 0
