"""The cost model: for each site, the extra time (FLOPs) and memory (bytes) of each strategy, in sympy.

Each site kind gives the sizes of the symbols at its site and the cost of each strategy (its ``cost``, in its
module of ``site_kinds``). Symbols (``site_kinds.common``): ``B`` the batch size, ``T`` the rows each sample
has at the site (tokens, output positions), ``p`` and ``d`` the two dims of the gradient (out and in
features; for a convolution, per group of ``G``, out channels and in channels x kernel positions), ``V`` an
embedding's table size. Costs count what privacy adds to the ordinary backward:

- ghost (matmul): the two per-sample Gram matrices and their product, 2BT^2(p+d) + BT^2 FLOPs and
  2BT^2 values; the weighted reduction replaces the original one.
- explicit: the per-sample gradients replace the original reduction (same FLOPs); the clipped sum
  2Bpd and the norms Bpd are extra, and the B per-sample gradients (Bpd values) are held.

``choose`` picks per parameter: explicit where every site's two costs are the same (a sum site: its norm needs
the per-sample sums, and they give the clipped sum too, so the operand is not read again after clipping); the
forced strategy; for "auto", the one that holds fewer values at the
compiled sizes, the fewer FLOPs on a tie (for a matmul site Bu et al.'s mixed rule, ghost when 2T^2 < pd); for
"fastest", the fewer FLOPs, then, under ``memory_budget``, it trades time for memory where the budget is exceeded.
With several clipping groups (layer-wise, param-wise, custom groups) in one graph, each group's per-sample values
are formed, used and freed before the next group's (``schedule.py``): nothing is held across groups, so "auto"
picks the fewer FLOPs too, and ``memory_budget`` bounds the largest group's values, not their sum. A batch size
without a value at compile time (the unbacked batch of a dynamic batch) is evaluated at ``expected_batch_size``
(what make_private and the Trainer set from the Poisson loader); a ``memory_budget`` needs one of the two.
FLOPs leave out what a per-sample gradient costs beyond them: B small products run below one large product's
rate, and the B x p x d values are written and read twice more. On the benchmark models (CPU), "auto" trains as
fast as "fastest" with 1.3-1.9x less peak memory, so it is the default.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import warnings

import sympy
import torch
import torch.fx
from bkcompile.passes.facts import product, shape_exprs
from bkcompile.passes.joint import JointGraph
from bkcompile.passes.ops.table import schema_arg
from bkcompile.passes.site_kinds.common import Cost, Sizes
from bkcompile.passes.sites import ParamGrad, Site

from bkcompile.compiler.options import BKOptions
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
    if options.memory_budget is not None:
        raise OptionError(
            "option 'memory_budget' is in bytes at a batch size, and the batch size is dynamic: give "
            "options={'expected_batch_size': E} (make_private and the Trainer integration set it from the "
            "Poisson loader), or compile with dynamic_batch=False"
        )
    return sizes


def evaluate(expr: sympy.Expr, sizes: dict, compiled: dict) -> float:
    """``expr`` at the site's ``sizes`` and the ``compiled_sizes``; a symbolic size without a value (an
    unbacked batch) counts as 1."""
    value = sympy.sympify(expr).subs(sizes).subs(compiled)
    value = value.subs({s: 1 for s in value.free_symbols})
    return float(value)


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
    LESS_MEMORY = "less memory"  # "auto"
    FASTER = "faster"  # "fastest"
    GROUP_FASTER = "faster: per-sample values live within their clipping group"  # "auto", several groups
    MEMORY_BUDGET = "memory_budget"  # "fastest", switched to fit options.memory_budget
    DEFERRED = "deferred: per-sample gradients kept until the end of the backward"  # a piece of the model
    DEFERRED_GHOST = "deferred: ghost norm, site operands kept until the end of the backward"  # a piece, ghost


@dataclasses.dataclass
class ParamPlan:
    param: ParamGrad
    costs: list[SiteCost]
    strategy: Strategy
    reason: Reason

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


@dataclasses.dataclass(frozen=True)
class CostPlan:
    """What the ``cost`` pass produces."""

    plans: tuple[ParamPlan, ...]  # one per clipped parameter
    compiled_sizes: dict[sympy.Symbol, int]  # the shape symbols' values at the compiled sizes
    backward_flops: float  # of the ordinary backward's matrix products and convolutions
    norm_dtype: torch.dtype  # what the per-sample norms accumulate in


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


def plan_cost(plan: ParamPlan, strategy: Strategy, compiled: dict) -> tuple[float, float]:
    """(FLOPs, values) of ``plan``'s parameter under ``strategy``."""
    costs = [c.ghost if strategy is Strategy.GHOST else c.explicit for c in plan.costs]
    return (
        sum(evaluate(c.time, sc.sizes, compiled) for c, sc in zip(costs, plan.costs, strict=True)),
        sum(evaluate(c.memory, sc.sizes, compiled) for c, sc in zip(costs, plan.costs, strict=True)),
    )


def choose(
    joint: JointGraph,
    params: list[ParamGrad],
    options: BKOptions,
    compiled: dict,
    itemsize: int,
    groups: tuple[tuple[str, ...], ...] = (),
):
    """One plan per parameter: its site costs and the strategy the options and the cost model pick
    (``compiled``: the ``compiled_sizes``; ``groups``: the clipping groups' members when each group's values are
    freed before the next group's, else empty)."""
    grouped = len(groups) > 1
    plans = []
    for param in params:
        costs = [site_cost(joint, site) for site in param.sites]
        blocked = _ghost_blocked(param)
        if blocked is None and all(c.ghost == c.explicit for c in costs):
            plans.append(ParamPlan(param, costs, Strategy.EXPLICIT, Reason.DIRECT))
        elif blocked is not None:
            plans.append(ParamPlan(param, costs, Strategy.EXPLICIT, blocked))
        elif options.strategy in ("ghost", "explicit"):
            plans.append(ParamPlan(param, costs, Strategy(options.strategy), Reason.FORCED))
        else:
            plan = ParamPlan(param, costs, Strategy.GHOST, Reason.LESS_MEMORY)
            ghost, explicit = plan_cost(plan, Strategy.GHOST, compiled), plan_cost(plan, Strategy.EXPLICIT, compiled)
            if options.strategy == "fastest" or grouped:
                plan.reason = Reason.FASTER if options.strategy == "fastest" else Reason.GROUP_FASTER
                plan.strategy = Strategy.GHOST if ghost[0] <= explicit[0] else Strategy.EXPLICIT
            else:  # fewer values held, then fewer FLOPs
                lean = (ghost[1], ghost[0]) <= (explicit[1], explicit[0])
                plan.strategy = Strategy.GHOST if lean else Strategy.EXPLICIT
            plans.append(plan)
    if options.memory_budget is not None:
        _fit_budget(plans, options.memory_budget, compiled, itemsize, groups if grouped else ())
    return plans


def held_bytes(plans: list[ParamPlan], compiled: dict, itemsize: int, groups: tuple[tuple[str, ...], ...]) -> float:
    """The bytes the per-sample norm work holds at once: all parameters' values, or with ``groups`` (each group's
    freed before the next's) the largest group's."""
    values = {plan.param.name: plan_cost(plan, plan.strategy, compiled)[1] for plan in plans}
    if not groups:
        return sum(values.values()) * itemsize
    return max(sum(values.get(name, 0.0) for name in members) for members in groups) * itemsize


def _fit_budget(plans: list[ParamPlan], budget: int, compiled: dict, itemsize: int, groups) -> None:
    """Switch parameters to their other strategy, least time lost per byte saved first, until it fits."""
    used = held_bytes(plans, compiled, itemsize, groups)
    options = []
    for plan in plans:
        if plan.reason not in (Reason.FASTER, Reason.GROUP_FASTER):
            continue
        other = plan.strategy.other
        time_now, mem_now = plan_cost(plan, plan.strategy, compiled)
        time_other, mem_other = plan_cost(plan, other, compiled)
        if mem_other < mem_now:
            saved = (mem_now - mem_other) * itemsize
            options.append(((time_other - time_now) / saved, plan, other))
    for _, plan, other in sorted(options, key=operator.itemgetter(0)):
        if used <= budget:
            return
        plan.strategy, plan.reason = other, Reason.MEMORY_BUDGET
        used = held_bytes(plans, compiled, itemsize, groups)
    if used > budget:
        warnings.warn(
            f"bk_dp: the per-sample norm work needs {used:.3g} bytes, over memory_budget={budget} "
            "even with the leanest strategy for every parameter",
            stacklevel=2,
        )


# --- the ordinary backward, for the overhead estimate ------------------------------------------------------


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
