"""Matrix products: ``mm``, ``bmm``, ``mv``, ``addmm``.

Samples stay apart when they sit on a leading (batch) dim, on the rows of the left operand or the columns
of the right one. A contraction over the sample axis is a sum over samples: a linear layer's weight
gradient (a site).
"""

from __future__ import annotations

import torch
import torch.fx
from bkcompile.passes.facts import REDUCED, REPLICATED, Batched, Fact, Reduced, Replicated
from bkcompile.passes.ops.pointwise import pointwise
from bkcompile.passes.ops.table import RuleInput, law, same_layout

aten = torch.ops.aten


def _matmul(r: RuleInput, a: torch.fx.Node, b: torch.fx.Node, lead: int) -> Fact:
    """a (..., n, K) @ b (..., K, p) with ``lead`` shared leading dims."""
    fa, fb = r.fact(a), r.fact(b)
    if isinstance(fa, Reduced) or isinstance(fb, Reduced):
        if isinstance(fa, Batched) or isinstance(fb, Batched):
            raise r.mixing(
                "it multiplies a sum over the batch with per-sample values", "keep batch sums out of the model"
            )
        return REDUCED
    n_dim, k_a, k_b, p_dim = lead, lead + 1, lead, lead + 1
    kinds = set()
    if isinstance(fa, Batched):
        kinds.add("lead" if fa.dim < lead else ("out" if fa.dim == n_dim else "contract"))
    if isinstance(fb, Batched):
        kinds.add("lead" if fb.dim < lead else ("out" if fb.dim == p_dim else "contract"))
    if not kinds:
        return REPLICATED
    if isinstance(fa, Batched) and isinstance(fb, Batched) and not same_layout(r, fa, fb):
        raise r.mixing("its operands group samples differently", "keep the batch on matching axes")
    if kinds == {"lead"} and (not isinstance(fa, Batched) or not isinstance(fb, Batched) or fa.dim == fb.dim):
        return fa if isinstance(fa, Batched) else fb
    if kinds == {"out"} and (isinstance(fa, Batched) != isinstance(fb, Batched)):
        return fa.at(lead) if isinstance(fa, Batched) else fb.at(lead + 1)
    if kinds == {"contract"}:
        if (not isinstance(fa, Batched) or fa.dim == k_a) and (not isinstance(fb, Batched) or fb.dim == k_b):
            return REDUCED
    raise r.mixing(
        "it multiplies values of different samples with each other (a product across the sample axis)",
        "contract only over per-sample dimensions",
    )


@law(aten.mm.default)
def mm(r: RuleInput) -> Fact:
    return _matmul(r, r.arg("self"), r.arg("mat2"), lead=0)


@law(aten.bmm.default)
def bmm(r: RuleInput) -> Fact:
    return _matmul(r, r.arg("self"), r.arg("mat2"), lead=1)


@law(aten.mv.default)
def mv(r: RuleInput) -> Fact:  # a matrix product with one column
    return _matmul(r, r.arg("self"), r.arg("vec"), lead=0)


@law(aten.addmm.default)
def addmm(r: RuleInput) -> Fact:
    product_fact = _matmul(r, r.arg("mat1"), r.arg("mat2"), lead=0)
    bias = r.fact(r.arg("self"))
    if isinstance(product_fact, Batched) and isinstance(bias, Replicated):
        return product_fact
    if isinstance(product_fact, Replicated):
        return bias if not isinstance(bias, Batched) else pointwise(r)
    if isinstance(product_fact, Reduced) and not isinstance(bias, Batched):
        return REDUCED
    raise r.mixing("it adds per-sample values to a product that mixes them", "keep the bias replicated")
