"""bk_dp's Inductor graphs and Inductor's FX graph cache: a fresh process compiling the same model hits the cache,
the privatizing pass still runs (the record gets its plan, the report prints), and the gradients are the oracle's.

Each run is a fresh interpreter (as a user's second run of a script): record keys count from process start, so the
same model compiles to the same privatized graphs, keys included. The runs share a cache directory of their own."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from bkcompile.compiler.backend import _inductor_config, _inductor_decompositions, _Job, _source_hash
from bkcompile.compiler.options import parse_options

TESTS = pathlib.Path(__file__).resolve().parent

# One training step of a small MLP under bk_dp (Inductor, float64): the FX cache's counters, whether every record
# has a plan and a report was made, and the relative error of the clipped gradients against the oracle.
STEP = textwrap.dedent(
    """
    import json, sys
    import torch, torch.nn.functional as F
    from torch._dynamo.utils import counters
    sys.path.insert(0, {tests!r})
    from oracle import clipped_sum
    import bkcompile
    from bkcompile.runtime.ledger import live_records

    options = json.loads(sys.argv[1])
    groups = options.pop("oracle_groups", None)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    compiled = bkcompile.compile(model, loss_reduction="mean", report=True, **options)
    F.cross_entropy(compiled(x), y).backward()
    want, _ = clipped_sum(
        model, lambda out, t: F.cross_entropy(out, t), (x,), (y,), max_grad_norm=options["max_grad_norm"],
        groups=groups,
    )
    error = max(((p.grad - want[k]).abs().max() / want[k].abs().max()).item() for k, p in model.named_parameters())
    print(json.dumps({{
        "hit": counters["inductor"]["fxgraph_cache_hit"],
        "miss": counters["inductor"]["fxgraph_cache_miss"],
        "bypass": counters["inductor"]["fxgraph_cache_bypass"],
        "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "planned": [r.plan is not None for r in live_records()],
        "report": bkcompile.last_report() is not None,
        "error": error,
    }}))
    """
).format(tests=str(TESTS))


def _step(cache: pathlib.Path, **options) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", STEP, json.dumps(options)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # fresh interpreters; two Inductor compiles
def test_a_fresh_process_hits_the_fx_graph_cache_and_still_privatizes(tmp_path: pathlib.Path) -> None:
    cold = _step(tmp_path, max_grad_norm=0.1)
    assert cold["miss"] == 2 and cold["hit"] == 0 and cold["bypass"] == 0, cold  # the forward and the backward
    # the same model, the same options: both graphs load from the cache; the pass ran, the result is exact
    warm = _step(tmp_path, max_grad_norm=0.1)
    assert warm["hit"] == 2 and warm["miss"] == 0 and warm["aot_hit"] == 0, warm
    assert warm["planned"] == [True] and warm["report"], warm  # one graph, planned by this process's pass
    assert warm["error"] <= 1e-10, warm
    # another threshold: the graphs are the same (each group's threshold is read at run time from the record,
    # which this compile's pass planned), so they hit, and clip with the new threshold
    other = _step(tmp_path, max_grad_norm=0.03)
    assert other["hit"] == 2 and other["miss"] == 0, other
    assert other["error"] <= 1e-10, other
    # layer-wise clipping privatizes into another backward (a norm per layer): it misses, and is exact (a backward
    # loaded for all-layer clipping would clip both layers together: not the oracle's)
    groups = [[["0.weight", "0.bias"], 0.05 / 2**0.5], [["2.weight", "2.bias"], 0.05 / 2**0.5]]
    layers = _step(tmp_path, max_grad_norm=0.05, clipping="layer-wise", oracle_groups=groups)
    assert layers["miss"] >= 1, layers
    assert layers["error"] <= 1e-10, layers


def test_inductor_takes_the_joint_pass_into_its_cache_key() -> None:
    """Inductor's FX graph cache bypasses a graph compiled with a joint pass that is not a CustomGraphPass with a
    uuid, or with a decomposition table it cannot pickle into its key; bk_dp's config and table pass, and its pass's
    uuid is the hash of bkcompile's source."""
    from torch._inductor.codecache import CacheabilityValidator, FxGraphCachePickler
    from torch._inductor.compile_fx import _ConstantDecompTable

    job = _Job(inputs=(), options=parse_options({"max_grad_norm": 1.0}), role=None, record=None)
    config = _inductor_config(job, torch.device("cpu"))
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with torch._inductor.config.patch(config):
        CacheabilityValidator(gm=gm)._check_custom_passes()  # raises BypassFxGraphCache where Inductor would bypass
    FxGraphCachePickler(gm).dumps(_ConstantDecompTable(_inductor_decompositions()))  # the table compile_fx keys
    assert config["joint_custom_pre_pass"].uuid() == _source_hash() and len(_source_hash()) == 32
