"""The cost-model report: one row per site, what the pass chose for it and what each strategy costs.

Get it with ``bkcompile.explain(model, *example_inputs, **options)``, with ``options={"report": True}``
(printed when the backend compiles), or ``python -m bkcompile explain module:factory --input-shape ...``.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import types
from typing import Any

import torch
import torch.utils._pytree as pytree

from bkcompile.compiler.measure import TIMED_STEPS, non_private_compile, time_steps, training_step
from bkcompile.compiler.options import parse_options
from bkcompile.errors import BKError, LossReductionError, find_error
from bkcompile.runtime.batch import mark_batch_dynamic
from bkcompile.runtime.ledger import live_records, records_of

_EXPLAINED = itertools.count()  # names the code object of each explain() call


WIDTH = 120  # columns of the printed report; to_markdown() and to_dict() hold every column


@dataclasses.dataclass
class SiteRow:
    param: str  # the name named_parameters() gives
    kind: str
    module: str  # the user's dotted path of the module the site is in ("" the root module, "-" none)
    module_type: str  # the module's class ("-" none)
    source: str  # the user's line of code ("models.py:12 in forward: ..."), else the module
    sizes: dict[str, str]  # symbol -> size at this site
    strategy: str
    reason: str
    ghost_time: str | None  # sympy expressions (FLOPs, bytes)
    ghost_memory: str | None
    explicit_time: str
    explicit_memory: str
    ghost_values: tuple[float, float] | None  # (FLOPs, bytes) at the compiled sizes
    explicit_values: tuple[float, float]
    ghost_seconds: float | None  # predicted from the calibrated rates, at the compiled sizes
    explicit_seconds: float


@dataclasses.dataclass(frozen=True)
class Measurement:
    """A private step (forward and backward) timed against a non-private one, compiled alike, in one process."""

    private_s: float  # median seconds of a private step
    non_private_s: float  # median seconds of a non-private step (torch.compile with the same compiler)
    steps: int  # timed steps of each, interleaved, after warm-up steps
    compiler: str

    @property
    def ratio(self) -> float:
        return self.private_s / self.non_private_s

    @property
    def overhead(self) -> float:
        """Measured extra time of a private step: private / non-private - 1."""
        return self.ratio - 1


@dataclasses.dataclass
class CostReport:
    rows: list[SiteRow]
    batch: str  # the batch size: a number, or a symbol when dynamic
    batch_dynamic: bool
    norm_dtype: str
    loss_scale: str  # the per-sample loss scale s and how the pass found it
    options: dict[str, Any]
    backward_flops: float  # matrix products and convolutions of the ordinary backward
    total_flops: float  # what the chosen strategies add
    total_bytes: float
    predicted_s: float  # the seconds the chosen strategies add to a step, predicted from the calibrated rates
    non_private_predicted_s: float  # a non-private forward and backward: products, attention, other kernels
    held_bytes: float  # what the per-sample norm work holds at once (several groups: the largest group's)
    budget: dict[str, Any]  # bytes (None: no limit), source (how it was set), non_private_peak (estimated bytes)
    mixes: dict[str, dict[str, Any]]  # the best mix within the budget, all ghost, all explicit: seconds, bytes, fits
    rates: dict[str, Any]  # the calibration: mm, bmm (FLOP/s), bandwidth (bytes/s), source, small (by shape), fresh
    groups: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # clipping: name, params, threshold
    graph: str = "the whole model"  # which graph of the model this is
    clipped: str = "in this graph"  # or: at the end of the backward, with the model's other graphs
    measured: Measurement | None = None  # explain(..., measure=True)

    @property
    def overhead(self) -> float:
        """Predicted extra time of privacy: its seconds over the predicted non-private step's."""
        return self._overhead(self.predicted_s)

    @property
    def ceiling(self) -> float:
        """The model's ceiling for the budget: the predicted overhead of the best mix of strategies that fits."""
        return self._overhead(self.mixes["best within the budget"]["seconds"])

    def _overhead(self, seconds: float) -> float:
        return seconds / self.non_private_predicted_s if self.non_private_predicted_s else float("nan")

    def to_dict(self) -> dict[str, Any]:
        data = {**dataclasses.asdict(self), "overhead": self.overhead, "ceiling": self.ceiling}
        if self.measured is not None:
            data["measured"].update(ratio=self.measured.ratio, overhead=self.measured.overhead)
        return data

    def _header(self) -> list[str]:
        batch = f"B = {self.batch}" + (
            " (dynamic: the costs count B = 1, or expected_batch_size)" if self.batch_dynamic else ""
        )
        lines = [
            f"bk_dp cost model: {len(self.rows)} sites, {batch}, norms in {self.norm_dtype}",
            f"loss scale: {self.loss_scale}",
            f"graph: {self.graph}; clipped {self.clipped}",
            "options: " + ", ".join(f"{k}={v!r}" for k, v in self.options.items()),
            "clipping groups: "
            + "; ".join(f"{g['name']} (R = {g['threshold']:.4g}, {len(g['params'])} parameters)" for g in self.groups),
            f"predicted overhead {100 * self.overhead:.1f}%: privacy adds {_seconds(self.predicted_s)} to a "
            f"non-private step of {_seconds(self.non_private_predicted_s)} (its products at the mm rate, attention at "
            "the small products', other kernels at the bandwidth); "
            f"{_flops(self.total_flops)} and {_bytes(self.total_bytes)} to a backward of "
            f"{_flops(self.backward_flops)} (matrix products and convolutions)",
            f"memory budget: {_budget(self.budget)}; the norm work holds {_bytes(self.held_bytes)}",
            "ceiling for the budget: " + "; ".join(f"{name} {self._mix(mix)}" for name, mix in self.mixes.items()),
            f"rates: mm {_si(self.rates['mm'], 'FLOP/s')}, bmm {_si(self.rates['bmm'], 'FLOP/s')}, bandwidth "
            f"{_si(self.rates['bandwidth'], 'B/s')}{_small(self.rates['small'])}"
            + (f", new memory written at {_si(self.rates['fresh'], 'B/s')}" if self.rates["fresh"] else "")
            + f" ({self.rates['source']})",
        ]
        if self.measured is not None:
            m = self.measured
            lines.append(
                f"measured forward+backward ({m.compiler}, median of {m.steps}): private {_seconds(m.private_s)}, "
                f"non-private {_seconds(m.non_private_s)}: {m.ratio:.2f}x, overhead {100 * m.overhead:.1f}% "
                f"(predicted {100 * self.overhead:.1f}%: private "
                f"{_seconds(self.non_private_predicted_s + self.predicted_s)}, non-private "
                f"{_seconds(self.non_private_predicted_s)})"
            )
        return lines

    def _mix(self, mix: dict[str, Any]) -> str:
        """A mix's predicted overhead, throughput against non-private, bytes held and whether they fit."""
        overhead = self._overhead(mix["seconds"])
        fits = "" if mix["fits"] else ", over the budget"
        return f"{100 * overhead:.1f}% ({1 / (1 + overhead):.2f}x throughput, holds {_bytes(mix['bytes'])}{fits})"

    def _table(self) -> tuple[list[str], list[list[str]]]:
        """Every column, as to_markdown() shows it."""
        head = [
            "parameter",
            "site",
            "module",
            "sizes",
            "strategy",
            "ghost time / memory",
            "explicit time / memory",
            "at compiled sizes: seconds, FLOPs, bytes (ghost | explicit)",
            "source",
        ]
        body = []
        for row in self.rows:
            ghost = f"{row.ghost_time} / {row.ghost_memory}" if row.ghost_time else "-"
            body.append(
                [
                    row.param,
                    row.kind,
                    _module(row),
                    ", ".join(f"{k}={v}" for k, v in row.sizes.items()),
                    _strategy(row),
                    ghost,
                    f"{row.explicit_time} / {row.explicit_memory}",
                    f"{_at(row.ghost_values, row.ghost_seconds)} | {_at(row.explicit_values, row.explicit_seconds)}",
                    row.source,
                ]
            )
        return head, body

    def __str__(self) -> str:
        """The report for a person: lines of at most WIDTH columns, long cells wrapped, sources as notes below
        the table; the symbolic costs and the modules are in to_markdown() and to_dict()."""
        sources: dict[str, int] = {}
        head = ["parameter", "site", "sizes", "strategy", "ghost cost", "explicit cost", "src"]
        body = [
            [
                row.param,
                row.kind,
                " ".join(f"{k}={v}" for k, v in row.sizes.items() if k != "B"),
                _strategy(row),
                _time_bytes(row.ghost_values, row.ghost_seconds),
                _time_bytes(row.explicit_values, row.explicit_seconds),
                f"[{sources.setdefault(row.source, len(sources) + 1)}]",
            ]
            for row in self.rows
        ]
        lines = [line for text in self._header() for line in _wrap(text, WIDTH, indent=4)]
        lines += [
            "",
            *_wrap(
                "costs: predicted seconds and bytes held each strategy adds at the compiled sizes (FLOPs, symbolic "
                "costs and modules: to_markdown(), to_dict())",
                WIDTH,
                indent=4,
            ),
            *_grid(head, body, WIDTH),
            "sources:",
        ]
        for text, number in sources.items():
            lines += _wrap(f"[{number}] {text}", WIDTH, first="  ", indent=len(f"  [{number}] "))
        return "\n".join(lines)

    def to_markdown(self) -> str:
        head, body = self._table()
        rows = ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in [head, *body]]
        rows.insert(1, "|" + "---|" * len(head))
        return "\n\n".join(["  \n".join(self._header()), "\n".join(rows)])


def _module(row: SiteRow) -> str:
    if row.module == "-":
        return "-"
    return f"{row.module or '<root>'} ({row.module_type})"


def _strategy(row: SiteRow) -> str:
    return f"{row.strategy} ({row.reason})"


def _at(values: tuple[float, float] | None, seconds: float | None = None) -> str:
    if not values:
        return "-"
    return (f"{_seconds(seconds)}, " if seconds is not None else "") + f"{_flops(values[0])}, {_bytes(values[1])}"


def _time_bytes(values: tuple[float, float] | None, seconds: float | None) -> str:
    return f"{_seconds(seconds)}, {_bytes(values[1])}" if values else "-"


def _budget(budget: dict[str, Any]) -> str:
    if budget["bytes"] is None:
        return budget["source"]
    return f"{_bytes(budget['bytes'])}, {budget['source']}; non-private peak {_bytes(budget['non_private_peak'])}"


# --- the printed table: cells wrapped to fit the width -----------------------------------------------------------

_MIN_WIDTH = 8  # no column is wrapped narrower
_GAP = "  "


def _wrap(text: str, width: int, first: str = "", indent: int = 0) -> list[str]:
    """``text`` in lines of at most ``width`` columns (``first`` before the first, ``indent`` spaces before the
    others), broken after a space, a dot, a comma or a slash, within a word only when a word is too long."""
    lines, line, lead = [], first, first
    for token in re.findall(r"[^ .,/]*[.,/]?\s*", text)[:-1] or [""]:
        if len(line) > len(lead) and len(line + token.rstrip()) > width:
            lines.append(line.rstrip())
            line = lead = " " * indent
        while len(line + token.rstrip()) > width:  # a word longer than a line
            room = max(width - len(line), 1)
            lines.append(line + token[:room])
            line, token = lead, token[room:]
        line += token
    lines.append(line.rstrip())
    return lines


def _grid(head: list[str], body: list[list[str]], width: int) -> list[str]:
    """A table of at most ``width`` columns: the widest columns are narrowed, their cells wrapped, until it fits."""
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    room = width - len(_GAP) * (len(head) - 1)
    while sum(widths) > room:
        widest = max(range(len(widths)), key=lambda i: widths[i])
        if widths[widest] <= _MIN_WIDTH:
            break
        widths[widest] -= 1
    lines = []
    for row in [head, None, *body]:
        if row is None:
            lines.append(_GAP.join("-" * w for w in widths))
            continue
        cells = [_wrap(cell, w) for cell, w in zip(row, widths)]
        for i in range(max(len(c) for c in cells)):
            parts = [(c[i] if i < len(c) else "").ljust(w) for c, w in zip(cells, widths)]
            lines.append(_GAP.join(parts).rstrip())
    return lines


def _flops(value: float) -> str:
    return _si(value, "FLOP")


def _bytes(value: float) -> str:
    return _si(value, "B")


def _seconds(value: float) -> str:
    if abs(value) < 1e-3:
        return f"{value * 1e6:.3g} us"
    return f"{value * 1e3:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _small(points: list[list[float]]) -> str:
    """The small products' rates by shape, as their range (nothing without a grid: they run at bmm)."""
    if not points:
        return ""
    rates = [rate for _, _, rate in points]
    return f", small products {_si(min(rates), 'FLOP/s')} to {_si(max(rates), 'FLOP/s')} by shape"


def last_report(model: torch.nn.Module | None = None) -> CostReport | None:
    """The report of the graph bk_dp privatized last (of ``model``; without, of the compiled graphs alive now),
    None before any. Each graph's report is in its plan, owned by its run-time record."""
    records = live_records() if model is None else records_of(model)
    reports = [r.plan.report for r in records if r.plan is not None and r.plan.report is not None]
    return reports[-1] if reports else None


def _call(model: torch.nn.Module, *inputs: Any) -> Any:
    return model(*inputs)


def _entry(tag: str = "") -> Any:
    """``_call`` with a code object and a name of its own (see :func:`explain`)."""
    name = f"bkcompile_explain_{next(_EXPLAINED)}{tag}"
    entry = types.FunctionType(_call.__code__.replace(co_name=name), _call.__globals__, name)
    entry.__qualname__ = name
    return entry


def _loader_batch(inputs: tuple, batch_dim: int, dynamic: bool) -> tuple:
    """Aliases of ``inputs`` (the caller's tensors stay unmarked) with the batch dim of every per-sample tensor
    marked dynamic as :class:`bkcompile.PoissonLoader` marks it: the tensors with as many rows as the first."""
    tensors = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.dim() > batch_dim]
    rows = tensors[0].shape[batch_dim] if tensors else None

    def alias(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        copy_ = leaf.detach().requires_grad_(leaf.requires_grad)
        if dynamic and leaf.dim() > batch_dim and leaf.shape[batch_dim] == rows:
            mark_batch_dynamic(copy_, dim=batch_dim)
        return copy_

    return pytree.tree_map(alias, inputs)


def explain(
    model: torch.nn.Module, *example_inputs: Any, measure: bool = False, dynamic_batch: bool = True, **options: Any
) -> CostReport:
    """Privatize a copy of ``model`` for ``example_inputs`` and return the cost-model report, without training.

    ``options`` are the backend's (``max_grad_norm`` defaults to 1.0). The copy is compiled as training compiles
    the model: with the backend's compiler (Inductor unless ``compiler="aot_eager"``) and, with ``dynamic_batch``,
    the batch dim of the example's per-sample tensors marked dynamic, as :class:`bkcompile.PoissonLoader` marks
    each batch (``dynamic_batch=False``: the sizes of the example, as a first compile of a static batch). A model
    training refuses is refused here with the same error (a :class:`bkcompile.PrivacyError`, not dynamo's
    wrapper of it), except a loss computed outside with no ``loss_reduction``: the report says that its scale is
    unknown (the costs do not depend on it). ``measure=True`` also times a private step (forward and backward)
    against a non-private one (a second copy, plain ``torch.compile``, the same compiler;
    :mod:`bkcompile.compiler.measure`): ``report.measured``; a step with no loss returned differentiates the sum of
    the outputs, as ``loss_reduction="sum"``.

    Dynamo keeps compiled graphs per code object, and what it learnt of sizes per code name: the copy is compiled
    through a function with a code object and a name of its own, so it neither reuses nor evicts the graphs
    of the user's compiled models (no ``torch._dynamo.reset``), and each call starts afresh.
    """
    options = {"max_grad_norm": 1.0, **options}
    parsed = parse_options(options)
    twin = copy.deepcopy(model)
    inputs = _loader_batch(example_inputs, parsed.batch_dim, dynamic_batch)
    compiled, report = _privatized(twin, inputs, options)
    if report is None:
        raise BKError(
            "the model has no trainable parameter that receives a per-sample gradient, or a batch of "
            "one sample (clipped whole): there is no site to report"
        )
    if measure:
        if compiled is None:  # the timed step differentiates the sum of the outputs (measure.loss_of)
            compiled, _ = _privatized(twin, inputs, {**options, "loss_reduction": "sum"})
        plain_model = copy.deepcopy(model)
        plain = torch.compile(_entry("_non_private"), fullgraph=True, **non_private_compile(parsed))
        first = next(twin.parameters(), None)
        private_s, plain_s = time_steps(
            training_step(compiled, twin, inputs),
            training_step(plain, plain_model, _loader_batch(example_inputs, parsed.batch_dim, dynamic_batch)),
            first.device if first is not None else torch.device("cpu"),
        )
        report.measured = Measurement(private_s, plain_s, TIMED_STEPS, parsed.compiler)
    return report


def _privatized(model: torch.nn.Module, inputs: tuple, options: dict) -> tuple[Any, CostReport | None]:
    """(``model`` compiled with bk_dp for ``inputs``, its report), or (None, the report) when the only refusal is a
    loss computed outside with no ``loss_reduction``: the pass refuses that once the report is built, and hands it
    over with the refusal; the report says that the scale is unknown. Any other refusal is raised as itself."""
    compiled = torch.compile(_entry(), backend="bk_dp", options=options, fullgraph=True)
    try:
        with torch.enable_grad():
            compiled(model, *inputs)
    except torch._dynamo.exc.BackendCompilerFailed as failed:
        refusal = find_error(failed)
        if refusal is None:
            raise
        if isinstance(refusal, LossReductionError) and refusal.report is not None:
            return None, refusal.report
        raise refusal from None
    return compiled, last_report(model)
