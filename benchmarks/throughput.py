"""Training-step throughput, peak memory and compile time of DP-SGD implementations against non-private
torch.compile, on a GPT-2-style language model (T=128 and T=512), a ViT, a ResNet with GroupNorm and an MLP.

Every method trains its own copy of the same model on the same fixed batch; a step is zero_grad, forward, the
loss on the logits outside the model (per-sample cross entropy, token-summed for the LM, mean over the batch),
backward and the optimizer step, with torch.optim.SGD. Clipping threshold R = 1, all-layer (flat) clipping
unless a method says otherwise.

  compile                     non-private torch.compile (Inductor): the baseline of every ratio
  bk_dp-inductor              bk_dp with options={"max_grad_norm": 1.0, "loss_reduction": "mean"}, plain SGD
  bk_dp-aot_eager             bk_dp with options={..., "compiler": "aot_eager"}, plain SGD
  opacus-hooks                Opacus PrivacyEngine.make_private, GradSampleModule hooks, flat clipping, sigma = 1
  opacus-ghost                Opacus fast gradient clipping (grad_sample_mode="ghost", DPLossFastGradientClipping)
  func-vmap                   torch.func vmap(grad) per-sample gradients, clipped and summed, eager
  func-vmap-compiled          the same clipped sums through torch.compile (Inductor)
and, with --methods only (the default run stays within 15 minutes on a 2-core CPU):
  bk_dp-inductor+DPOptimizer  bk_dp-inductor stepping through bkcompile.DPOptimizer (Gaussian noise, sigma = 1);
                              dynamo reuses bk_dp-inductor's compiled graphs, so its first step compiles nothing
  compile-aot_eager           non-private torch.compile(backend="aot_eager")
  bk_dp-inductor-layer-wise   bk_dp-inductor with options={..., "clipping": "layer-wise"} (a group per module)
  bk_dp-inductor-param-wise   bk_dp-inductor with options={..., "clipping": "param-wise"}

Throughput: in this process, the methods of a model take turns over rounds (the order rotated each round), each
turn about half a second of steps (at least one); samples/s is the median over the rounds. Compile seconds: the
first step in the memory probe's process, whose Inductor cache is its own and starts empty (a tiny compile first
takes Inductor's one-time start), so no method reuses another's kernels; with --no-memory, the first step in this
process, whose cache the methods share. Peak memory: each method in a subprocess of its own, over steady-state
steps, above the model and its batch: on CUDA torch.cuda.max_memory_allocated; on CPU the peak of live tensors
from the profiler's allocation events (the same measure for the CPU allocator), and apart, in the JSON, the peak
resident set size (Linux VmHWM, reset after the warm-up steps through /proc/self/clear_refs), which also counts what
compiling keeps.
A method that fails on a model is a row "failed: <ExceptionType>: <first line>".

Run: pip install -e ".[bench]" && OMP_NUM_THREADS=1 python benchmarks/throughput.py [--quick] [--models ...]
[--methods ...] (one thread per process is steadier on a shared CPU). Prints a markdown table and writes
benchmarks/results/throughput.{md,json,png} (throughput_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import importlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path

import models
import torch
import torch.nn as nn
from models import Batch, PerSampleCrossEntropy, Workload
from torch.func import functional_call, grad, vmap

import bkcompile
from bkcompile.runtime.ledger import ledger_of

RESULTS = Path(__file__).resolve().parent / "results"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MAX_GRAD_NORM, NOISE_MULTIPLIER, LR = 1.0, 1.0, 1e-3
WARMUP_STEPS, MEMORY_STEPS = 2, 2  # warm-up: compile, then one more step before timing or resetting the peak
ROUNDS, ROUND_SECONDS = 4, 0.5
QUICK_ROUNDS, QUICK_ROUND_SECONDS = 2, 0.05
PROBE_TIMEOUT_S, PROBE_WORKERS = 900, 2  # memory probes run two at a time: each measures its own process
MB = 2**20
PRELOADED = ("opacus", "torch._inductor.compile_fx")  # imported before memory is measured
MEMORY_NOTE = {
    "cuda": "torch.cuda.max_memory_allocated over steady-state steps, above the model and its batch",
    "cpu": "the peak of live CPU tensors over a steady-state step, above the model and its batch, from the "
    "profiler's allocation events (the CPU counterpart of torch.cuda.max_memory_allocated); the "
    "JSON also has each subprocess's peak RSS above its RSS after building the model and its batch "
    "(`rss_peak_mb`, which counts what compiling keeps, such as compiled code)",
}

GPT2, GPT2_QUICK = dict(layers=4, width=256, heads=4, vocab=1024), dict(layers=1, width=32, heads=2, vocab=64)
WORKLOADS: dict[str, tuple[Callable[[], Workload], Callable[[], Workload]]] = {  # name: (full size, --quick size)
    "gpt2-t128": (
        partial(models.gpt2, **GPT2, seq_len=128, batch=8),
        partial(models.gpt2, **GPT2_QUICK, seq_len=16, batch=4),
    ),
    "gpt2-t512": (
        partial(models.gpt2, **GPT2, seq_len=512, batch=2),
        partial(models.gpt2, **GPT2_QUICK, seq_len=32, batch=2),
    ),
    "vit": (
        partial(models.vit, image=32, patch=4, width=192, layers=4, heads=3, batch=16),
        partial(models.vit, image=8, patch=4, width=16, layers=1, heads=2, batch=4),
    ),
    "resnet-gn": (
        partial(models.resnet_gn, widths=(32, 64, 128), image=32, batch=32),
        partial(models.resnet_gn, widths=(8, 16), image=8, batch=4),
    ),
    "mlp": (
        partial(models.mlp, d_in=784, hidden=512, layers=2, classes=10, batch=256),
        partial(models.mlp, d_in=16, hidden=32, layers=2, classes=10, batch=8),
    ),
}

Step = Callable[[], None]


# --- methods: each sets up a model copy for training on the batch and returns its training step -----------------


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of every method: plain SGD over the model's parameters."""
    return torch.optim.SGD(model.parameters(), lr=LR)


def training_step(forward: Callable, criterion: Callable, optimizer, batch: Batch) -> Step:
    """zero_grad, forward, the loss on the outputs, backward, optimizer step."""
    inputs, targets = batch

    def step() -> None:
        optimizer.zero_grad()
        criterion(forward(*inputs), targets).backward()
        optimizer.step()

    return step


def nonprivate_compile(model: nn.Module, batch: Batch, *, backend: str) -> Step:
    """Ordinary training of ``torch.compile(model, backend=backend)``."""
    return training_step(torch.compile(model, backend=backend), PerSampleCrossEntropy(), sgd(model), batch)


def bk_dp(model: nn.Module, batch: Batch, *, compiler: str, dp_optimizer: bool, clipping: str = "all-layer") -> Step:
    """bk_dp with ``compiler`` inside; plain SGD on the clipped sums, or bkcompile.DPOptimizer (noise) around it.
    A step in which no bk_dp backward ran (dynamo fell back to eager, which is not private) is an error."""
    options = {"max_grad_norm": MAX_GRAD_NORM, "compiler": compiler, "clipping": clipping, "loss_reduction": "mean"}
    compiled = torch.compile(model, backend="bk_dp", options=options)  # PerSampleCrossEntropy: a batch mean
    optimizer = sgd(model)
    if dp_optimizer:
        optimizer = bkcompile.DPOptimizer(
            optimizer, noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM, expected_batch_size=len(batch[1])
        )
    step = training_step(compiled, PerSampleCrossEntropy(), optimizer, batch)

    def backwards() -> int:  # bk_dp backwards recorded in the model's step ledger
        ledger = ledger_of(model)
        state = ledger.last_state() if ledger is not None else None
        return state.backwards if state is not None else 0

    def checked_step() -> None:
        before = backwards()
        step()
        if backwards() == before:
            raise RuntimeError("no bk_dp backward ran: dynamo ran the model in eager, which is not private")

    return checked_step


def opacus(model: nn.Module, batch: Batch, *, mode: str) -> Step:
    """Opacus's PrivacyEngine.make_private with ``grad_sample_mode`` = ``mode`` ("hooks" or "ghost"), flat
    clipping, no Poisson sampling (its loader only tells Opacus the batch size; the step trains on ``batch``).
    Ghost clipping trains through the DPLossFastGradientClipping criterion wrapper that make_private returns."""
    from opacus import PrivacyEngine  # the bench extra
    from torch.utils.data import DataLoader, TensorDataset

    inputs, targets = batch
    criterion = PerSampleCrossEntropy()
    private = PrivacyEngine().make_private(
        module=model,
        optimizer=sgd(model),
        criterion=criterion,
        data_loader=DataLoader(TensorDataset(*inputs, targets), batch_size=len(targets)),
        noise_multiplier=NOISE_MULTIPLIER,
        max_grad_norm=MAX_GRAD_NORM,
        poisson_sampling=False,
        grad_sample_mode=mode,
    )
    module, optimizer = private[:2]
    return training_step(module, private[2] if mode == "ghost" else criterion, optimizer, batch)


def func_vmap(model: nn.Module, batch: Batch, *, compiled: bool) -> Step:
    """Per-sample gradients by torch.func (vmap of grad of one sample's loss), clipped to R and summed into
    ``p.grad``, then an SGD step; ``compiled``: the clipped sums through torch.compile (Inductor), else eager."""
    inputs, targets = batch
    criterion = PerSampleCrossEntropy()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def sample_loss(values: dict, *sample: torch.Tensor) -> torch.Tensor:
        *x, y = (t.unsqueeze(0) for t in sample)
        return criterion(functional_call(model, {**values, **buffers}, tuple(x)), y)

    def clipped_sums(values: dict, *samples: torch.Tensor) -> dict:
        grads = vmap(grad(sample_loss), in_dims=(None,) + (0,) * len(samples))(values, *samples)
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()]).norm(dim=0)
        factors = (MAX_GRAD_NORM / (norms + 1e-6)).clamp(max=1.0)
        return {name: torch.einsum("b,b...->...", factors, g) for name, g in grads.items()}

    sums = torch.compile(clipped_sums) if compiled else clipped_sums
    optimizer = sgd(model)

    def step() -> None:
        optimizer.zero_grad()
        for name, total in sums({name: p.detach() for name, p in params.items()}, *inputs, targets).items():
            params[name].grad = total
        optimizer.step()

    return step


METHODS: dict[str, Callable[[nn.Module, Batch], Step]] = {
    "compile": partial(nonprivate_compile, backend="inductor"),
    "compile-aot_eager": partial(nonprivate_compile, backend="aot_eager"),
    "bk_dp-inductor": partial(bk_dp, compiler="inductor", dp_optimizer=False),
    "bk_dp-inductor+DPOptimizer": partial(bk_dp, compiler="inductor", dp_optimizer=True),
    "bk_dp-aot_eager": partial(bk_dp, compiler="aot_eager", dp_optimizer=False),
    "bk_dp-inductor-layer-wise": partial(bk_dp, compiler="inductor", dp_optimizer=False, clipping="layer-wise"),
    "bk_dp-inductor-param-wise": partial(bk_dp, compiler="inductor", dp_optimizer=False, clipping="param-wise"),
    "opacus-hooks": partial(opacus, mode="hooks"),
    "opacus-ghost": partial(opacus, mode="ghost"),
    "func-vmap": partial(func_vmap, compiled=False),
    "func-vmap-compiled": partial(func_vmap, compiled=True),
}
# kept out of the default run's 15 minutes
ON_REQUEST = (
    "bk_dp-inductor+DPOptimizer",
    "compile-aot_eager",
    "bk_dp-inductor-layer-wise",
    "bk_dp-inductor-param-wise",
)
DEFAULT_METHODS = [method for method in METHODS if method not in ON_REQUEST]
BASELINE, BK_DP = "compile", "bk_dp-inductor"
DP_BASELINES = ("opacus-hooks", "opacus-ghost", "func-vmap", "func-vmap-compiled")  # BK_DP's speed-up is reported


# --- measuring ---------------------------------------------------------------------------------------------------


def workload(name: str, quick: bool) -> Workload:
    """The workload ``name`` at its full or its --quick size."""
    return WORKLOADS[name][quick]()


def synchronize() -> None:
    """Wait for the GPU's queued work (nothing to wait for on CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(step: Step, steps: int = 1) -> float:
    """Seconds that ``steps`` calls of ``step`` take (the device synchronised before and after)."""
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize()
    return time.perf_counter() - start


def describe_failure(error: Exception) -> str:
    """``failed: <ExceptionType>: <first line>``, of the backend's own error when dynamo wraps it."""
    while getattr(error, "inner_exception", None) is not None:
        error = error.inner_exception
    lines = str(error).strip().splitlines()
    return f"failed: {type(error).__name__}: {lines[0] if lines else ''}".strip()


@dataclass
class Trial:
    """One method on one model in the throughput process: its result row and, while it runs, its step."""

    row: dict
    step: Step | None = None
    step_s: float = 0.0
    rates: list[float] = field(default_factory=list)

    def fail(self, error: Exception) -> None:
        self.row["error"] = describe_failure(error)
        self.step = None
        print(f"  {self.row['method']}: {self.row['error']}", file=sys.stderr)


def start_trial(method: str, base: nn.Module, batch: Batch, model_name: str) -> Trial:
    """Set ``method`` up on a copy of ``base``; time its first step (compiling) and a warm-up step."""
    trial = Trial({"model": model_name, "method": method})
    try:
        trial.step = METHODS[method](copy.deepcopy(base), batch)
        trial.row["compile_s"] = timed(trial.step)
        trial.step_s = timed(trial.step, WARMUP_STEPS - 1)
        print(f"  {method}: first step {trial.row['compile_s']:.1f} s, then {trial.step_s:.3f} s", file=sys.stderr)
    except Exception as error:  # a method that fails on a model is a result, not the end of the run
        trial.fail(error)
    return trial


def interleave(trials: list[Trial], batch_size: int, rounds: int, round_seconds: float) -> None:
    """``rounds`` turns of about ``round_seconds`` of steps for each running trial, in an order rotated each
    round; each turn appends the trial's samples/s."""
    for index in range(rounds):
        running = [trial for trial in trials if trial.step is not None]
        shift = index % max(len(running), 1)
        for trial in running[shift:] + running[:shift]:
            steps = max(1, round(round_seconds / trial.step_s))
            try:
                trial.rates.append(steps * batch_size / timed(trial.step, steps))
            except Exception as error:
                trial.fail(error)


def warm_up_inductor() -> None:
    """Compile a tiny forward and backward with Inductor: its one-time start (about 15 s on a 2-core CPU, the
    compile workers and the C++ toolchain's first use) is then charged to no method's compile time."""
    x = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    torch.compile(lambda t: (t.sin() * 2).sum())(x).backward()


def benchmark_model(name: str, methods: list[str], quick: bool) -> tuple[dict, list[dict]]:
    """Compile seconds and median samples/s of each method on one model, in this process.
    Returns the workload's description and the result rows."""
    spec = workload(name, quick)
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = spec.build().to(DEVICE).train()
    batch = spec.batch(DEVICE)
    info = {
        "description": spec.description,
        "batch_size": spec.batch_size,
        "parameters": sum(p.numel() for p in base.parameters()),
    }
    print(f"[{name}] {spec.description}, batch {spec.batch_size}", file=sys.stderr)
    trials = [start_trial(method, base, batch, name) for method in methods]
    interleave(trials, spec.batch_size, *((QUICK_ROUNDS, QUICK_ROUND_SECONDS) if quick else (ROUNDS, ROUND_SECONDS)))
    for trial in trials:
        if trial.step is not None:
            trial.row.update(samples_per_s=statistics.median(trial.rates), rounds=trial.rates)
    return info, [trial.row for trial in trials]


# --- peak memory, one subprocess per method ----------------------------------------------------------------------


def status_bytes(key: str) -> int:
    """A memory field of /proc/self/status (Linux), in bytes: VmRSS is the resident set size now, VmHWM its peak.
    (ru_maxrss is no substitute: it keeps the peak of the parent that started this process.)"""
    return int(Path("/proc/self/status").read_text().split(f"{key}:")[1].split()[0]) * 1024


def reset_rss_peak() -> None:
    """Restart the RSS high-water mark at the RSS now, after returning freed heap to the OS (Linux)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def cpu_tensor_peak(step: Step) -> int:
    """Peak bytes of CPU tensors alive during one steady-state ``step``, above those alive before the step before it.

    The profiler reports each tensor allocation and the free of each allocation it saw; two steps are recorded and
    the peak is read in the second, by when every tensor a step keeps (such as the gradients) was allocated in the
    first. This is what torch.cuda.max_memory_allocated measures on a GPU, for the CPU allocator."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        with torch.profiler.record_function("measured step"):
            step()
    events = prof.profiler.kineto_results.events()
    window = next(event for event in events if event.name() == "measured step")
    live, peak = 0, 0
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += event.nbytes()
        if window.start_ns() <= event.start_ns() <= window.end_ns():
            peak = max(peak, live)
    return peak


def probe_memory(name: str, method: str, quick: bool) -> dict:
    """Peak memory of ``method`` on model ``name`` over steady-state steps, above the model and its batch: on CUDA
    the allocator's peak, on CPU the tensors' peak (``cpu_tensor_peak``) and, apart, the resident set size's
    (``rss_peak_mb``, which also counts what compiling keeps, such as the compiled code and graphs). Run in a process
    of its own (``--probe``); the libraries that methods import on first use are imported before, for every
    method."""
    spec = workload(name, quick)
    for module in PRELOADED:
        if importlib.util.find_spec(module.partition(".")[0]) is not None:  # opacus: the bench extra
            importlib.import_module(module)
    warm_up_inductor()
    torch.manual_seed(0)
    model = spec.build().to(DEVICE).train()
    batch = spec.batch(DEVICE)
    gc.collect()
    cuda = DEVICE.type == "cuda"
    start = torch.cuda.memory_allocated() if cuda else status_bytes("VmRSS")
    try:
        step = METHODS[method](model, batch)
        compiled = {"cold_compile_s": timed(step)}  # this process's Inductor cache starts empty (measure_memory)
        timed(step, WARMUP_STEPS - 1)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            timed(step, MEMORY_STEPS)
            return {"peak_mb": (torch.cuda.max_memory_allocated() - start) / MB, **compiled}
        reset_rss_peak()
        timed(step, MEMORY_STEPS)
        peak = cpu_tensor_peak(step) / MB
        return {"peak_mb": peak, "rss_peak_mb": (status_bytes("VmHWM") - start) / MB, **compiled}
    except Exception as error:
        return {"memory_error": describe_failure(error)}


def measure_memory(name: str, method: str, quick: bool) -> dict:
    """probe_memory in a subprocess (this script with ``--probe``) with an Inductor cache of its own, empty: its
    first step is the method's cold compile. Its last line of output is the JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--probe", name, method] + ["--quick"] * quick
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
        done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        return {"memory_error": f"failed: the probe exited with {done.returncode}: {last}"}
    return json.loads(lines[-1])


# --- the report --------------------------------------------------------------------------------------------------


def add_ratios(rows: list[dict]) -> None:
    """Throughput and peak-memory ratios to the non-private compile of the same model, and bk_dp-inductor's
    speed-up over each DP baseline (where both sides have a result)."""

    def result(model: str, method: str, key: str) -> float | None:
        return next((row.get(key) for row in rows if row["model"] == model and row["method"] == method), None)

    for row in rows:
        base_rate = result(row["model"], BASELINE, "samples_per_s")
        base_peak = result(row["model"], BASELINE, "peak_mb")
        bk_rate = result(row["model"], BK_DP, "samples_per_s")
        if row.get("samples_per_s") and base_rate:
            row["throughput_ratio"] = row["samples_per_s"] / base_rate
        if row.get("peak_mb") and base_peak:
            row["memory_ratio"] = row["peak_mb"] / base_peak
        base_compile = result(row["model"], BASELINE, "cold_compile_s")
        if row.get("cold_compile_s") and base_compile:
            row["compile_ratio"] = row["cold_compile_s"] / base_compile
        if row["method"] in DP_BASELINES and row.get("samples_per_s") and bk_rate:
            row["bk_dp_speedup"] = bk_rate / row["samples_per_s"]


def environment() -> dict:
    """Date, device, library versions, threads and the repository commit of this run."""

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).resolve().parent
    ).stdout.strip()
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    return {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "torch": torch.__version__,
        "opacus": version("opacus"),
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "commit": commit or None,
    }


def markdown(results: dict) -> str:
    """The models, then one table row per model and method."""
    env = results["environment"]
    lines = [
        f"{env['date']}, {env['device']}, torch {env['torch']}, Opacus {env['opacus']}, transformers "
        f"{env['transformers']}, {env['threads']} threads, commit {env['commit']}",
        "",
    ]
    lines += [
        f"- `{name}`: {info['description']}, batch {info['batch_size']}, {info['parameters'] / 1e6:.2f}M parameters"
        for name, info in results["workloads"].items()
    ]
    lines += [
        "",
        "| model | method | samples/s (rounds' range) | × non-private | peak memory (MB) | memory × "
        "| compile (s) | compile × | bk_dp-inductor speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(row: dict, key: str, form: str) -> str:
        return format(row[key], form) if key in row else ""

    for row in results["rows"]:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['method']} | {row['error']} | | | | | | |")
            continue
        memory = cell(row, "peak_mb", ".0f") or row.get("memory_error", "")
        spread = f"{min(row['rounds']):.1f}–{max(row['rounds']):.1f}"
        lines.append(
            f"| {row['model']} | {row['method']} | {row['samples_per_s']:.1f} ({spread}) | "
            f"{cell(row, 'throughput_ratio', '.2f')} | {memory} | {cell(row, 'memory_ratio', '.2f')} | "
            f"{row.get('cold_compile_s', row['compile_s']):.1f} | {cell(row, 'compile_ratio', '.2f')} | "
            f"{cell(row, 'bk_dp_speedup', '.2f')} |"
        )
    lines += [
        "",
        f"× non-private and memory ×: over the `{BASELINE}` row of the model; bk_dp-inductor speed-up: its "
        "samples/s over the row's; compile: the first step's seconds, in the memory probe's process with an "
        "Inductor cache of its own, empty (in the throughput process, whose cache the methods share, without the "
        "probes); compile ×: over the non-private row's; peak memory: "
        f"{MEMORY_NOTE[DEVICE.type]}.",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Bars of the throughput ratio and the peak-memory ratio (to the non-private compile, log scale) per model and
    method, with the bk_dp goals (>= 0.9x throughput; <= 1.25x memory, <= 1.1x layer-wise) as dashed lines.
    Without matplotlib (the bench extra) the results are written without the PNG, and the run says so."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib (the bench extra) is not installed: {path.name} not written", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_names = list(results["workloads"])
    methods = [m for m in METHODS if m != BASELINE and any(r["method"] == m for r in results["rows"])]
    figure, axes = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / max(len(methods), 1)
    for axis, key, goals, title in (
        (axes[0], "throughput_ratio", (0.9,), "throughput / non-private compile"),
        (axes[1], "memory_ratio", (1.25, 1.1), "peak memory / non-private compile (goals: all-layer, layer-wise)"),
    ):
        for offset, method in enumerate(methods):
            values = [
                next(
                    (
                        r.get(key, float("nan"))
                        for r in results["rows"]
                        if r["model"] == model and r["method"] == method
                    ),
                    float("nan"),
                )
                for model in model_names
            ]
            axis.bar(
                [i + (offset - (len(methods) - 1) / 2) * width for i in range(len(model_names))],
                values,
                width,
                label=method,
            )
        axis.axhline(1.0, color="black", linewidth=0.8)
        for goal in goals:
            axis.axhline(goal, color="gray", linestyle="--", linewidth=0.8)
        axis.set_yscale("log")
        axis.set_xticks(range(len(model_names)), model_names)
        axis.set_title(title)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(methods), fontsize=8)
    env = results["environment"]
    figure.suptitle(f"{env['device']}, torch {env['torch']} ({env['date']}); a missing bar: the method failed")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(results: dict, out: Path, stem: str) -> str:
    """Write ``stem``.md, .json and .png under ``out``; return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    (out / f"{stem}.md").write_text(text + "\n")
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / f"{stem}.png")
    return text


def run(model_names: list[str], methods: list[str], quick: bool, memory: bool) -> dict:
    """Benchmark every model (throughput here, then peak memory in subprocesses) and add the ratios."""
    results = {"environment": environment(), "workloads": {}, "rows": []}
    warm_up_inductor()
    for name in model_names:
        info, rows = benchmark_model(name, methods, quick)
        probed = [row for row in rows if memory and "error" not in row]
        with ThreadPoolExecutor(PROBE_WORKERS) as pool:
            peaks = pool.map(partial(measure_memory, name, quick=quick), [row["method"] for row in probed])
            for row, peak in zip(probed, peaks):
                row.update(peak)
        results["workloads"][name] = info
        results["rows"] += rows
    add_ratios(results["rows"])
    return results


def parse_args() -> argparse.Namespace:
    """The command line (``--probe MODEL METHOD`` is the memory subprocess's, not for people)."""
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--models", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    parser.add_argument("--quick", action="store_true", help="tiny models and batches, short rounds: a smoke run")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the .md, .json and .png results")
    parser.add_argument("--probe", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    """Run the benchmark and write its results, or, with ``--probe``, print one method's peak memory as JSON."""
    args = parse_args()
    if args.probe:
        print(json.dumps(probe_memory(*args.probe, args.quick)))
        return
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # compile times from an empty cache; probes inherit it
        results = run(args.models, args.methods, args.quick, args.memory)
    print(write_results(results, args.out, "throughput_quick" if args.quick else "throughput"))


if __name__ == "__main__":
    main()
