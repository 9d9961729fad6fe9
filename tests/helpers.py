"""Shared test helpers: the oracle comparison and unwrapping of dynamo's backend error."""

from __future__ import annotations

import contextlib

import pytest
import torch

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_matches(got: dict, want: dict, dtype: torch.dtype, tol: float | None = None) -> None:
    assert set(got) == set(want), (set(got), set(want))
    for name, ref in want.items():
        scale = ref.abs().max().clamp(min=1e-30)
        err = ((got[name] - ref).abs().max() / scale).item()
        tol = tol or TOL[dtype]
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"


@contextlib.contextmanager
def raises_bk(error_type: type, *fragments: str):
    """The bk_dp backend raised ``error_type`` (dynamo wraps it in BackendCompilerFailed) with ``fragments``."""
    with pytest.raises(Exception) as info:
        yield info
    error = info.value
    while not isinstance(error, error_type) and getattr(error, "inner_exception", None) is not None:
        error = error.inner_exception
    assert isinstance(error, error_type), (
        f"expected {error_type.__name__}, got {type(info.value).__name__}: {info.value}"
    )
    for fragment in fragments:
        assert fragment in str(error), f"{fragment!r} not in: {error}"
