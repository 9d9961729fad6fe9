"""bk_dp's explicit per-sample gradients against torch.func vmap(grad), both compiled by Inductor, on one site.

Each workload trains, by plain SGD on the clipped sums, with two methods from the same weights:

  explicit     torch.compile(model, backend="bk_dp", options={"strategy": "explicit", ...}) (Inductor inside)
  vmap         the throughput benchmark's func-vmap-compiled: vmap(grad) per-sample gradients, their norms, the
               clip factors and the weighted sum through torch.compile (Inductor)

The steps are timed in interleaved rounds in one process, each round keeping each method's fastest step (the
least disturbed by other work on the machine); the report is each round's speed ratio explicit / vmap (above 1:
explicit is faster), the median and the range. ``--dump DIR`` writes each method's Inductor
debug trace under DIR/<workload>/<method> (the post-grad graph ``fx_graph_transformed.py`` and the generated code
``output_code.py``) and prints a count of the ops and kernels of each; ``--profile`` prints the top ops of a few
profiled steps of each method (torch.profiler).

    python benchmarks/explicit_vs_vmap.py linear-256x256 linear-256x1024 --dump /tmp/explicit_vs_vmap --profile
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import models
import throughput
import torch
import torch._inductor.config as inductor_config
import torch.nn as nn
from models import Batch, PerSampleCrossEntropy, Workload

Step = Callable[[], None]
ROUNDS, ROUND_SECONDS = 9, 1.0
PROFILED_STEPS = 5
# the ops of a post-grad graph worth counting: the products, the layout changes and the reductions
COUNTED = ("mm", "bmm", "addmm", "permute", "clone", "copy", "view", "reshape", "expand", "sum", "mul", "cat")


def _site(module: nn.Module, batch: Callable[[torch.device], Batch], description: str, size: int) -> Workload:
    return Workload(description, size, lambda: module, batch)


def linear(p: int, d: int, batch: int = 8, tokens: int = 128) -> Workload:
    """One linear map d -> p (no bias) of (B, T, d) features, its outputs the logits of p classes per token."""

    def make_batch(device: torch.device) -> Batch:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, tokens, d, generator=generator)
        return (x.to(device),), torch.randint(0, p, (batch, tokens), generator=generator).to(device)

    return _site(nn.Linear(d, p, bias=False), make_batch, f"linear {d} -> {p}, B={batch}, T={tokens}", batch)


class Einsum(nn.Module):
    """A weight (p, d) applied by einsum: its gradient is the transpose of the product that sums over the samples."""

    def __init__(self, d: int, p: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(p, d) / d**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btd,pd->btp", x, self.weight)


def einsum(p: int, d: int, batch: int = 8, tokens: int = 128) -> Workload:
    """:func:`linear`'s site written as an einsum."""
    site = linear(p, d, batch, tokens)
    return _site(Einsum(d, p), site.batch, f"einsum {d} -> {p}, B={batch}, T={tokens}", batch)


def embedding(vocab: int, width: int, batch: int = 8, tokens: int = 128) -> Workload:
    """One embedding table (vocab, width) read at (B, T) ids, the rows the logits of ``width`` classes."""

    def make_batch(device: torch.device) -> Batch:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch, tokens), generator=generator)
        return (ids.to(device),), torch.randint(0, width, (batch, tokens), generator=generator).to(device)

    return _site(nn.Embedding(vocab, width), make_batch, f"embedding {vocab} x {width}, B={batch}, T={tokens}", batch)


def conv(c_in: int, c_out: int, image: int, batch: int = 8) -> Workload:
    """One 3x3 convolution (padding 1, no bias), its outputs pooled to the logits of ``c_out`` classes."""

    def make_batch(device: torch.device) -> Batch:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, c_in, image, image, generator=generator)
        return (x.to(device),), torch.randint(0, c_out, (batch,), generator=generator).to(device)

    module = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return _site(module, make_batch, f"conv {c_in} -> {c_out} 3x3, {image}x{image}, B={batch}", batch)


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "linear-16x16": lambda: linear(16, 16, tokens=4),  # products negligible: the step's fixed costs
    "linear-256x256": lambda: linear(256, 256),
    "linear-256x1024": lambda: linear(256, 1024),
    "einsum-256x1024": lambda: einsum(256, 1024),
    "embedding": lambda: embedding(1024, 256),
    "conv": lambda: conv(32, 64, 16),
    "gpt2-t128": lambda: throughput.workload("gpt2-t128", quick=False),
    "gpt2-2x128": lambda: models.gpt2(layers=2, width=128, heads=2, vocab=1024, seq_len=128, batch=8),
}


class WithLoss(nn.Module):
    """The model and its per-sample cross entropy in one module: the loss compiled with the model, as vmap's is."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.criterion = PerSampleCrossEntropy()

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        *inputs, targets = batch
        return self.criterion(self.model(*inputs), targets)


def explicit(model: nn.Module, batch: Batch) -> Step:
    """bk_dp with strategy "explicit" and Inductor inside on the model and its loss, plain SGD on the clipped
    sums."""
    options = {"max_grad_norm": throughput.MAX_GRAD_NORM, "strategy": "explicit", "compiler": "inductor"}
    compiled = torch.compile(WithLoss(model), backend="bk_dp", options=options)
    inputs, targets = batch
    optimizer = throughput.sgd(model)

    def step() -> None:
        optimizer.zero_grad()
        compiled(*inputs, targets).backward()
        optimizer.step()

    return step


METHODS: dict[str, Callable[[nn.Module, Batch], Step]] = {
    "explicit": explicit,
    "vmap": lambda model, batch: throughput.func_vmap(model, batch, compiled=True),
}


def count_graph(trace: Path) -> dict[str, int]:
    """Counts of the aten ops of ``COUNTED`` in the post-grad graphs under ``trace``, and of the generated kernels
    (``kernels``: Inductor's fused kernels; ``extern``: library calls such as mm and bmm)."""
    counts: Counter = Counter()
    for graph in sorted(trace.rglob("fx_graph_transformed.py")):
        for op in re.findall(r"torch\.ops\.aten\.(\w+)\.", graph.read_text()):
            if op in COUNTED:
                counts[op] += 1
    for code in trace.rglob("output_code.py"):
        text = code.read_text()
        counts["kernels"] += len(re.findall(r"^(?:cpp_fused|triton_\w+)\w* = ", text, re.MULTILINE))
        counts["extern"] += len(re.findall(r"extern_kernels\.\w+\(", text))
    return dict(sorted(counts.items()))


def start(method: str, base: nn.Module, batch: Batch, dump: Path | None, kernels: bool) -> tuple[Step, float]:
    """The method's step on a copy of ``base``, after its compiling step (traced under ``dump``; its generated
    kernels recorded by the profiler when ``kernels``) and one warm-up step; returns (step, the warm-up step's
    seconds)."""
    step = METHODS[method](copy.deepcopy(base), batch)
    patch = {"trace.enabled": dump is not None, "cpp.enable_kernel_profile": kernels}
    if dump is not None:  # a graph found in the cache writes no trace
        patch |= {"trace.debug_dir": str(dump / method), "fx_graph_cache": False}
    with inductor_config.patch(patch):
        step()
    return step, throughput.timed(step)


def profile(method: str, step: Step) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        throughput.timed(step, PROFILED_STEPS)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
    print(f"\n{method}: top ops over {PROFILED_STEPS} steps\n{table}")


def compare(name: str, dump: Path | None, show_profile: bool, rounds: int) -> dict:
    spec = WORKLOADS[name]()
    torch._dynamo.reset()
    torch.manual_seed(0)
    base = spec.build().to(throughput.DEVICE)
    batch = spec.batch(throughput.DEVICE)
    where = dump / name if dump is not None else None
    steps, seconds = {}, {}
    for method in METHODS:
        steps[method], seconds[method] = start(method, base, batch, where, show_profile)
        print(f"  {name} {method}: warm step {seconds[method]:.4f} s", file=sys.stderr)
    fastest: dict[str, list[float]] = {method: [] for method in METHODS}  # each round's fastest step, seconds
    for index in range(rounds):
        order = list(METHODS)[index % 2 :] + list(METHODS)[: index % 2]
        for method in order:
            count = max(3, round(ROUND_SECONDS / seconds[method]))
            fastest[method].append(min(throughput.timed(steps[method]) for _ in range(count)))
    ratios = [v / e for e, v in zip(fastest["explicit"], fastest["vmap"], strict=True)]
    result = {
        "workload": spec.description,
        "ratio": statistics.median(ratios),
        "range": (min(ratios), max(ratios)),
        "step_ms": {method: 1000 * min(times) for method, times in fastest.items()},
    }
    print(
        f"{name} ({spec.description}): explicit / vmap speed {result['ratio']:.3f} "
        f"[{result['range'][0]:.3f}, {result['range'][1]:.3f}] over {rounds} rounds; fastest step "
        + ", ".join(f"{m} {t:.2f} ms" for m, t in result["step_ms"].items())
    )
    if where is not None:
        for method in METHODS:
            print(f"  {method} graphs: {count_graph(where / method)}")
    if show_profile:
        for method in METHODS:
            profile(method, steps[method])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*", default=["linear-256x256", "linear-256x1024"], choices=WORKLOADS)
    parser.add_argument("--dump", type=Path, help="write each method's Inductor debug trace under this folder")
    parser.add_argument("--profile", action="store_true", help="print each method's top ops (torch.profiler)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (1: steady timings on a machine shared with other work)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    throughput.warm_up_inductor()
    for name in args.workloads:
        compare(name, args.dump, args.profile, args.rounds)


if __name__ == "__main__":
    main()
