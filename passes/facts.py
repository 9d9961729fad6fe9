"""Batch-axis facts: what every value of the joint graph is with respect to the samples of the batch.

- ``Batched(dim, inner, outer)``: dim ``dim`` has size ``outer * B * inner``; seen as (outer, B, inner),
  index ``i`` of the middle axis is sample ``i``. ``inner`` > 1 after a view merges the batch with the
  dims after it ((B, T, d) -> (B*T, d)); ``outer`` > 1 after one merges it with the dims before it
  (sequence-first layouts: (T, B, d) -> (T*B, d)).
- ``Replicated()``: the same for every sample (parameters, buffers, constants, sizes).
- ``Reduced()``: a sum over samples of per-sample values (a loss, a parameter gradient).

Sizes are sympy expressions so that a symbolic batch size works like a concrete one.
"""

from __future__ import annotations

import dataclasses

import sympy
import torch


@dataclasses.dataclass(frozen=True)
class Batched:
    dim: int
    inner: sympy.Expr = sympy.Integer(1)
    outer: sympy.Expr = sympy.Integer(1)

    def at(self, dim: int) -> Batched:
        """The same layout on another dim."""
        return dataclasses.replace(self, dim=dim)

    @property
    def plain(self) -> bool:
        """Each sample owns one row of its dim."""
        return self.inner == 1 and self.outer == 1


@dataclasses.dataclass(frozen=True)
class Replicated:
    pass


@dataclasses.dataclass(frozen=True)
class Reduced:
    pass


Fact = Batched | Replicated | Reduced
REPLICATED = Replicated()
REDUCED = Reduced()


def to_expr(size: int | torch.SymInt) -> sympy.Expr:
    """A size (int or SymInt) as a sympy expression."""
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def shape_exprs(value: torch.Tensor) -> list[sympy.Expr]:
    return [to_expr(s) for s in value.shape]


def same(a: sympy.Expr, b: sympy.Expr) -> bool:
    return sympy.simplify(a - b) == 0


def exact_quotient(num: sympy.Expr, den: sympy.Expr) -> sympy.Expr | None:
    """``num / den`` when it is a polynomial (an exact division of sizes), else None."""
    quotient = sympy.cancel(num / den)
    _, denominator = sympy.fraction(quotient)
    if denominator != 1 or (quotient.is_number and not quotient.is_integer):
        return None
    return quotient


def product(sizes: list[sympy.Expr]) -> sympy.Expr:
    out = sympy.Integer(1)
    for size in sizes:
        out = out * size
    return out
