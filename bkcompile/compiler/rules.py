"""Public batch-axis rule API: facts and combinators for registering a rule for a custom op.

Example, for an elementwise custom op::

    bkcompile.register_batch_rule(torch.ops.mylib.scaled_tanh.default)(bkcompile.compiler.rules.pointwise)

A rule reads the op's arguments by schema name (``r.arg("dim")``) and their facts (``r.fact(value)``).
"""

from bkcompile.passes.facts import REDUCED, REPLICATED, Batched, Reduced, Replicated
from bkcompile.passes.ops import RuleInput, reads_batch_sums, register_batch_rule
from bkcompile.passes.ops.pointwise import pointwise
from bkcompile.passes.ops.reductions import along_dim, sum_dims
from bkcompile.passes.ops.views import view

__all__ = [
    "REDUCED",
    "REPLICATED",
    "Batched",
    "Reduced",
    "Replicated",
    "RuleInput",
    "along_dim",
    "pointwise",
    "reads_batch_sums",
    "register_batch_rule",
    "sum_dims",
    "view",
]
