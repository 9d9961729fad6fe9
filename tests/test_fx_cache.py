"""bk_dp's graphs and torch's caches: a fresh process compiling the same model with the same options loads its graphs
from the AOTAutograd cache (the privatizing pass does not run) and its plan from beside them
(:mod:`bkcompile.compiler.warm`); with another threshold it loads the graphs Inductor compiled from the FX graph cache
and the pass runs; with other clipping it compiles. Every record has its plan, and the gradients are the oracle's.

Each run is a fresh interpreter (as a user's second run of a script): record keys count from process start, so the
same model compiles to the same privatized graphs, keys included. The runs share a cache directory of their own."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import bkcompile
from bkcompile.compiler import warm
from bkcompile.compiler.backend import _inductor_config, _inductor_decompositions, _Job
from bkcompile.compiler.options import parse_options

TESTS = pathlib.Path(__file__).resolve().parent

# One training step of a small MLP under bk_dp (Inductor, float64, a dynamic batch): the caches' counters, how often
# the pass ran, whether every record has a plan and a report was made, and the relative error of the clipped
# gradients against the oracle.
STEP = textwrap.dedent(
    """
    import json, sys
    import torch, torch.nn.functional as F
    from torch._dynamo.utils import counters
    sys.path.insert(0, {tests!r})
    from oracle import clipped_sum
    import bkcompile
    import bkcompile.compiler.backend as backend
    from bkcompile.runtime.ledger import live_records

    passes = []
    privatize = backend.privatize
    backend.privatize = lambda *args, **kwargs: passes.append(1) or privatize(*args, **kwargs)

    options = json.loads(sys.argv[1])
    groups = options.pop("oracle_groups", None)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    bkcompile.mark_batch_dynamic(x)  # as the PoissonLoader marks each batch
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
        "passes": len(passes),
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
def test_a_fresh_process_loads_its_graphs_and_plan_and_clips_exactly(tmp_path: pathlib.Path) -> None:
    cold = _step(tmp_path, max_grad_norm=0.1)
    assert cold["miss"] == 2 and cold["hit"] == 0 and cold["bypass"] == 0, cold  # the forward and the backward
    assert cold["aot_hit"] == 0 and cold["passes"] == 1, cold
    # the same model, the same options: the graphs load from the AOTAutograd cache, without the pass, and the plan
    # from beside them; the report is the plan's; the result is exact
    warm = _step(tmp_path, max_grad_norm=0.1)
    assert warm["aot_hit"] == 1 and warm["passes"] == 0 and warm["hit"] == 2 and warm["miss"] == 0, warm
    assert warm["planned"] == [True] and warm["report"], warm
    assert warm["error"] <= 1e-10, warm
    # another threshold: no plan is saved for it, so the graphs compile again with the pass; Inductor's graphs are
    # the same (each group's threshold is read at run time from the record), so they load from the FX graph cache,
    # and clip with the new threshold; a later process loads the plan saved for it
    other = _step(tmp_path, max_grad_norm=0.03)
    assert other["passes"] == 1 and other["hit"] == 4 and other["miss"] == 0, other  # 2: the AOTAutograd load
    assert other["error"] <= 1e-10, other
    again = _step(tmp_path, max_grad_norm=0.03)
    assert again["aot_hit"] == 1 and again["passes"] == 0 and again["error"] <= 1e-10, again
    # layer-wise clipping privatizes into another backward (a norm per layer): it misses, and is exact (a backward
    # loaded for all-layer clipping would clip both layers together: not the oracle's)
    groups = [[["0.weight", "0.bias"], 0.05 / 2**0.5], [["2.weight", "2.bias"], 0.05 / 2**0.5]]
    layers = _step(tmp_path, max_grad_norm=0.05, clipping="layer-wise", oracle_groups=groups)
    assert layers["aot_hit"] == 0 and layers["passes"] == 1 and layers["miss"] >= 1, layers
    assert layers["error"] <= 1e-10, layers


def test_inductor_takes_the_joint_pass_into_its_cache_key() -> None:
    """Inductor's FX graph cache bypasses a graph compiled with a joint pass that is not a CustomGraphPass with a
    uuid, or with a decomposition table it cannot pickle into its key; bk_dp's config and table pass, and its pass's
    uuid is the pass key (without one, the hash of bkcompile's source)."""
    from torch._inductor.codecache import CacheabilityValidator, FxGraphCachePickler
    from torch._inductor.compile_fx import _ConstantDecompTable

    job = _Job(inputs=(), options=parse_options({"max_grad_norm": 1.0}), role=None, record=None)
    config = _inductor_config(job, torch.device("cpu"), "a pass key")
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with torch._inductor.config.patch(config):
        CacheabilityValidator(gm=gm)._check_custom_passes()  # raises BypassFxGraphCache where Inductor would bypass
    FxGraphCachePickler(gm).dumps(_ConstantDecompTable(_inductor_decompositions()))  # the table compile_fx keys
    assert config["joint_custom_pre_pass"].uuid() == "a pass key"
    unkeyed = _inductor_config(job, torch.device("cpu"), None)["joint_custom_pre_pass"].uuid()
    assert unkeyed == warm.source_hash() and len(unkeyed) == 64


def test_the_pass_key_holds_what_the_pass_reads_beyond_dynamos_graph() -> None:
    """The threshold and the report flag are read at run time (or only printed): the pass key, and so torch's cache
    keys, are the same without them; any other option, the record key and the inputs make another key; the plan key
    holds the threshold too."""
    cpu = torch.device("cpu")

    def key(record: int = 1, inputs: tuple = ("x",), **options) -> str | None:
        return warm.pass_key(parse_options({"max_grad_norm": 1.0, **options}), record, inputs, cpu, piece=False)

    assert key() == key(max_grad_norm=0.5) == key(report=True)
    assert len({key(), key(clipping="layer-wise"), key(clip_fn="automatic"), key(strategy="ghost"), key(2)}) == 5
    assert key(inputs=("y",)) != key()
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    options = [parse_options({"max_grad_norm": r}) for r in (1.0, 0.5)]
    assert len({warm.plan_key(key(), gm, [torch.randn(3, 2)], o) for o in options}) == 2


def test_nothing_is_cached_where_the_pass_may_read_code_no_key_shows(tmp_path: pathlib.Path) -> None:
    """A piece of the model, options holding a callable, a dump directory, a batch rule registered by the user:
    no pass key (the AOTAutograd cache stays off for the compile)."""
    from bkcompile.passes.ops.table import LAWS, USER_RULES

    cpu = torch.device("cpu")
    plain = parse_options({"max_grad_norm": 1.0})
    assert warm.pass_key(plain, 1, (), cpu, piece=False) is not None
    assert warm.pass_key(plain, 1, (), cpu, piece=True) is None
    by_name = parse_options({"max_grad_norm": 1.0, "clipping": [{"params": lambda name: True}]})
    assert warm.pass_key(by_name, 1, (), cpu, piece=False) is None
    dumped = parse_options({"max_grad_norm": 1.0, "dump": str(tmp_path)})
    assert warm.pass_key(dumped, 1, (), cpu, piece=False) is None
    op = torch.ops.aten.sinc.default
    law = LAWS.get(op)
    try:
        bkcompile.register_batch_rule(op)(bkcompile.compiler.rules.pointwise)
        assert warm.pass_key(plain, 1, (), cpu, piece=False) is None
    finally:
        USER_RULES.discard(op)
        LAWS.pop(op, None)
        if law is not None:
            LAWS[op] = law
    assert warm.pass_key(plain, 1, (), cpu, piece=False) is not None


def test_a_saved_plan_loads_as_it_was_saved(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan round-trips through the cache directory; a missing or unreadable one is None."""
    from bkcompile.plan import ClipGroup, GraphPlan, Grouping
    from bkcompile.policy import ClipPolicy

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    options = parse_options({"max_grad_norm": 0.5, "clipping": "layer-wise"})
    grouping = Grouping((ClipGroup("fc", "fc", (0, 1), 0.25, True), ClipGroup("head", "head", (2,), 0.25, True)))
    plan = GraphPlan("bk_dp graph #1", ClipPolicy.of(options), grouping)
    warm.save("k", plan)
    assert warm.load("k") == plan
    assert warm.load("another") is None
    (tmp_path / "bkcompile_plans" / "k.pickle").write_bytes(b"not a pickle")
    assert warm.load("k") is None
    unpicklable = dataclasses.replace(plan, report=lambda: None)  # a plan that cannot be written is not kept
    warm.save("u", unpicklable)
    assert warm.load("u") is None and not (tmp_path / "bkcompile_plans" / "u.pickle").exists()


def test_a_saved_plan_that_clips_an_input_the_graph_does_not_train_is_not_used() -> None:
    """The loaded plan must clip trainable inputs of the graph it is loaded for; else the graph compiles again."""
    from bkcompile.passes.facts import REPLICATED
    from bkcompile.passes.joint import GraphInput, InputKind

    from bkcompile.compiler.backend import _clips_trainable
    from bkcompile.plan import ClipGroup, GraphPlan, Grouping
    from bkcompile.policy import ClipPolicy

    inputs = (
        GraphInput("w", "w", InputKind.PARAMETER, REPLICATED, True),
        GraphInput("frozen", "frozen", InputKind.PARAMETER, REPLICATED, False),
        GraphInput("x", "x", InputKind.OTHER, REPLICATED, False),
    )
    policy = ClipPolicy.of(parse_options({"max_grad_norm": 1.0}))

    def plan(*members: int) -> GraphPlan:
        return GraphPlan("g", policy, Grouping((ClipGroup("all", "all", members, 1.0, True),)))

    assert _clips_trainable(plan(0), inputs)
    assert not _clips_trainable(plan(0, 1), inputs) and not _clips_trainable(plan(2), inputs)
