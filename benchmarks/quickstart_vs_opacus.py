"""The quickstart model trained privately with bkcompile and with Opacus: test accuracy and wall time over seeds.

Both get the quickstart's settings (examples/quickstart.py): the same split, MLP, SGD(lr), R, target
(epsilon, delta) over the same epochs, the same DataLoader (batch size = expected batch size), Poisson
sampling and a PRV accountant. Opacus derives its sample rate from the loader as 1 / len(loader), bkcompile as
batch_size / len(dataset); the table shows both. The methods take turns seed by seed (each method on seed 0, then
on seed 1, ...), so a load that comes and goes weighs on each. Wall time is make_private (the noise calibration, for
bkcompile also wrapping the model) plus the epochs; the first epoch includes compiling. bkcompile runs as the
quickstart does, with bk_dp's default compiler, Inductor, whose cache is torch's default (on disk, shared by the
runs); bkcompile-aot_eager runs the same with aot_eager inside bk_dp (no C++ compile).

Each run (a method on a seed) is a fresh Python process by default, as a user runs the quickstart: it pays the
process's one-time costs (Inductor's first import, Opacus's first use), and bk_dp's graphs load from torch's
AOTAutograd cache, with the plan saved beside them (bkcompile.compiler.warm), where an earlier run compiled them (the
first run on a machine compiles them and their C++ kernels; later runs, seed 0's included, load them).
``--one-process`` runs every seed in this process instead (``torch._dynamo.reset()`` between bkcompile runs): the first
bkcompile run pays the process's one-time costs, and each later one compiles its graphs again (its C++ kernels
cached), since a graph's record key counts the records of the process and is in both caches' keys. The JSON has each
run's count of graphs loaded from the AOTAutograd cache (``aot_hits``) and of Inductor graphs loaded from the FX
graph cache and compiled (``fx_graph_hits``, ``fx_graph_misses``); the table says how many loaded.

Run: pip install -e ".[examples,bench]" && python benchmarks/quickstart_vs_opacus.py [--seeds 5] [--epochs 40]
[--methods bkcompile bkcompile-aot_eager opacus] [--one-process]
Prints a markdown table and writes benchmarks/results/quickstart_vs_opacus.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from opacus import PrivacyEngine
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import quickstart as qs  # noqa: E402

TOLERANCE = 0.03
RESULTS = Path(__file__).resolve().parent / "results" / "quickstart_vs_opacus.json"
METRICS = ("accuracy", "epsilon", "noise_multiplier", "sample_rate", "make_private_s", "first_epoch_s", "seconds")


def run_bkcompile(seed: int, epochs: int, compiler: str = "inductor") -> dict:
    """Train with bkcompile.make_private (``compiler`` inside bk_dp); the seed sets the initialisation, the
    Poisson batches and the noise."""
    torch._dynamo.reset()
    hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    aot_hits = counters["aot_autograd"]["autograd_cache_hit"]
    torch.manual_seed(seed)
    x_train, x_test, y_train, y_test = qs.load_data()
    model = qs.build_model()
    start = time.perf_counter()
    private_model, optimizer, loader = qs.make_private_sgd(
        model,
        qs.make_loader(x_train, y_train),
        epochs,
        generator=torch.Generator().manual_seed(seed),
        compiler=compiler,
    )
    made = time.perf_counter() - start
    epoch_seconds = qs.train(private_model, optimizer, loader, epochs, f"bkcompile seed {seed}")
    return {
        "accuracy": qs.accuracy(model, x_test, y_test),
        "epsilon": optimizer.accountant.get_epsilon(qs.DELTA),
        "noise_multiplier": optimizer.noise_multiplier,
        "sample_rate": optimizer.sample_rate,
        "make_private_s": made,
        "first_epoch_s": epoch_seconds[0],
        "seconds": time.perf_counter() - start,
        "fx_graph_hits": counters["inductor"]["fxgraph_cache_hit"] - hits,
        "fx_graph_misses": counters["inductor"]["fxgraph_cache_miss"] - misses,
        "aot_hits": counters["aot_autograd"]["autograd_cache_hit"] - aot_hits,
    }


def run_opacus(seed: int, epochs: int) -> dict:
    """Train with Opacus's make_private_with_epsilon; the seed sets the initialisation, the batches and the noise."""
    torch.manual_seed(seed)  # Opacus's Poisson sampler draws from the global generator
    x_train, x_test, y_train, y_test = qs.load_data()
    model = qs.build_model()
    start = time.perf_counter()
    engine = PrivacyEngine(accountant="prv")
    private_model, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=qs.LR, momentum=0.0),
        data_loader=qs.make_loader(x_train, y_train),
        target_epsilon=qs.EPSILON,
        target_delta=qs.DELTA,
        epochs=epochs,
        max_grad_norm=qs.R,
        poisson_sampling=True,
        noise_generator=torch.Generator().manual_seed(seed),
    )
    made = time.perf_counter() - start
    epoch_seconds = qs.train(private_model, optimizer, loader, epochs, f"opacus seed {seed}")
    return {
        "accuracy": qs.accuracy(model, x_test, y_test),
        "epsilon": engine.get_epsilon(qs.DELTA),
        "noise_multiplier": optimizer.noise_multiplier,
        "sample_rate": 1 / len(loader),
        "make_private_s": made,
        "first_epoch_s": epoch_seconds[0],
        "seconds": time.perf_counter() - start,
    }


def run_fresh(method: str, seed: int, epochs: int) -> dict:
    """``METHODS[method](seed, epochs)`` in a fresh Python process (this script with ``--run``)."""
    command = [sys.executable, os.path.abspath(__file__), "--run", method, str(seed), "--epochs", str(epochs)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# bkcompile as the quickstart runs it (Inductor inside bk_dp, the default); the same with aot_eager; Opacus
METHODS = {
    "bkcompile": run_bkcompile,
    "bkcompile-aot_eager": partial(run_bkcompile, compiler="aot_eager"),
    "opacus": run_opacus,
}


def summarize(runs: list[dict]) -> dict:
    """Mean and (sample) standard deviation of each metric over the runs."""

    def stats(values: list[float]) -> dict:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    return {name: stats([run[name] for run in runs]) for name in METRICS}


def markdown(summaries: dict, difference: float, runs: dict) -> str:
    """The table, bk_dp's graphs loaded from Inductor's FX graph cache, the difference of mean accuracies and the
    PASS/FAIL line."""
    lines = [
        "| method | test accuracy | epsilon | noise multiplier | sample rate | make_private (s) | first epoch (s) "
        "| wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, summary in summaries.items():
        cells = [f"{summary[name]['mean']:.4g} ± {summary[name]['std']:.2g}" for name in METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    verdict = "PASS" if abs(difference) <= TOLERANCE else "FAIL"
    opacus_s = summaries["opacus"]["seconds"]["mean"]
    lines += [""] + [
        f"wall time {method} / opacus: {summary['seconds']['mean'] / opacus_s:.2f}"
        for method, summary in summaries.items()
        if method != "opacus"
    ]
    loaded = [f"seed {seed}: {r['fx_graph_hits']} of {r['fx_graph_hits'] + r['fx_graph_misses']}"
              f"{' (from the AOTAutograd cache)' if r['aot_hits'] else ''}"
              for seed, r in enumerate(runs["bkcompile"])]  # fmt: skip
    lines += ["", "bkcompile's graphs loaded from torch's caches: " + ", ".join(loaded)]
    lines += [
        "",
        f"accuracy difference (bkcompile - opacus): {difference:+.4f}",
        f"{verdict}: |difference| {'<=' if verdict == 'PASS' else '>'} {TOLERANCE}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="runs per method, seeds 0 .. seeds-1")
    parser.add_argument("--epochs", type=int, default=qs.EPOCHS, help="epochs (the target epsilon holds for them)")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="bkcompile and opacus are needed"
    )
    parser.add_argument("--one-process", action="store_true", help="every run in this process (default: each fresh)")
    parser.add_argument("--run", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # one run, in the process run_fresh started: its result is the last line
        print(json.dumps(METHODS[args.run[0]](int(args.run[1]), args.epochs)))
        return
    if not {"bkcompile", "opacus"} <= set(args.methods):
        parser.error("--methods needs bkcompile and opacus (the accuracy difference compares them)")
    runs = {method: [] for method in args.methods}
    for seed in range(args.seeds):  # seed by seed, the methods in turn: a passing load weighs on each
        for method in args.methods:
            run = METHODS[method](seed, args.epochs) if args.one_process else run_fresh(method, seed, args.epochs)
            runs[method].append(run)
    summaries = {method: summarize(method_runs) for method, method_runs in runs.items()}
    difference = summaries["bkcompile"]["accuracy"]["mean"] - summaries["opacus"]["accuracy"]["mean"]
    print(markdown(summaries, difference, runs))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "settings": {
                    "seeds": args.seeds,
                    "epochs": args.epochs,
                    "epsilon": qs.EPSILON,
                    "delta": qs.DELTA,
                    "batch_size": qs.BATCH,
                    "max_grad_norm": qs.R,
                    "lr": qs.LR,
                    "tolerance": TOLERANCE,
                    "methods": args.methods,
                    "processes": "one" if args.one_process else "fresh per run",
                    "omp_num_threads": torch.get_num_threads(),
                },
                "runs": runs,
                "summary": summaries,
                "accuracy_difference": difference,
                "passed": abs(difference) <= TOLERANCE,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
