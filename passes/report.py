"""The cost-model report of one privatized graph (:class:`bkcompile.compiler.report.CostReport`), from what the
passes found."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import sympy
import torch
import torch.fx
from bkcompile.passes.cost import Strategy, estimate, evaluate, held_bytes, shared_grams

from bkcompile.compiler.report import CostReport, SiteRow
from bkcompile.errors import module_of, module_path, user_frame

if TYPE_CHECKING:
    from bkcompile.passes import PassState


def _shown_path(file: str) -> str:
    """``file`` from the longest entry of ``sys.path`` or the working directory it lies in
    (``peft/tuners/lora/layer.py``, ``examples/models.py``), else as it is."""
    path = os.path.abspath(file)
    roots = {os.path.abspath(p) for p in sys.path if p} | {os.getcwd()}
    inside = [root for root in roots if path.startswith(root.rstrip(os.sep) + os.sep)]
    return os.path.relpath(path, max(inside, key=len)) if inside else file


def _source(node: torch.fx.Node) -> str:
    """Where the site is in the user's code, else the module it is in."""
    frame = user_frame(node)
    if frame is not None:
        where = f"{_shown_path(frame.file)}:{frame.line} in {frame.function}"
        return f"{where}: {frame.code}" if frame.code else where
    return module_of(node) or "-"


def build_report(state: PassState) -> CostReport:
    """The report of one privatized graph (``state``: what the passes found)."""
    cost = state.cost
    itemsize = cost.norm_dtype.itemsize
    rows = []
    shared = shared_grams(list(cost.plans))
    for plan in cost.plans:
        for site in plan.costs:
            node = site.site.node

            def at(c, site=site):
                return (
                    evaluate(c.time, site.sizes, cost.compiled_sizes),
                    evaluate(c.memory, site.sizes, cost.compiled_sizes) * itemsize,
                )

            def seconds(strategy, site=site):
                at_sizes = (cost.compiled_sizes, cost.rates, itemsize, cost.groups, shared)
                return estimate([site], strategy, *at_sizes).seconds

            direct, module = site.ghost == site.explicit, module_path(node)
            rows.append(
                SiteRow(
                    param=plan.param.name,
                    kind=site.site.kind.name,
                    module=module[0] if module else "-",
                    module_type=module[1] if module else "-",
                    source=_source(node),
                    sizes={str(k): str(v) for k, v in site.sizes.items()},
                    strategy="direct" if direct else plan.strategy.value,
                    reason="per-sample sums" if direct else plan.describe(),
                    ghost_time=str(site.ghost.time) if site.ghost else None,
                    ghost_memory=str(site.ghost.memory * itemsize) if site.ghost else None,
                    explicit_time=str(site.explicit.time),
                    explicit_memory=str(site.explicit.memory * itemsize),
                    ghost_values=at(site.ghost) if site.ghost else None,
                    explicit_values=at(site.explicit),
                    ghost_seconds=seconds(Strategy.GHOST) if site.ghost else None,
                    explicit_seconds=seconds(Strategy.EXPLICIT),
                )
            )
    chosen = [plan.estimates[plan.strategy] for plan in cost.plans]
    budget = cost.budget
    mixes = {
        name: {"seconds": e.seconds, "bytes": e.bytes, "fits": budget.bytes is None or e.bytes <= budget.bytes}
        for name, e in cost.mixes.items()
    }
    batch = state.joint.batch
    options = {
        k: getattr(state.options, k) for k in ("max_grad_norm", "strategy", "memory_budget", "compiler", "clip_fn")
    }
    piece = state.role.piece
    inputs = state.joint.inputs
    groups = [
        {"name": group.name, "params": [inputs[m].name for m in group.members], "threshold": group.threshold}
        for group in state.grouping.groups
    ]
    return CostReport(
        rows=rows,
        batch=str(batch),
        batch_dynamic=not isinstance(batch, sympy.Integer),
        norm_dtype=str(cost.norm_dtype).removeprefix("torch."),
        loss_scale=state.scale.describe(),
        options=options,
        backward_flops=cost.backward_flops,
        total_flops=sum(e.flops for e in chosen),
        total_bytes=sum(e.bytes for e in chosen),
        predicted_s=sum(e.seconds for e in chosen),
        non_private_predicted_s=cost.non_private_seconds,
        held_bytes=held_bytes(list(cost.plans), {}, cost.groups),
        budget={"bytes": budget.bytes, "source": budget.source, "non_private_peak": budget.peak},
        mixes=mixes,
        rates={
            "mm": cost.rates.mm,
            "bmm": cost.rates.bmm,
            "bandwidth": cost.rates.bandwidth,
            "source": cost.rates.source,
            "small": [list(point) for point in cost.rates.small],
            "fresh": cost.rates.fresh,
        },
        groups=groups,
        graph=state.role.label,
        clipped="at the end of the backward, once for all the model's graphs (see last_clip_spans())"
        if piece
        else "in this graph",
    )
