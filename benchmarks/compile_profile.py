"""Where a cold compile goes: bk_dp against non-private torch.compile, kernel by kernel.

Each (model, method) compiles its first training step (the throughput benchmark's workloads and methods) in a
process of its own with an empty Inductor cache, C++ builds in that process one after another
(``compile_threads=1``, so each build is timed alone), and reports:

- the C++ kernels of each compiled graph (forward, backward), by name (``cpp_fused_*``), from the generated code,
  with each one's build seconds and source lines;
- Inductor's counters (``counters["inductor"]``) and dynamo's timers (``torch._dynamo.utils.compile_times``):
  lowering, scheduling, code generation, the partition;
- bk_dp's pass (``bkcompile.passes.privatize``) in seconds;
- the first step's seconds.

Kernel counts are deterministic; timings are not (others compile on the same CPU): ``--repeats`` runs each pair
that many times, interleaved, and the summary gives each timing's range. ``--parallel-builds`` leaves Inductor's
compile threads at their default, as a user's compile runs (the builds then overlap and are not timed one by one),
and the summary adds each method's first step over non-private's, the median of the repeats' ratios (each repeat's
runs side by side in time).

Run: OMP_NUM_THREADS=1 python benchmarks/compile_profile.py [--models mlp vit gpt2-t128] [--methods compile
bk_dp-inductor] [--repeats 2] [--parallel-builds] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

KERNEL = re.compile(r"^(cpp_fused_\w+) = async_compile\.cpp_pybinding\(", re.MULTILINE)
PROBE_TIMEOUT_S = 900
TIMERS = (  # dynamo_timed events worth a column, by their name in compile_times()
    "compile_fx_inner",
    "GraphLowering.run",
    "Scheduler.__init__",
    "Scheduler.codegen",
    "GraphLowering.compile_to_module",
    "min_cut_rematerialization_partition",
    "async_compile.wait",
)


def probe(model_name: str, method: str, parallel: bool) -> dict:
    """One cold first step, in this process (its Inductor cache is empty: see ``measure``); its C++ builds one after
    another and each timed, unless ``parallel``."""
    if not parallel:
        os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    import throughput
    import torch
    from torch._dynamo.utils import counters
    from torch._inductor import async_compile
    from torch._inductor.codecache import PyCodeCache

    import bkcompile.compiler.backend as backend

    throughput.warm_up_inductor()
    builds: list[dict] = []
    pass_s: list[float] = []
    cpp_pybinding = async_compile.AsyncCompile.cpp_pybinding
    privatize = backend.privatize

    def timed_build(self, argtypes, source_code):
        start = time.perf_counter()
        kernel = cpp_pybinding(self, argtypes, source_code)
        builds.append({"source": source_code, "s": time.perf_counter() - start})
        return kernel

    def timed_pass(*args, **kwargs):
        start = time.perf_counter()
        try:
            return privatize(*args, **kwargs)
        finally:
            pass_s.append(time.perf_counter() - start)

    if not parallel:  # in the pool a build's call returns before the build ends
        async_compile.AsyncCompile.cpp_pybinding = timed_build
    backend.privatize = timed_pass
    before = set(PyCodeCache.modules)
    counters.clear()
    torch._dynamo.utils.reset_frame_count()
    for key in list(torch._dynamo.utils.compilation_time_metrics):
        del torch._dynamo.utils.compilation_time_metrics[key]
    spec = throughput.workload(model_name, quick=False)
    torch.manual_seed(0)
    model = spec.build().train()
    step = throughput.METHODS[method](model, spec.batch(torch.device("cpu")))
    start = time.perf_counter()
    step()
    first_step_s = time.perf_counter() - start
    by_source = {build["source"]: build for build in builds}
    graphs = []
    for module in PyCodeCache.modules:
        if module in before:
            continue
        code = Path(module.__file__).read_text()
        kernels = []
        for name in KERNEL.findall(code):
            source = _kernel_source(code, name)
            build = by_source.get(source, {})
            kernels.append({"name": name, "lines": source.count("\n"), "build_s": build.get("s")})
        graphs.append({"kernels": kernels, "extern_calls": code.count("extern_kernels.")})
    metrics = torch._dynamo.utils.compilation_time_metrics
    return {
        "model": model_name,
        "method": method,
        "first_step_s": first_step_s,
        "pass_s": sum(pass_s),
        "cpp_build_s": sum(build["s"] for build in builds) if not parallel else math.nan,
        "timers": {name: sum(metrics.get(name, [])) for name in TIMERS},
        "counters": dict(counters["inductor"]),
        "graphs": graphs,
    }


def _kernel_source(code: str, name: str) -> str:
    """The C++ source handed to ``async_compile.cpp_pybinding`` for kernel ``name`` in the generated module."""
    start = code.index(f"{name} = async_compile.cpp_pybinding(")
    begin = code.index("'''", start) + 3
    return code[begin : code.index("'''", begin)]


def measure(model_name: str, method: str, parallel: bool) -> dict:
    """``probe`` in a subprocess with an Inductor cache of its own, empty."""
    command = [sys.executable, str(Path(__file__).resolve()), "--probe", model_name, method]
    command += ["--parallel-builds"] * parallel
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{model_name} {method}: the probe exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def summary(runs: list[dict]) -> str:
    """A table per (model, method): kernels per graph, and each timing's range over the repeats."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["model"], run["method"]), []).append(run)

    def span(values: list[float]) -> str:
        return f"{min(values):.2f}" if len(values) == 1 else f"{min(values):.2f}-{max(values):.2f}"

    head = ["model", "method", "kernels (fw+bw)", "extern calls", "first step s", "C++ builds s", "s per build"]
    head += ["pass s", *TIMERS]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (model_name, method), group in groups.items():
        kernels = "+".join(str(len(graph["kernels"])) for graph in group[0]["graphs"])
        calls = "+".join(str(graph["extern_calls"]) for graph in group[0]["graphs"])
        per_build = [run["cpp_build_s"] / max(1, sum(len(g["kernels"]) for g in run["graphs"])) for run in group]
        cells = [model_name, method, kernels, calls, span([run["first_step_s"] for run in group])]
        cells += [span([run["cpp_build_s"] for run in group]), span(per_build), span([run["pass_s"] for run in group])]
        cells += [span([run["timers"][name] for run in group]) for name in TIMERS]
        rows.append("| " + " | ".join(cells) + " |")
    names = []
    for (model_name, method), group in groups.items():
        for index, graph in enumerate(group[0]["graphs"]):
            kinds = Counter(re.sub(r"_\d+$", "", kernel["name"]) for kernel in graph["kernels"])
            names.append(f"{model_name} {method} graph {index}: " + ", ".join(f"{k} x{n}" for k, n in kinds.items()))
    return "\n".join(rows + [""] + names)


def ratios(runs: list[dict], baseline: str = "compile") -> str:
    """Each method's first step over ``baseline``'s of the same model and repeat: the median of the repeats' ratios
    and their range, beside the median seconds."""
    seconds: dict[tuple[str, str], dict[int, float]] = {}
    for run in runs:
        seconds.setdefault((run["model"], run["method"]), {})[run["repeat"]] = run["first_step_s"]
    rows = ["| model | method | first step s (median) | × non-private (median, range over repeats) |"]
    rows.append("|---|---|---|---|")
    for (model_name, method), by_repeat in seconds.items():
        base = seconds.get((model_name, baseline), {})
        each = [by_repeat[r] / base[r] for r in by_repeat if r in base]
        ratio = f"{statistics.median(each):.2f} ({min(each):.2f}-{max(each):.2f})" if each else ""
        rows.append(f"| {model_name} | {method} | {statistics.median(by_repeat.values()):.1f} | {ratio} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "vit", "gpt2-t128"])
    parser.add_argument("--methods", nargs="+", default=["compile", "bk_dp-inductor"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--parallel-builds", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--probe", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(*args.probe, args.parallel_builds)))
        return
    runs = []
    for model_name in args.models:
        for repeat in range(args.repeats):
            methods = args.methods if repeat % 2 == 0 else args.methods[::-1]  # interleaved, the order alternated
            for method in methods:
                runs.append({**measure(model_name, method, args.parallel_builds), "repeat": repeat})
                print(f"{model_name} {method}: {runs[-1]['first_step_s']:.1f} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    print(summary(runs))
    print()
    print(ratios(runs))


if __name__ == "__main__":
    main()
