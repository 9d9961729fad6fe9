"""Shared test helpers: the oracle comparison, the default-path check and unwrapping of dynamo's backend error."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from oracle import clipped_sum
from torch._dynamo.utils import counters

import bkcompile
from bkcompile.errors import find_error

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# The kernel rates every test compiles with (conftest pins them in a calibration file of its own), so that the cost
# model's choices do not depend on the machine: about this project's 2-core CPU's. No grid of small products by shape:
# they all run at ``bmm`` (test_time_model pins a grid where it tests one).
PINNED_RATES = bkcompile.compiler.calibration.Rates(mm=1e10, bmm=4e9, bandwidth=5e9, source="pinned by the tests")


def pin_rates(rates=PINNED_RATES) -> None:
    """Store ``rates`` for the CPU (and CUDA, where there is one) in float32 and float64 in the calibration file."""
    devices = [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])
    for device in devices:
        for dtype in (torch.float32, torch.float64):
            bkcompile.compiler.calibration.save(bkcompile.compiler.calibration.key(device, dtype), rates)


def assert_matches(got: dict, want: dict, dtype: torch.dtype, tol: float | None = None) -> None:
    assert set(got) == set(want), (set(got), set(want))
    for name, ref in want.items():
        scale = ref.abs().max().clamp(min=1e-30)
        err = ((got[name] - ref).abs().max() / scale).item()
        tol = tol or TOL[dtype]
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


def assert_matches_model(got: dict, want: dict, dtype: torch.dtype, tol: float | None = None) -> None:
    """assert_matches, except for an attention key's bias, whose gradient is zero in exact arithmetic (softmax is
    invariant to shifting a row of scores): its oracle value is rounding noise, so its error is measured against
    the largest gradient of the model instead of against itself."""
    assert set(got) == set(want), (set(got), set(want))
    top = max(ref.abs().max().item() for ref in want.values())
    tol = tol or TOL[dtype]
    zero = {k for k in want if k.endswith(("key.bias", "k_proj.bias"))}  # transformers 4.x and 5.x names
    for name in zero:
        err = (got[name] - want[name]).abs().max().item() / top
        assert err <= tol, f"{name} (zero in exact arithmetic): error {err:.3g} of the largest gradient"
    assert_matches({k: got[k] for k in got if k not in zero}, {k: want[k] for k in want if k not in zero}, dtype, tol)


def check_default_path(
    model: torch.nn.Module, make_batch, loss, sizes=(5, 3), oracle=clipped_sum, tol: float = 1e-4, options=None
) -> None:
    """The default path: bk_dp with its default compiler (Inductor), float32, the batch marked dynamic as the
    PoissonLoader marks it (``bkcompile.mark_batch_dynamic``). One compile serves each batch size of ``sizes``
    (``make_batch(size) -> (inputs, targets)``); each step's per-sample norms and clipped sum equal the oracle's
    to ``tol``, R = the median per-sample norm of the first batch; ``options`` are bk_dp's others."""
    model = model.float()
    batches = [make_batch(size) for size in sizes]
    _, norms = oracle(model, loss, *batches[0], max_grad_norm=float("inf"))
    radius = norms.quantile(0.5).item()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="bk_dp", options={"max_grad_norm": radius, **(options or {})})
    counters.clear()
    for inputs, targets in batches:
        want, norms = oracle(model, loss, inputs, targets, max_grad_norm=radius)
        bkcompile.mark_batch_dynamic(*inputs)
        twin.zero_grad(set_to_none=True)
        loss(compiled(*inputs), *targets).backward()
        torch.testing.assert_close(bkcompile.last_per_sample_norms(compiled), norms, rtol=tol, atol=0)
        got = {k: p.grad for k, p in twin.named_parameters() if p.requires_grad}
        assert_matches_model(got, want, torch.float32, tol)
    assert counters["stats"]["unique_graphs"] == 1, "a new batch size recompiled"


@contextlib.contextmanager
def raises_bk(error_type: type, *fragments: str):
    """The bk_dp backend raised ``error_type`` (dynamo wraps it in BackendCompilerFailed) with ``fragments``."""
    with pytest.raises(Exception) as info:
        yield info
    error = find_error(info.value, error_type)
    assert error is not None, f"expected {error_type.__name__}, got {type(info.value).__name__}: {info.value}"
    for fragment in fragments:
        assert fragment in str(error), f"{fragment!r} not in: {error}"


def _layer(name: str) -> str:
    return name.rpartition(".")[0] or "<root>"


def expected_groups(names: list[str], style: str, radius: float) -> list[tuple[list[str], float]]:
    """The groups of a built-in clipping style, built here independently of the pass: (names, threshold)."""
    if style == "all-layer":
        return [(names, radius)]
    if style == "param-wise":
        return [([n], radius / math.sqrt(len(names))) for n in names]
    if style == "layer-wise":
        layers = list(dict.fromkeys(_layer(n) for n in names))
        return [([n for n in names if _layer(n) == layer], radius / math.sqrt(len(layers))) for layer in layers]
    raise ValueError(f"not a built-in clipping style: {style!r}")
