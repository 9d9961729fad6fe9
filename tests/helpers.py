"""Shared test helpers: the oracle comparison and unwrapping of dynamo's backend error."""

from __future__ import annotations

import contextlib
import math

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
    error = backend_error(info.value, error_type)
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


def backend_error(error: BaseException, error_type: type) -> BaseException | None:
    """The ``error_type`` inside what dynamo raised (BackendCompilerFailed wraps the backend's error), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, error_type):
            return error
        seen.add(id(error))
        error = getattr(error, "inner_exception", None) or error.__cause__ or error.__context__
    return None
