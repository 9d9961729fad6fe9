"""The cost model: for each site, the extra FLOPs, predicted seconds and held bytes of each strategy, in sympy.

Each site kind gives the sizes of the symbols at its site and the cost of each strategy (its ``cost``, in its
module of ``site_kinds``). Symbols (``site_kinds.common``): ``B`` the batch size, ``T`` the rows each sample
has at the site (tokens, output positions), ``p`` and ``d`` the two dims of the gradient (out and in
features; for a convolution, per group of ``G``, out channels and in channels x kernel positions), ``V`` an
embedding's table size. Costs count what privacy adds to the ordinary backward:

- ghost (matmul): the two per-sample Gram matrices and their product, 2BT^2(p+d) + BT^2 FLOPs and
  2BT^2 values; the weighted reduction replaces the original one.
- explicit: the per-sample gradients replace the original reduction (same FLOPs); the clipped sum
  2Bpd and the norms Bpd are extra, and the B per-sample gradients (Bpd values) are held.

Each ``Cost`` also lists the kernels the strategy runs (``site_kinds.common.Kernel``): a large product, small
products one per sample, or elementwise passes, with their FLOPs and the values they read and write. With the kernel
rates calibrated once per machine and device (``bkcompile.compiler.calibration``) each kernel takes the longer of
its FLOPs at its rate and its bytes at the memory bandwidth (a roofline): that gives each strategy's predicted
seconds at a site (``estimate``), which the per-sample products' slower rate and their passes over B x p x d values
enter, where FLOPs alone did not see them. A small product's rate is that of its shape (rows, inner dim, columns),
interpolated on the calibrated grid; a Gram matrix of a value several sites read runs once (``shared_grams``). The
non-private step it is set against: its products at the large-product rate, its fused attention at the small
products' rate, and each other kernel's output written and read once at the bandwidth (``other_seconds``).

``choose`` picks per parameter: explicit where every site's two costs are the same (a sum site: its norm needs
the per-sample sums, and they give the clipped sum too, so the operand is not read again after clipping); the
forced strategy; for "auto" and "fastest", the faster by the predicted seconds, where the bytes the per-sample norm
work holds fit the memory budget (``resolve_budget``: by default for "auto" 1.25x the non-private step's peak,
estimated from what the forward keeps for the backward, ``non_private_peak``; "fastest" has no limit unless one is
given). ``mix`` fits the budget like a knapsack, greedily by ratio: every parameter at its leaner strategy, then
switched to its faster one, the most seconds saved per byte added first, where it still fits. With several clipping
groups (layer-wise, param-wise, custom groups) in one graph, each group's per-sample values are formed, used and
freed before the next group's (``schedule.py``): the budget bounds the largest group's values, not their sum.
``mixes`` gives the report the model's ceiling: the best mix within the budget, all ghost and all explicit. A batch
size without a value at compile time (the unbacked batch of a dynamic batch) is evaluated at
``expected_batch_size`` (what make_private and the Trainer set from the Poisson loader); a budget in bytes needs
one of the two.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import warnings

import sympy
import torch
import torch.fx
from bkcompile.passes.facts import product, shape_exprs
from bkcompile.passes.joint import JointGraph
from bkcompile.passes.ops.table import schema_arg
from bkcompile.passes.site_kinds.common import Cost, Sizes
from bkcompile.passes.sites import ParamGrad, Site
from torch.multiprocessing.reductions import StorageWeakRef

from bkcompile.compiler.calibration import Rates
from bkcompile.compiler.options import DEFAULT_BUDGET, BKOptions
from bkcompile.errors import OptionError

aten = torch.ops.aten


@dataclasses.dataclass
class SiteCost:
    site: Site
    sizes: Sizes  # what the symbols stand for at this site
    ghost: Cost | None
    explicit: Cost


def site_cost(joint: JointGraph, site: Site) -> SiteCost:
    sizes, ghost, explicit = site.kind.cost(joint, site.node)
    return SiteCost(site, sizes, ghost if site.kind.ghost_ok(site.node) else None, explicit)


# --- evaluating at the compiled sizes ----------------------------------------------------------------


def compiled_sizes(fake_mode) -> dict[sympy.Symbol, int]:
    """Values of the shape symbols at the sizes the graph was compiled for (backed symbols only)."""
    shape_env = getattr(fake_mode, "shape_env", None)
    if shape_env is None:
        return {}
    values = shape_env.backed_var_to_val if hasattr(shape_env, "backed_var_to_val") else shape_env.var_to_val
    return dict(values)


def with_expected_batch(sizes: dict[sympy.Symbol, int], batch: sympy.Expr, options: BKOptions) -> dict:
    """``sizes`` with a ``batch`` symbol that has no value (unbacked) at ``options.expected_batch_size``. A
    ``memory_budget`` needs a batch size."""
    if not isinstance(batch, sympy.Symbol) or batch in sizes:
        return sizes
    if options.expected_batch_size is not None:
        return {**sizes, batch: max(1, round(options.expected_batch_size))}
    if isinstance(options.memory_budget, int):
        raise OptionError(
            "option 'memory_budget' is in bytes at a batch size, and the batch size is dynamic: give "
            "options={'expected_batch_size': E} (make_private and the Trainer integration set it from the "
            "Poisson loader), or compile with dynamic_batch=False"
        )
    return sizes


def evaluate(expr: sympy.Expr, sizes: dict, compiled: dict) -> float:
    """``expr`` at the site's ``sizes`` and the ``compiled_sizes``; a symbolic size without a value (an
    unbacked batch) counts as 1."""
    return evaluate_all([expr], sizes, compiled)[0]


def evaluate_all(exprs: list[sympy.Expr], sizes: dict, compiled: dict) -> list[float]:
    """:func:`evaluate` of each of ``exprs``. The sizes are numbers once the compiled sizes replace their symbols,
    so each expression is rebuilt with numbers (``xreplace``, a third of ``subs``'s time: the pass evaluates every
    site's kernels)."""
    known = {symbol: sympy.Integer(value) for symbol, value in compiled.items()}
    values = {symbol: sympy.sympify(size).xreplace(known) for symbol, size in sizes.items()}
    numbers = []
    for expr in exprs:
        value = sympy.sympify(expr).xreplace(values).xreplace(known)
        numbers.append(float(value.xreplace(dict.fromkeys(value.free_symbols, sympy.Integer(1)))))
    return numbers


# --- choosing the strategy per parameter ---------------------------------------------------------------


class Strategy(enum.Enum):
    GHOST = "ghost"  # norms without per-sample gradients; the site re-emitted with weighted operands
    EXPLICIT = "explicit"  # per-sample gradients, reused for the clipped sum

    @property
    def other(self) -> Strategy:
        return Strategy.EXPLICIT if self is Strategy.GHOST else Strategy.GHOST


class Reason(enum.Enum):
    """Why a parameter has its strategy."""

    SHARED = "shared"  # several sites: explicit
    SCALED = "scaled"  # a linear map after the site: explicit
    NO_GHOST = "no ghost"  # the site's kind has no ghost norm for it: explicit
    DIRECT = "per-sample sums"  # the norm needs the per-sample values anyway: explicit, reused for the sum
    FORCED = "forced"  # options.strategy is "ghost" or "explicit"
    FASTER = "faster"  # "auto", "fastest": the faster by the predicted time, and it fits the memory budget
    MEMORY_BUDGET = "memory_budget"  # "auto", "fastest": the slower, as the faster does not fit the budget
    DEFERRED = "deferred: per-sample gradients kept until the end of the backward"  # a piece of the model
    DEFERRED_GHOST = "deferred: ghost norm, site operands kept until the end of the backward"  # a piece, ghost


@dataclasses.dataclass(frozen=True)
class Estimate:
    """What one strategy adds for a parameter, at the compiled sizes."""

    seconds: float  # predicted, from the calibrated rates
    flops: float
    bytes: float  # held by the per-sample norm work


@dataclasses.dataclass
class ParamPlan:
    param: ParamGrad
    costs: list[SiteCost]
    strategy: Strategy
    reason: Reason
    estimates: dict[Strategy, Estimate] = dataclasses.field(default_factory=dict)  # the strategies it can take

    def describe(self) -> str:
        """The reason in words, as the report shows it."""
        if self.reason is Reason.SHARED:
            return f"used at {len(self.param.sites)} places: the norm needs the per-sample sum of its gradients"
        if self.reason is Reason.SCALED:
            return "its gradient is scaled after the site: the per-sample values are formed"
        if self.reason is Reason.NO_GHOST:
            return f"no ghost norm for this {self.param.sites[0].kind.name} site"
        if self.reason is Reason.FORCED:
            return f"strategy={self.strategy.value!r}"
        return self.reason.value

    @property
    def free(self) -> bool:
        """Whether the options and the cost model chose the strategy (it could take the other)."""
        return self.reason in (Reason.FASTER, Reason.MEMORY_BUDGET, Reason.FORCED)


@dataclasses.dataclass(frozen=True)
class Budget:
    """The bytes the per-sample norm work may hold at once (with several clipping groups, the largest group's)."""

    bytes: float | None  # None: no limit
    source: str  # how it was set, as the report says it
    peak: float  # the estimated peak bytes of the non-private step (``non_private_peak``)


@dataclasses.dataclass(frozen=True)
class CostPlan:
    """What the ``cost`` pass produces."""

    plans: tuple[ParamPlan, ...]  # one per clipped parameter
    compiled_sizes: dict[sympy.Symbol, int]  # the shape symbols' values at the compiled sizes
    backward_flops: float  # of the ordinary backward's matrix products and convolutions
    other_seconds: float  # of the non-private step's attention and elementwise kernels (``other_seconds``)
    norm_dtype: torch.dtype  # what the per-sample norms accumulate in
    rates: Rates  # the calibrated kernel throughputs the seconds are predicted with
    budget: Budget
    groups: tuple[tuple[str, ...], ...]  # the clipping groups' members when each group's values are freed in turn
    mixes: dict[str, Estimate]  # the whole graph's: the best mix within the budget, all ghost, all explicit

    @property
    def non_private_seconds(self) -> float:
        """The predicted forward and backward of the non-private step: its matrix products and convolutions (the
        backward's, and the forward's, about half as many) at the large-product rate, and its other kernels."""
        return 1.5 * self.backward_flops / self.rates.mm + self.other_seconds


def _ghost_blocked(param: ParamGrad) -> Reason | None:
    """Why the parameter cannot use ghost norms, or None when it can."""
    if len(param.sites) > 1:
        return Reason.SHARED
    if param.scaled:
        return Reason.SCALED
    site = param.sites[0]
    if not site.kind.ghost_ok(site.node):
        return Reason.NO_GHOST
    return None


def estimate(
    costs: list[SiteCost],
    strategy: Strategy,
    compiled: dict,
    rates: Rates,
    itemsize: int,
    groups: tuple[tuple[str, ...], ...],
    shared: dict[torch.fx.Node, int] | None = None,
) -> Estimate:
    """What ``strategy`` adds at the sites ``costs`` (of one parameter): its kernels' seconds by the roofline of
    ``rates``, its FLOPs and the bytes it holds. A Gram matrix of a value that ``shared`` counts n sites' Grams of
    runs once for them: each counts 1/n of its seconds (exact when all n take ghost norms). Without ``groups`` (the
    clipping groups whose values are freed one by one: :func:`choose`'s) the values are held across the backward, in
    memory newly allocated each step, and the bytes held are written at the ``fresh`` rate too."""
    shared = shared or {}
    seconds = flops = held = 0.0
    one = sympy.Integer(1)
    for site in costs:
        cost = site.ghost if strategy is Strategy.GHOST else site.explicit
        kernels = [
            cost.time,
            cost.memory,
            *(e for k in cost.kernels for e in (k.flops, k.values, *(k.shape or (one, one, one)))),
        ]
        values = evaluate_all(kernels, site.sizes, compiled)
        flops, held = flops + values[0], held + values[1] * itemsize
        for i, kernel in enumerate(cost.kernels):
            flop, moved, *shape = values[2 + 5 * i : 7 + 5 * i]
            shaped = tuple(shape) if kernel.shape is not None else None
            share = shared.get(kernel.gram_of, 1) if kernel.gram_of is not None else 1
            seconds += kernel.count * rates.seconds(kernel.rate, flop, moved, itemsize, shaped) / share
    if not groups and rates.fresh:
        seconds += held / rates.fresh
    return Estimate(seconds, flops, held)


def shared_grams(plans: list[ParamPlan]) -> dict[torch.fx.Node, int]:
    """How many Gram matrices the sites of ``plans`` that may take ghost norms form of each value."""
    counts: dict[torch.fx.Node, int] = {}
    for plan in plans:
        if plan.strategy is Strategy.GHOST or plan.free:
            for site in plan.costs:
                for kernel in site.ghost.kernels if site.ghost is not None else ():
                    if kernel.gram_of is not None:
                        counts[kernel.gram_of] = counts.get(kernel.gram_of, 0) + 1
    return counts


def held_bytes(plans, strategies: dict[int, Strategy], groups: tuple[tuple[str, ...], ...]) -> float:
    """The bytes the per-sample norm work holds at once, with ``strategies`` (by position in ``plans``) in place
    of the plans' own: all parameters' values, or with ``groups`` (each group's freed before the next's) the
    largest group's."""
    held = {plan.param.name: plan.estimates[strategies.get(i, plan.strategy)].bytes for i, plan in enumerate(plans)}
    if not groups:
        return sum(held.values())
    return max(sum(held.get(name, 0.0) for name in members) for members in groups)


def mix(plans: list[ParamPlan], budget: float | None, groups: tuple[tuple[str, ...], ...]) -> dict[int, Strategy]:
    """The strategies of the free plans (by position) within ``budget``: each at its leaner strategy (fewer bytes
    held, the faster on a tie), then switched to its faster one, the most seconds saved per byte added first, where
    the switch still fits (every switch, without a budget): a knapsack's greedy by ratio."""
    chosen = {}
    switches = []
    for i, plan in enumerate(plans):
        if not plan.free:
            continue
        lean = min(Strategy, key=lambda s, plan=plan: (plan.estimates[s].bytes, plan.estimates[s].seconds))
        chosen[i] = lean
        saved = plan.estimates[lean].seconds - plan.estimates[lean.other].seconds
        if saved > 0:
            added = plan.estimates[lean.other].bytes - plan.estimates[lean].bytes
            switches.append((-saved / added if added > 0 else -math.inf, i))
    for _, i in sorted(switches):
        chosen[i] = chosen[i].other
        if budget is not None and held_bytes(plans, chosen, groups) > budget:
            chosen[i] = chosen[i].other
    return chosen


def _total(plans: list[ParamPlan], strategies: dict[int, Strategy], groups) -> Estimate:
    picked = [plan.estimates[strategies.get(i, plan.strategy)] for i, plan in enumerate(plans)]
    seconds, flops = sum(e.seconds for e in picked), sum(e.flops for e in picked)
    return Estimate(seconds, flops, held_bytes(plans, strategies, groups))


def mixes(plans: list[ParamPlan], budget: float | None, groups) -> dict[str, Estimate]:
    """The whole graph's estimate for the best mix within ``budget`` (the model's ceiling), all ghost and all
    explicit (the free parameters; the others keep theirs)."""
    free = [i for i, plan in enumerate(plans) if plan.free]
    return {
        "best within the budget": _total(plans, mix(plans, budget, groups), groups),
        "all ghost": _total(plans, dict.fromkeys(free, Strategy.GHOST), groups),
        "all explicit": _total(plans, dict.fromkeys(free, Strategy.EXPLICIT), groups),
    }


def choose(
    joint: JointGraph,
    params: list[ParamGrad],
    options: BKOptions,
    compiled: dict,
    itemsize: int,
    rates: Rates,
    budget: Budget,
    groups: tuple[tuple[str, ...], ...] = (),
) -> list[ParamPlan]:
    """One plan per parameter: its site costs, the estimate of each strategy it can take, and the strategy the
    options and the cost model pick (``compiled``: the ``compiled_sizes``; ``rates``: the calibrated throughputs;
    ``groups``: the clipping groups' members when each group's values are freed before the next group's, else
    empty). "auto" and "fastest" pick per parameter the faster strategy by the predicted time, where the bytes
    held fit ``budget`` (:func:`mix`)."""
    groups = groups if len(groups) > 1 else ()
    plans = []
    for param in params:
        costs = [site_cost(joint, site) for site in param.sites]
        blocked = _ghost_blocked(param)
        if blocked is None and all(c.ghost == c.explicit for c in costs):
            plan = ParamPlan(param, costs, Strategy.EXPLICIT, Reason.DIRECT)
        elif blocked is not None:
            plan = ParamPlan(param, costs, Strategy.EXPLICIT, blocked)
        elif options.strategy in ("ghost", "explicit"):
            plan = ParamPlan(param, costs, Strategy(options.strategy), Reason.FORCED)
        else:
            plan = ParamPlan(param, costs, Strategy.GHOST, Reason.FASTER)
        plans.append(plan)
    shared = shared_grams(plans)
    for plan in plans:
        strategies = [plan.strategy] if not plan.free else list(Strategy)
        plan.estimates = {s: estimate(plan.costs, s, compiled, rates, itemsize, groups, shared) for s in strategies}
    if options.strategy in ("auto", "fastest"):
        for i, strategy in mix(plans, budget.bytes, groups).items():
            estimates = plans[i].estimates
            faster = estimates[strategy].seconds <= estimates[strategy.other].seconds
            plans[i].strategy, plans[i].reason = strategy, Reason.FASTER if faster else Reason.MEMORY_BUDGET
        used = held_bytes(plans, {}, groups)
        if options.memory_budget is not None and used > budget.bytes:
            warnings.warn(
                f"bk_dp: the per-sample norm work needs {used:.3g} bytes, over memory_budget={options.memory_budget} "
                f"({budget.bytes:.3g} bytes) even with the leanest strategy for every parameter",
                stacklevel=2,
            )
    return plans


def resolve_budget(options: BKOptions, peak: float) -> Budget:
    """The memory budget the options give: bytes; a multiple r of the non-private step's estimated ``peak`` (the
    norm work may hold (r - 1) x peak); by default 1.25x ("fastest": no limit)."""
    budget = options.memory_budget
    if budget is None and options.strategy == "fastest":
        return Budget(None, "none (strategy 'fastest' without memory_budget)", peak)
    if isinstance(budget, int):
        return Budget(float(budget), f"{budget} bytes (option memory_budget)", peak)
    ratio = DEFAULT_BUDGET if budget is None else float(budget.removesuffix("x"))
    how = "the default" if budget is None else "option memory_budget"
    return Budget((ratio - 1) * peak, f"{ratio:g}x the non-private step's estimated peak ({how})", peak)


def non_private_peak(joint: JointGraph, backward: set[torch.fx.Node], compiled: dict) -> float:
    """An estimate of the bytes a non-private step holds at the start of its backward: the values the forward
    keeps for the backward (activations, inputs, parameters; a storage once) and the trainable parameters'
    gradients. It leaves out the kernels' workspaces and the optimizer's state."""
    trainable = [node for node, graph_input in zip(joint.primals, joint.inputs, strict=True) if graph_input.trainable]
    kept = [
        node
        for node in joint.gm.graph.nodes
        if node not in backward and node.op != "output" and any(user in backward for user in node.users)
    ]
    largest: dict[StorageWeakRef, float] = {}  # the largest view of each storage kept
    for node in [*kept, *trainable]:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            storage = StorageWeakRef(value.untyped_storage())
            size = evaluate(product(shape_exprs(value)), {}, compiled) * value.element_size()
            largest[storage] = max(largest.get(storage, 0.0), size)
    gradients = sum(
        evaluate(product(shape_exprs(n.meta["val"])), {}, compiled) * n.meta["val"].element_size() for n in trainable
    )
    total = sum(largest.values())
    return total + gradients


# --- the ordinary step, for the overhead estimate ----------------------------------------------------------

_ATTENTION = {  # fused attention, forward or backward: (query, key, value) are its first three arguments
    aten._scaled_dot_product_flash_attention_for_cpu.default: 1,
    aten._scaled_dot_product_flash_attention.default: 1,
    aten._scaled_dot_product_efficient_attention.default: 1,
    aten._scaled_dot_product_cudnn_attention.default: 1,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: 2.5,
    aten._scaled_dot_product_flash_attention_backward.default: 2.5,
    aten._scaled_dot_product_efficient_attention_backward.default: 2.5,
    aten._scaled_dot_product_cudnn_attention_backward.default: 2.5,
}
# kernels the elementwise count leaves out: views (no kernel), products (counted by FLOPs), attention (above)
_NOT_ELEMENTWISE = {
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.convolution.default,
    aten.convolution_backward.default,
    *_ATTENTION,
}


def other_seconds(joint: JointGraph, compiled: dict, rates: Rates) -> float:
    """The predicted seconds of the non-private step's kernels other than its matrix products and convolutions.

    Fused attention: the forward's two products per head, 2 L S (E + Ev) FLOPs for queries (L x E), keys (S x E)
    and values (S x Ev); the backward's five, 2.5x the forward's; each at the small products' rate of a head's
    (L x E)(E x S) product. Every other op that is not a view: its output written once and read once at the
    bandwidth (a fused group of elementwise ops writes less; a reduction reads more)."""
    seconds = 0.0
    for node in joint.gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _ATTENTION:
            seconds += _attention_seconds(node, compiled, rates)
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or node.target in _NOT_ELEMENTWISE or _is_view(node, value):
            continue
        seconds += 2 * evaluate(product(shape_exprs(value)), {}, compiled) * value.element_size() / rates.bandwidth
    return seconds


def _is_view(node: torch.fx.Node, value: torch.Tensor) -> bool:
    """A node whose output aliases an input's storage (no kernel runs: a view, a reshape of a contiguous value)."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return True  # getitem of a multi-output op: that op wrote it
    storage = StorageWeakRef(value.untyped_storage())
    return any(
        isinstance(a.meta.get("val"), torch.Tensor) and StorageWeakRef(a.meta["val"].untyped_storage()) == storage
        for a in node.all_input_nodes
    )


def _attention_seconds(node: torch.fx.Node, compiled: dict, rates: Rates) -> float:
    query, key, value = (shape_exprs(a.meta["val"]) for a in node.args[:3])
    heads = product(query[:-2])
    rows, width, keys, out = query[-2], query[-1], key[-2], value[-1]
    flops = _ATTENTION[node.target] * 2 * heads * rows * keys * (width + out)
    flops, rows, width, keys = evaluate_all([flops, rows, width, keys], {}, compiled)
    return flops / rates.small_rate(rows, width, keys)


def backward_flops(joint: JointGraph, backward: set[torch.fx.Node], compiled: dict) -> float:
    """FLOPs of the matrix products and convolutions of the backward (what privacy is measured against).

    Counted here, in sympy, rather than by ``torch.utils.flop_counter``'s formulas: those count the weight
    gradient of a grouped convolution ``groups`` times over (a depthwise convolution's, C times). Each gradient
    of a convolution costs its forward: 2 * (the output's elements, a transposed convolution's input's) * (the
    weight's elements past its first dim)."""
    total = 0.0
    for node in backward:
        if node.target in (aten.mm.default, aten.bmm.default):
            a, b = (shape_exprs(v.meta["val"]) for v in node.args[:2])
            total += evaluate(2 * product(a) * b[-1], {}, compiled)
        elif node.target == aten.convolution_backward.default:
            transposed = schema_arg(node, "transposed")
            larger = shape_exprs(node.args[1 if transposed else 0].meta["val"])  # the input, else grad_out
            per_output = 2 * product(larger) * product(shape_exprs(node.args[2].meta["val"])[1:])
            total += evaluate(per_output * sum(schema_arg(node, "output_mask")[:2]), {}, compiled)
    return total
