"""Warm starts: a privatized graph loads from torch's AOTAutograd cache, and its plan from beside it.

A fresh process that compiles a model an earlier process compiled would, without this, trace the joint graph, run
the privatizing pass and partition again before Inductor's FX graph cache could hand back the compiled forward and
backward. The AOTAutograd cache skips all of that: it keys the graph *before* the pass (dynamo's graph, its inputs'
metadata, torch's and Inductor's config, the pass's :meth:`uuid <bkcompile.compiler.backend._InductorJointPass>`)
and loads the compiled graphs the pass produced. What it cannot load is the :class:`bkcompile.plan.GraphPlan` the
pass handed to the graph's run-time record; this module keeps it, pickled in Inductor's cache directory:

- :func:`pass_key` is what the pass's output depends on beyond dynamo's graph: bkcompile's source, the options
  (all but the run-time threshold ``max_grad_norm`` and the report flag), the record's integer key (which the
  compiled graph names in its run-time op calls), the inputs as the backend classified them and the kernel rates
  the cost model chose by. It is the pass's uuid, so it is in both torch caches' keys.
- :func:`plan_key` adds dynamo's graph and its inputs' metadata, and the whole options: it names one plan.

With a pass key the AOTAutograd cache is on. A hit takes the plan saved under the plan key (:func:`load`); a hit
without one (another threshold's, a plan lost or not written) compiles again with that cache off, the pass runs, and
its plan is saved (:func:`save`), as after a miss. Plans of the same pass key and graph are the same but for the
options' threshold, so a loaded plan is the plan the loaded graph was privatized with.
Nothing is cached for a piece of the model, options holding code (a callable), a dump directory, or when a batch
rule was registered in this process (:func:`bkcompile.register_batch_rule`): the pass's output may then depend on
code no key shows.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch._inductor.custom_graph_pass import get_hash_for_files

import bkcompile.passes
from bkcompile.compiler import calibration
from bkcompile.compiler.options import BKOptions
from bkcompile.passes.ops.table import LAWS, USER_RULES
from bkcompile.plan import GraphPlan

# options read at run time (the initial thresholds, from the record) or only when the pass prints: not in the pass key
_RUN_TIME_OPTIONS = ("max_grad_norm", "report")
_VERSION = 1  # of the saved plans' format


@functools.cache
def source_hash() -> str:
    """A hash of every Python file of bkcompile and its passes (read once per process)."""
    roots = (Path(__file__).resolve().parents[1], Path(bkcompile.passes.__file__).resolve().parent)
    return get_hash_for_files(tuple(sorted(str(p) for root in roots for p in root.rglob("*.py")))).hex()


def pass_key(options: BKOptions, record_key: int, inputs: tuple, device: torch.device, piece: bool) -> str | None:
    """What the pass's output depends on beyond dynamo's graph (module docstring); None where nothing may be cached
    (the pass's uuid is then bkcompile's source alone, and the AOTAutograd cache stays off)."""
    fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    user_rules = any(op in LAWS for op in USER_RULES)
    if piece or options.dump or user_rules or not all(_plain(value) for value in fields.values()):
        return None
    compiled = {name: value for name, value in fields.items() if name not in _RUN_TIME_OPTIONS}
    return _digest(source_hash(), _VERSION, compiled, record_key, inputs, calibration.fingerprint(device))


def plan_key(key: str, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: BKOptions) -> str:
    """One plan: the pass key, dynamo's graph (its code, constants and inputs' metadata, a dynamic size as its
    symbol; grad mode and autocast), and the whole options."""
    # dynamo's fake values: a dynamic size is its symbol, not this call's size
    placeholders = gm.graph.find_nodes(op="placeholder")
    examples = [_metadata(n.meta.get("example_value", e)) for n, e in zip(placeholders, example_inputs, strict=True)]
    constants = [_metadata(getattr(gm, n.target), values=True) for n in gm.graph.find_nodes(op="get_attr")]
    autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
    return _digest(key, gm.code, examples, constants, torch.is_grad_enabled(), autocast, repr(options))


def load(key: str) -> GraphPlan | None:
    """The plan saved under ``key``; None when there is none or it cannot be read."""
    try:
        plan = pickle.loads(_path(key).read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError):
        return None
    return plan if isinstance(plan, GraphPlan) else None


def save(key: str, plan: GraphPlan) -> None:
    """Keep ``plan`` under ``key`` (written whole: another process may read it meanwhile). A plan that cannot be
    written is not kept: a later hit on its graphs compiles them again, with the pass."""
    path = _path(key)
    try:
        content = pickle.dumps(plan)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_bytes(content)
        os.replace(scratch, path)
    except (OSError, pickle.PicklingError, TypeError, AttributeError):
        return


def _path(key: str) -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "bkcompile_plans" / f"{key}.pickle"


def _plain(value: Any) -> bool:
    """Data alone (no code): what a key may hold."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return False


def _metadata(value: Any, values: bool = False) -> Any:
    if not isinstance(value, torch.Tensor):
        return (type(value).__name__, repr(value))
    meta = (
        type(value).__name__,
        value.dtype,
        value.device.type,
        str(value.shape),
        str(value.stride()),
        value.requires_grad,
    )
    if values:
        meta += (hashlib.sha256(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy()).hexdigest(),)
    return meta


def _digest(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()
