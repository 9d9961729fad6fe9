"""Check the cost model: time ghost against explicit norms for each site kind over a grid of sizes, and count how
often the time model's choice (strategy "fastest": the faster by the predicted seconds, no memory limit) was the
faster one, and how often the FLOP count's (the fewer FLOPs, what "fastest" chose before the time model) was.

Run: python benchmarks/calibrate_cost.py [--repeats 7] [--quick]
It first measures this machine's kernel rates again (``bkcompile.calibrate``). Writes
benchmarks/results/calibration.md and .json. Timings are medians of interleaved repeats of one forward + backward
(aot_eager, so the compile is quick); what differs between the two is the norm work.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch
from torch import nn

import bkcompile

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


class Linear(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width, bias=False)

    def forward(self, x):
        return self.fc(x).sum(1)


class Embed(nn.Module):
    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, width)

    def forward(self, ids):
        return self.table(ids).sum(1)


class Conv(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv(x).sum((2, 3))


def grid(quick: bool) -> list[tuple[str, str, nn.Module, torch.Tensor]]:
    """(kind, sizes, model, batch) for every point of the grid."""
    batch = 16
    points = []
    for tokens in (1, 4, 16, 64) if not quick else (1, 16):
        for width in (32, 128, 512) if not quick else (32,):
            points.append(("linear", f"T={tokens} p=d={width}", Linear(width), torch.randn(batch, tokens, width)))
    for tokens in (8, 64) if not quick else (8,):
        for vocab in (100, 5000):
            points.append(
                ("embedding", f"T={tokens} V={vocab} d=64", Embed(vocab, 64), torch.randint(0, vocab, (batch, tokens)))
            )
    for channels, side in ((8, 8), (32, 16), (64, 32)) if not quick else ((8, 8),):
        points.append(
            ("conv", f"C={channels} HxW={side}x{side} k=3", Conv(channels), torch.randn(batch, channels, side, side))
        )
    return points


def _step(compiled: nn.Module, example: torch.Tensor) -> float:
    start = time.perf_counter()
    compiled(example).square().mean().backward()
    return time.perf_counter() - start


def measure(model: nn.Module, example: torch.Tensor, repeats: int) -> dict:
    """Median step time of each strategy (interleaved), and the strategy "fastest" picks."""
    compiled = {}
    for strategy in ("ghost", "explicit", "fastest"):
        compiled[strategy] = torch.compile(
            model,
            backend="bk_dp",
            options={"max_grad_norm": 1.0, "compiler": "aot_eager", "strategy": strategy, "loss_reduction": "mean"},
        )  # _step's loss: a mean over the batch
        _step(compiled[strategy], example)  # compile
        if strategy == "fastest":
            row = next(r for r in bkcompile.last_report().rows if r.strategy != "direct")
            choice = row.strategy
            by_flops = "ghost" if row.ghost_values[0] <= row.explicit_values[0] else "explicit"
            predicted = {"ghost_ms": 1e3 * row.ghost_seconds, "explicit_ms": 1e3 * row.explicit_seconds}
    times = {"ghost": [], "explicit": []}
    for _ in range(repeats):
        for strategy in times:
            times[strategy].append(_step(compiled[strategy], example))
    medians = {k: statistics.median(v) for k, v in times.items()}
    fastest = {k: min(v) for k, v in times.items()}  # the least disturbed by other processes
    return {
        **{f"{k}_ms": 1e3 * v for k, v in medians.items()},
        **{f"{k}_min_ms": 1e3 * v for k, v in fastest.items()},
        "predicted_added_ms": predicted,
        "choice": choice,
        "flops_choice": by_flops,
        "faster": min(medians, key=medians.get),
        "faster_by_min": min(fastest, key=fastest.get),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="a few points, for a smoke run")
    args = parser.parse_args()
    torch.manual_seed(0)
    ((key, rates),) = bkcompile.calibrate("cpu", (torch.float32,)).items()
    print(key, rates, flush=True)
    rows = []
    for kind, sizes, model, example in grid(args.quick):
        torch._dynamo.reset()
        rows.append({"kind": kind, "sizes": sizes, **measure(model, example, args.repeats)})
        print(rows[-1], flush=True)
    agree = {
        (model, statistic): sum(r[model] == r[statistic] for r in rows)
        for model in ("choice", "flops_choice")
        for statistic in ("faster", "faster_by_min")
    }
    lines = [
        "| site | sizes (B=16) | ghost ms (median, min) | explicit ms (median, min) | predicted added ms (ghost / "
        "explicit) | time model's choice | FLOPs' choice | faster (median) | faster (min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['kind']} | {r['sizes']} | {r['ghost_ms']:.2f}, {r['ghost_min_ms']:.2f} | {r['explicit_ms']:.2f}, "
        f"{r['explicit_min_ms']:.2f} | {r['predicted_added_ms']['ghost_ms']:.3f} / "
        f"{r['predicted_added_ms']['explicit_ms']:.3f} | {r['choice']} | {r['flops_choice']} | {r['faster']} "
        f"| {r['faster_by_min']} |"
        for r in rows
    ]
    lines.append(
        f"\nThe time model's choice was the faster one at {agree['choice', 'faster']} of {len(rows)} points by the "
        f"median, {agree['choice', 'faster_by_min']} by the minimum; the FLOP count's at "
        f"{agree['flops_choice', 'faster']} and {agree['flops_choice', 'faster_by_min']}. {args.repeats} interleaved "
        f"repeats. Rates ({key}): mm {rates.mm / 1e9:.3g} GFLOP/s, bmm {rates.bmm / 1e9:.3g} GFLOP/s, bandwidth "
        f"{rates.bandwidth / 1e9:.3g} GB/s."
    )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "calibration.md").write_text(table + "\n")
    (RESULTS / "calibration.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "agree": {f"{model} vs {statistic}": n for (model, statistic), n in agree.items()},
                "points": len(rows),
                "rates": {"key": key, "mm": rates.mm, "bmm": rates.bmm, "bandwidth": rates.bandwidth},
                "torch": torch.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
