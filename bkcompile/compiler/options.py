"""Options of the ``bk_dp`` backend: a frozen dataclass, validated by :func:`parse_options` (where the user gives
them: ``bkcompile.compile``, ``make_private``; and when the backend compiles a graph)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args

from bkcompile.errors import OptionError

LossReduction = Literal["auto", "mean", "sum"]
Compiler = Literal["inductor", "aot_eager"]
Strategy = Literal["auto", "fastest", "ghost", "explicit"]
ClipFn = Literal["abadi", "automatic"]  # the keys of bkcompile.policy.CLIP_FUNCTIONS
Graphs = Literal["auto", "several"]
Mode = Literal["default", "max-autotune-no-cudagraphs"]
ClippingStyle = Literal["all-layer", "layer-wise", "param-wise", "per-device"]  # the keys of bkcompile.policy.STYLES
CLIPPING_STYLES = get_args(ClippingStyle)
MODES = get_args(Mode)
# Inductor's other modes, and why bk_dp refuses them.
_REFUSED_MODES = {
    "reduce-overhead": "it turns on CUDA graphs (triton.cudagraphs), which bk_dp does not support yet",
    "max-autotune": "it turns on CUDA graphs (triton.cudagraphs), which bk_dp does not support yet",
    "lite": "it turns off Inductor's joint-graph passes, where bk_dp clips the per-sample gradients",
}
# Inductor config entries bk_dp sets itself, and why a user's value is refused.
_OWNED_INDUCTOR_KEYS = {
    "joint_custom_pre_pass": "bk_dp's privatizing pass runs there",
    "use_joint_graph_passes": "bk_dp's privatizing pass is one of them",
    "triton.cudagraphs": "bk_dp does not support CUDA graphs yet",
}


@dataclasses.dataclass(frozen=True)
class BKOptions:
    """What the user passes as ``torch.compile(..., backend="bk_dp", options={...})``.

    max_grad_norm: clipping threshold R of the per-sample gradient norm over all trainable
        parameters (required, > 0).
    loss_reduction: how the loss reduces over the batch: "mean" (of per-sample losses, like
        ``F.cross_entropy``'s default) or "sum"; required when the loss is computed outside the compiled
        model, which no graph sees (with "auto", the default, that is a ``LossReductionError``:
        ``passes/loss.py`` says why nothing the backward receives can tell a sum from a mean). "auto": a
        loss returned by the compiled function is recognised from its own reduction (an explicit value
        that disagrees is an error).
    compiler: the inner compiler of the forward and backward graphs ("inductor" or "aot_eager").
    batch_dim: the sample axis of every tensor input that is not a parameter or buffer.
    strategy: how per-sample norms are formed: "ghost" (norms without per-sample gradients, where the
        site has a ghost norm), "explicit" (per-sample gradients, reused for the clipped sum), "auto"
        (per parameter, the faster by the cost model's predicted time, where the bytes held fit memory_budget;
        the time is predicted from kernel rates calibrated once per machine: ``bkcompile.compiler.calibration``),
        or "fastest" ("auto" without a memory limit unless memory_budget is given).
    memory_budget: what the per-sample norm work may hold at once (with several clipping groups, the largest
        group's): an int, bytes at the compiled batch size (at expected_batch_size under a dynamic batch), or a
        string "<r>x" (r >= 1): the private step's peak at most r times the non-private step's, as the cost model
        estimates it (the work may hold (r - 1) x that peak). None: "1.25x" for "auto", no limit for "fastest".
        Only with strategy "auto" or "fastest".
    report: print the cost-model report when the backend compiles.
    clipping: how parameters are grouped for clipping, each group with its own per-sample norm and
        threshold: "all-layer" (one group), "layer-wise" (one per module owning parameters),
        "param-wise", "per-device", or a list of groups, each a name pattern (fnmatch), a list of
        patterns, a callable on names, or a dict {"params": ..., "max_grad_norm": R_g}. Groups
        without a threshold share max_grad_norm: R / sqrt(G) each, so the sensitivity stays R.
    clip_fn: "abadi" (C = min(1, R / (n + 1e-6))) or "automatic" (C = R / (n + clip_gamma)).
    clip_gamma: the stabiliser of automatic clipping.
    check_passes: after each pass of the pipeline, check its invariants (the graph lints, every node has a
        ``meta["val"]``, no new aliasing); default: the environment variable ``BKCOMPILE_CHECK=1``.
    dump: a directory; the graph is written there after each pass (``<n>-<graph>/<i>-<pass>.txt``); default:
        the environment variable ``BKCOMPILE_DUMP``.
    expected_batch_size: the expected batch size the DP optimizer divides the noisy sum by. Needed only when
        the loss has a data-independent term (``+ wd * sum(p.pow(2))``): that term's gradient has no
        sensitivity, so it is left unclipped and unnoised and multiplied by this, so that after the
        optimizer's division it acts exactly as in non-private training (``make_private`` and the
        Trainer integration set it).
    mode: Inductor's compile mode, what ``torch.compile``'s ``mode=`` would be (torch takes ``mode`` or
        ``options``, not both): "default" or "max-autotune-no-cudagraphs". The CUDA-graph modes and "lite"
        are refused. Only with compiler "inductor".
    inductor: Inductor config entries for the bk_dp graphs (``torch._inductor.config`` names and types, e.g.
        ``{"coordinate_descent_tuning": True}``), applied over the mode's; kept as sorted (name, value) pairs.
        The entries bk_dp sets itself (its joint-graph pass, CUDA graphs) are refused. Only with compiler
        "inductor".
    graphs: "auto": a graph is a piece of the model when dynamo cut it at a graph break or its parameters
        are FSDP2's of a model sharded per module (``fully_shard`` per block), else the whole model
        (clipped in the graph; refused at run time if its backward meets other bk_dp graphs);
        "several": always a piece (regional compilation: every compiled block, stem and head), clipped
        with the other graphs of its backward, once per sample, at the end of the backward.
    """

    max_grad_norm: float
    loss_reduction: LossReduction = "auto"
    compiler: Compiler = "inductor"
    batch_dim: int = 0
    strategy: Strategy = "auto"
    memory_budget: int | str | None = None
    report: bool = False
    clipping: ClippingStyle | tuple = "all-layer"
    clip_fn: ClipFn = "abadi"
    clip_gamma: float = 0.01
    check_passes: bool = False
    dump: str | None = None
    expected_batch_size: float | None = None
    graphs: Graphs = "auto"
    mode: Mode = "default"
    inductor: tuple[tuple[str, Any], ...] = ()


_CHOICES = {
    "loss_reduction": get_args(LossReduction),
    "compiler": get_args(Compiler),
    "strategy": get_args(Strategy),
    "report": (True, False),
    "check_passes": (True, False),
    "clip_fn": get_args(ClipFn),
    "graphs": get_args(Graphs),
}


def known_options() -> list[str]:
    """The names ``options`` may hold."""
    return sorted(f.name for f in dataclasses.fields(BKOptions) if f.repr)


def _positive(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise OptionError(f"option {key!r} must be a positive finite number, got {value!r}")
    return float(value)


def _clipping(raw: Any) -> str | tuple:
    """A style name, or a tuple of groups ``(selector, threshold or None)``."""
    if isinstance(raw, str):
        if raw not in CLIPPING_STYLES:
            raise OptionError(f"option 'clipping' must be one of {CLIPPING_STYLES} or a list of groups, got {raw!r}")
        return raw
    if not isinstance(raw, (list, tuple)) or not raw:
        raise OptionError(f"option 'clipping' must be a style name or a non-empty list of groups, got {raw!r}")
    groups = []
    for entry in raw:
        selector, threshold = (
            (entry.get("params"), entry.get("max_grad_norm")) if isinstance(entry, dict) else (entry, None)
        )
        if isinstance(selector, list):
            selector = tuple(selector)
        valid = (
            callable(selector)
            or isinstance(selector, str)
            or (isinstance(selector, tuple) and selector and all(isinstance(s, str) for s in selector))
        )
        if not valid:
            raise OptionError(
                f"a clipping group selects parameters by a name pattern, a list of patterns or a "
                f"callable on names; got {selector!r}"
            )
        groups.append((selector, None if threshold is None else _positive(threshold, "clipping[].max_grad_norm")))
    return tuple(groups)


DEFAULT_BUDGET = 1.25  # memory_budget=None under "auto": "1.25x"


def _memory_budget(value: Any) -> int | str | None:
    """Bytes (an int >= 0), a multiple "<r>x" (r >= 1) of the non-private peak, or None."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    if isinstance(value, str) and value.endswith("x"):
        try:
            ratio = float(value.removesuffix("x"))
        except ValueError:
            ratio = math.nan
        if math.isfinite(ratio) and ratio >= 1:
            return f"{ratio:g}x"
    raise OptionError(
        "option 'memory_budget' must be a non-negative int (bytes), a multiple of the non-private peak as a string "
        f"'<r>x' with r >= 1 (e.g. '1.25x'), or None; got {value!r}"
    )


def _expected_batch_size(value: Any) -> float | None:
    return None if value is None else _positive(value, "expected_batch_size")


def _mode(raw: dict[str, Any]) -> str:
    mode = raw.get("mode", "default")
    if isinstance(mode, str) and mode in _REFUSED_MODES:
        raise OptionError(
            f"option 'mode' cannot be {mode!r}: {_REFUSED_MODES[mode]}. Fix: mode='default' or "
            "'max-autotune-no-cudagraphs' (max_autotune and coordinate_descent_tuning, without CUDA graphs), and "
            "other Inductor config entries as options={'inductor': {...}}"
        )
    if mode not in MODES:
        raise OptionError(f"option 'mode' must be one of {MODES}, got {mode!r}")
    return mode


def _inductor(raw: Any) -> tuple[tuple[str, Any], ...]:
    """Inductor config entries, checked as ``torch.compile`` checks its ``options`` for Inductor (a known name,
    a value of its type), minus the entries bk_dp owns."""
    if not isinstance(raw, Mapping):
        raise OptionError(
            f"option 'inductor' must be a dict of Inductor config entries, e.g. "
            f"{{'coordinate_descent_tuning': True}}; got {raw!r}"
        )
    from torch._inductor import config

    current = config.get_config_copy()
    entries = []
    for key, value in raw.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name in _OWNED_INDUCTOR_KEYS:
            raise OptionError(
                f"option 'inductor' cannot set {key!r}: bk_dp sets it ({_OWNED_INDUCTOR_KEYS[name]}). Fix: leave it out"
            )
        if name not in current:
            close = difflib.get_close_matches(str(name), list(current), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise OptionError(f"option 'inductor': {key!r} is not an Inductor config entry{hint}")
        kind = config.get_type(name)
        if typing.get_origin(kind) is None and isinstance(kind, type) and not isinstance(value, kind):
            raise OptionError(
                f"option 'inductor': {key!r} takes a {kind.__name__}, got {type(value).__name__} {value!r}"
            )
        entries.append((name, value))
    return tuple(sorted(entries, key=lambda entry: entry[0]))


def parse_options(raw: dict[str, Any] | None) -> BKOptions:
    """Validate the user's options dict; raise :class:`OptionError` naming the offending key."""
    raw = dict(raw or {})
    known = known_options()
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise OptionError(f"unknown option {key!r} for backend 'bk_dp'{hint}; known options: {known}")
    if "max_grad_norm" not in raw:
        raise OptionError(
            "option 'max_grad_norm' is required: the clipping threshold R, e.g. options={'max_grad_norm': 1.0}"
        )
    norm = raw["max_grad_norm"]
    if isinstance(norm, bool) or not isinstance(norm, (int, float)):
        raise OptionError(f"option 'max_grad_norm' must be a float, got {type(norm).__name__}")
    if not (math.isfinite(norm) and norm > 0):
        raise OptionError(f"option 'max_grad_norm' must be positive and finite, got {norm}")
    for key, choices in _CHOICES.items():
        if key in raw and raw[key] not in choices:
            raise OptionError(f"option {key!r} must be one of {choices}, got {raw[key]!r}")
    batch_dim = raw.get("batch_dim", 0)
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
        raise OptionError(f"option 'batch_dim' must be a non-negative int, got {batch_dim!r}")
    budget = _memory_budget(raw.get("memory_budget"))
    dump = raw.get("dump", os.environ.get("BKCOMPILE_DUMP") or None)
    if dump is not None and not isinstance(dump, (str, os.PathLike)):
        raise OptionError(f"option 'dump' must be a directory path or None, got {dump!r}")
    if budget is not None and raw.get("strategy", "auto") not in ("auto", "fastest"):
        raise OptionError(
            "option 'memory_budget' applies to strategy 'auto' or 'fastest' (a forced strategy does not trade "
            f"time for memory); got strategy={raw.get('strategy')!r}"
        )
    mode = _mode(raw)
    inductor = _inductor(raw.get("inductor", {}))
    for key in ("mode", "inductor"):
        if key in raw and raw.get("compiler", "inductor") != "inductor":
            raise OptionError(
                f"option {key!r} configures Inductor, and compiler={raw['compiler']!r}. Fix: leave {key!r} out, "
                "or compiler='inductor'"
            )
    return BKOptions(
        max_grad_norm=float(norm),
        clipping=_clipping(raw.get("clipping", "all-layer")),
        clip_fn=raw.get("clip_fn", "abadi"),
        clip_gamma=_positive(raw.get("clip_gamma", 0.01), "clip_gamma"),
        loss_reduction=raw.get("loss_reduction", "auto"),
        compiler=raw.get("compiler", "inductor"),
        batch_dim=batch_dim,
        strategy=raw.get("strategy", "auto"),
        memory_budget=budget,
        report=raw.get("report", False),
        check_passes=raw.get("check_passes", os.environ.get("BKCOMPILE_CHECK", "") == "1"),
        dump=None if dump is None else os.fspath(dump),
        expected_batch_size=_expected_batch_size(raw.get("expected_batch_size")),
        graphs=raw.get("graphs", "auto"),
        mode=mode,
        inductor=inductor,
    )
