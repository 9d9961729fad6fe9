"""The most a per-site choice of strategy can reach: each matrix-product site of a model timed alone, both ways.

For each site of the model's report (``bkcompile.explain``, the clipping asked) whose kind is a matrix product over
the samples (a linear layer's weight: ``mm(g^T, a)``, g (B*T, p), a (B*T, d)), three functions of the site's sizes
compiled by Inductor and timed alone, in one process:

  ordinary  mm(g^T, a): the weight gradient non-private training computes
  ghost     each sample's Gram matrices a_i a_i^T and g_i g_i^T, their inner product (the squared norms), and the
            weight gradient with the narrower operand's rows scaled by per-sample weights (book-keeping)
  explicit  the per-sample products g_i^T a_i (B, p, d), their squared norms, and their weighted sum

A strategy's extra time is its time less the ordinary one. The floor is the sum over the sites of the cheaper
strategy's extra time, and the ceiling is the non-private compiled step over (that step + the floor): no private step
that clips these sites by these two strategies can exceed it, since it counts no other work (the norm layers' and
biases' sums, the clip factors, the run-time calls), and every site is timed at its own best. The table also says
whether the pass's choice (``auto``) was the cheaper one measured here. Sites of other kinds (convolutions,
embeddings, per-sample sums) and batched products (einsum weights with a leading dim) are listed as not timed.

The floor is for layer-wise (and group-wise) clipping, where each site's per-sample values are freed once its group
is clipped: under all-layer clipping the explicit strategy holds them until every norm is known, which a site timed
alone does not count.

Timings move by 10% or more between runs on a shared CPU: each function's time is the median of ``--repeats``
calls, and the non-private step's the median of as many steps, taken in the same process.

Run: OMP_NUM_THREADS=2 python benchmarks/site_floor.py [--models vit gpt2-t128] [--clipping layer-wise]
[--repeats 30] [--out benchmarks/results]; writes site_floor_<clipping>.md there.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import statistics
from collections.abc import Callable
from pathlib import Path

import throughput
import torch

import bkcompile

RESULTS = Path(__file__).resolve().parent / "results"


def ordinary(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.mm(g.t(), a)


def ghost(g: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    batch = w.shape[0]
    g3, a3 = g.view(batch, -1, g.shape[1]), a.view(batch, -1, a.shape[1])
    squares = (torch.bmm(a3, a3.transpose(1, 2)) * torch.bmm(g3, g3.transpose(1, 2))).sum((1, 2))
    rows = (w * squares).repeat_interleave(g3.shape[1])[:, None]  # weights that depend on the norms, as clipping's
    return torch.mm((g * rows).t(), a) if g.shape[1] <= a.shape[1] else torch.mm(g.t(), a * rows)


def explicit(g: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    batch = w.shape[0]
    g3, a3 = g.view(batch, -1, g.shape[1]), a.view(batch, -1, a.shape[1])
    grads = torch.bmm(g3.transpose(1, 2), a3).view(batch, -1)
    squares = (grads * grads).sum(1)
    return (grads * (w * squares)[:, None]).sum(0)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    return statistics.median(throughput.timed(fn) for _ in range(repeats))


@dataclasses.dataclass
class SiteTimes:
    ordinary_s: float
    ghost_s: float
    explicit_s: float

    @property
    def cheaper(self) -> str:
        return "ghost" if self.ghost_s < self.explicit_s else "explicit"

    @property
    def floor_s(self) -> float:
        return min(self.ghost_s, self.explicit_s) - self.ordinary_s


def time_site(batch: int, rows: int, p: int, d: int, repeats: int, compile_fns: bool) -> SiteTimes:
    """The three functions at one site's sizes, each compiled for them (dynamo reset first: a model has more
    sizes than dynamo recompiles one function for) unless not ``compile_fns``."""
    torch._dynamo.reset()
    fns = (ordinary, ghost, explicit)
    compiled = {fn.__name__: torch.compile(fn, dynamic=False) if compile_fns else fn for fn in fns}
    device = throughput.DEVICE
    g, a = torch.randn(batch * rows, p, device=device), torch.randn(batch * rows, d, device=device)
    w = torch.rand(batch, device=device)
    return SiteTimes(
        median_seconds(lambda: compiled["ordinary"](g, a), repeats),
        median_seconds(lambda: compiled["ghost"](g, a, w), repeats),
        median_seconds(lambda: compiled["explicit"](g, a, w), repeats),
    )


def matmul_sizes(row) -> tuple[int, int, int, int] | None:
    """(B, T, p, d) of a single-product matmul site of a static report, else None."""
    if row.kind != "matmul":
        return None
    sizes = tuple(int(row.sizes[k]) for k in ("B", "T", "p", "d"))
    batch, _, p, d = sizes
    values_per_sample = row.explicit_values[1] / (batch * p * d)
    return sizes if values_per_sample in (4.0, 8.0) else None  # one product (not L of them), float32 or float64


def model_floor(name: str, clipping: str, repeats: int, quick: bool = False, compile_fns: bool = True):
    """The table rows of one model, its non-private step's seconds and its floor's; ``quick``: the throughput
    benchmark's tiny workload, ``compile_fns``: the three functions through Inductor (else eager)."""
    spec = throughput.workload(name, quick=quick)
    torch.manual_seed(0)
    model = spec.build().train()
    batch = spec.batch(throughput.DEVICE)
    options = {"clipping": clipping, "loss_reduction": "sum", "compiler": "aot_eager"}
    report = bkcompile.explain(copy.deepcopy(model), *batch[0], dynamic_batch=False, **options)
    step_s = median_seconds(throughput.METHODS["compile"](copy.deepcopy(model), batch), repeats)
    measured: dict[tuple[int, ...], SiteTimes] = {}
    rows, floor_s = [], 0.0
    for row in report.rows:
        sizes = matmul_sizes(row)
        if sizes is None:
            rows.append(f"| {name} | {row.param} | {row.kind} | | | | | {row.strategy} | not timed |")
            continue
        if sizes not in measured:
            measured[sizes] = time_site(*sizes, repeats, compile_fns)
        site = measured[sizes]
        floor_s += site.floor_s
        extra = [1e3 * (s - site.ordinary_s) for s in (site.ghost_s, site.explicit_s)]
        rows.append(
            f"| {name} | {row.param} | B={sizes[0]} T={sizes[1]} p={sizes[2]} d={sizes[3]} "
            f"| {1e3 * site.ordinary_s:.2f} | {extra[0]:+.2f} | {extra[1]:+.2f} | {site.cheaper} | {row.strategy} "
            f"| {'yes' if row.strategy == site.cheaper else 'no'} |"
        )
    return rows, step_s, floor_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(throughput.WORKLOADS), default=["vit", "gpt2-t128"])
    parser.add_argument("--clipping", default="layer-wise")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="the tiny workloads: a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    throughput.warm_up_inductor()
    head = "| model | parameter | sizes | ordinary ms | ghost extra ms | explicit extra ms | cheaper | auto | same |"
    table, summary = [head, "|" + "---|" * 9], []
    for name in args.models:
        rows, step_s, floor_s = model_floor(name, args.clipping, args.repeats, args.quick)
        table += rows
        summary.append(
            f"- {name}: non-private step {1e3 * step_s:.1f} ms, floor {1e3 * floor_s:.1f} ms, ceiling "
            f"{step_s / (step_s + floor_s):.3f}x (0.95x leaves {1e3 * step_s * (1 / 0.95 - 1):.1f} ms)"
        )
    env = throughput.environment()
    title = (
        f"# Per-site floor, {args.clipping} clipping (benchmarks/site_floor.py)\n\n"
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {env['device']}, {env['threads']} threads, "
        f"torch {env['torch']}, commit {env['commit']}, the median of {args.repeats} calls each.\n"
    )
    text = "\n".join([title, *summary, "", *table])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"site_floor_{args.clipping}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
