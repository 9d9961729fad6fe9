"""The op-law table: one entry per aten overload, saying everything the passes need to know about the op.

An :class:`OpLaw` holds

- ``rule``        the batch rule: the fact of the output from the facts of the arguments (batch-axis pass);
- ``keeps_norm``  for an op that keeps the per-sample norm of one operand (a view, a transpose, a copy, a
                  gradient scattered back into zeros): that operand, or None where it does not (site pass);
- ``lift``        the op applied to per-sample values (B, *operand shape), for the explicit per-sample
                  gradients of a gradient tree that passes through it (clip pass);
- ``lift_linear`` for a linear map of a sum over samples by sample-independent operands (a scaling, a sum
                  over dims, a shared-index embedding backward): the map applied to each sample's part;
                  ``linear_in`` names the operand the map is linear in, where only one can be;
- ``loss``        how a scalar loss passes through the op on its way to the graph's output (loss pass):
                  ``"pass"`` (the same value), ``"scale"`` (linear in one operand), ``"add"`` (a sum of terms),
                  ``"sum"`` / ``"mean"`` (a reduction that may be the loss's reduction over the batch).

The families live in the modules beside this one (``pointwise``, ``views``, ``reductions``, ``matmul``,
``normalization``, ``losses``, ``embedding``, ``conv``, ``attention``, ``indexing``), each entry
next to the law's one-line reason. A rule is a small pure function of a :class:`RuleInput`; it never
mutates the graph, and raises a :class:`PrivacyError` when the op mixes samples. Arguments are read by
their schema name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import sympy
import torch
import torch.fx
from bkcompile.passes.facts import REPLICATED, Batched, Fact, Reduced, same, shape_exprs

from bkcompile.errors import InternalError, SampleMixingError, node_error

aten = torch.ops.aten
FactOut = Fact | tuple
Rule = Callable[["RuleInput"], FactOut]
Lift = Callable[..., torch.fx.Node]
LossLaw = Literal["pass", "scale", "add", "sum", "mean"]


@dataclasses.dataclass(frozen=True)
class OpLaw:
    """What the passes know about one op (see the module docstring)."""

    rule: Rule | None = None
    keeps_norm: Callable[[torch.fx.Node], torch.fx.Node | None] | None = None
    lift: Lift | None = None
    lift_linear: Lift | None = None
    linear_in: Callable[[torch.fx.Node], torch.fx.Node | None] | None = None  # None: any one operand
    loss: LossLaw | None = None


LAWS: dict[torch._ops.OpOverload, OpLaw] = {}
# the ops given a rule through the public register_batch_rule in this process: their rules are the user's code
USER_RULES: set = set()


def _op_list(ops: Any) -> list:
    return [ops] if isinstance(ops, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)) else list(ops)


def define(ops: Any, **fields: Any) -> None:
    """Set ``fields`` of the law of every op in ``ops`` (one overload or a list), keeping its other fields."""
    for op in _op_list(ops):
        LAWS[op] = dataclasses.replace(LAWS.get(op, OpLaw()), **fields)


def law(ops: Any, **fields: Any) -> Callable[[Rule], Rule]:
    """Decorator: ``rule`` is the batch rule of ``ops``; ``fields`` set the rest of their law."""

    def install(rule: Rule) -> Rule:
        define(ops, rule=rule, **fields)
        return rule

    return install


def register_batch_rule(ops: torch._ops.OpOverload | Iterable[torch._ops.OpOverload]) -> Callable[[Rule], Rule]:
    """Decorator: make ``rule`` the batch-axis rule of one op overload or a list of them.

    Public: a custom op (``torch.library.custom_op``) gets a rule this way, e.g. an elementwise one::

        bkcompile.register_batch_rule(torch.ops.mylib.scaled_tanh.default)(bkcompile.compiler.rules.pointwise)
    """
    ops = _op_list(ops)
    USER_RULES.update(ops)
    return law(ops)


def reads_batch_sums(rule: Rule) -> Rule:
    """``rule``, marked as proving harmless the sums over the batch (``Reduced`` operands) that it lets
    reach per-sample outputs; without the mark the analysis refuses any such op (default-deny). A copy
    is marked, so marking a shared combinator exempts only the ops registered with the copy."""

    @functools.wraps(rule)
    def exempt(r: RuleInput) -> FactOut:
        return rule(r)

    exempt.reads_batch_sums = True
    return exempt


def law_for(op: object) -> OpLaw:
    """The law of ``op`` (an empty one when the table has none)."""
    return LAWS.get(op, OpLaw())


def rule_for(op: object) -> Rule | None:
    """The rule of ``op``: from the table, else ``pointwise`` for any overload tagged pointwise.

    Tags are read when an op is met, so ops registered late (Inductor's ``prims.fma``) are covered.
    """
    rule = law_for(op).rule
    if rule is None and isinstance(op, torch._ops.OpOverload) and torch.Tag.pointwise in op.tags:
        from bkcompile.passes.ops.pointwise import pointwise

        return pointwise  # elementwise by its schema tag: samples stay apart
    return rule


def schema_arg(node: torch.fx.Node, name: str, default: Any = None) -> Any:
    """The argument ``name`` of the call ``node``, by the op's schema: positional, keyword or the schema's
    default (``default`` when the schema has none or the op has no schema)."""
    schema = getattr(node.target, "_schema", None)
    if name in node.kwargs:
        return node.kwargs[name]
    if schema is None:
        return default
    for index, argument in enumerate(schema.arguments):
        if argument.name == name:
            if index < len(node.args):
                return node.args[index]
            return argument.default_value if argument.has_default_value() else default
    raise node_error(
        InternalError,
        node,
        f"a batch-axis rule reads the argument {name!r}, which the op's schema does not have",
        "name an argument of the op's schema (torch.ops.<ns>.<op>.<overload>._schema) in the rule",
    )


@dataclasses.dataclass
class RuleInput:
    """What a rule may read: the node, the batch size B, and the facts of the node's arguments."""

    node: torch.fx.Node
    batch: sympy.Expr
    facts: dict[torch.fx.Node, FactOut]
    backward: bool = False  # the node is in the backward part of the joint graph

    def arg(self, name: str, default: Any = None) -> Any:
        """The argument ``name`` (its schema name) of the op."""
        return schema_arg(self.node, name, default)

    def fact(self, value: Any) -> FactOut:
        return self.facts[value] if isinstance(value, torch.fx.Node) else REPLICATED

    def shape(self, value: torch.fx.Node) -> list[sympy.Expr]:
        return shape_exprs(value.meta["val"])

    def out_shape(self) -> list[sympy.Expr]:
        return shape_exprs(self.node.meta["val"])

    def tensor_args(self) -> list[torch.fx.Node]:
        flat = torch.fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: n)
        found: list[torch.fx.Node] = []
        torch.fx.node.map_arg(flat, lambda n: found.append(n) if isinstance(n.meta.get("val"), torch.Tensor) else None)
        return found

    def mixing(self, why: str, fix: str) -> SampleMixingError:
        return node_error(SampleMixingError, self.node, why, fix)


# --- helpers shared by the families ---------------------------------------------------------------------


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def norm_dims(dims: Sequence[int] | int | None, ndim: int) -> list[int]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return sorted(norm_dim(d, max(ndim, 1)) for d in dims)


def same_layout(r: RuleInput, a: Batched, b: Batched) -> bool:
    # a batch of one owns every row, however they are grouped
    return r.batch == 1 or (same(a.inner, b.inner) and same(a.outer, b.outer))


def agree(r: RuleInput, batched: list[Batched]) -> Batched:
    """The common fact of operands that must hold their samples on the same axis."""
    first = batched[0]
    for other in batched[1:]:
        if other.dim != first.dim or not same_layout(r, other, first):
            raise r.mixing(
                "its operands hold samples on different axes, so the result combines different samples",
                "keep the batch on the same axis of every operand (check transposes and reshapes)",
            )
    return first


def batched_facts(r: RuleInput, values: Iterable[Any]) -> list[Batched]:
    return [f for f in (r.fact(v) for v in values) if isinstance(f, Batched)]


def index_on_batch(r: RuleInput) -> SampleMixingError:
    return r.mixing(
        "it indexes or slices the sample axis, so one sample's values reach other samples' outputs",
        "index only non-batch dimensions inside the model (the batch is dim 0 of every input)",
    )


_ZEROS = {aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default}
_FILLS = {aten.full.default, aten.new_full.default, aten.full_like.default, aten.scalar_tensor.default}


def is_zeros(value: object) -> bool:
    """``value`` is the number 0 or a graph constant filled with zeros."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    target = getattr(value, "target", None)
    if target in _ZEROS:
        return True
    if target in _FILLS:
        return schema_arg(value, "s" if target is aten.scalar_tensor.default else "fill_value") == 0
    return False


_CASTS = {aten._to_copy.default, torch.ops.prims.convert_element_type.default}


def uncast(value: object) -> object:
    """``value`` before any dtype casts."""
    while isinstance(value, torch.fx.Node) and value.target in _CASTS:
        value = value.args[0]
    return value


def is_count(value: object, facts: dict) -> bool:
    """``value`` is a count over the whole batch: a scalar sum over samples of integer values (the number of
    labels that are not ignored, a loss's normaliser)."""
    source = uncast(value)
    if not isinstance(source, torch.fx.Node) or not isinstance(facts.get(source), Reduced):
        return False
    val = source.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 0 and not (val.is_floating_point() or val.is_complex())


def first_operand(node: torch.fx.Node) -> torch.fx.Node:
    return node.args[0]
