"""Public batch-axis rule API: facts and combinators for registering a rule for a custom op.

Example, for an elementwise custom op::

    bkcompile.register_batch_rule(torch.ops.mylib.scaled_tanh.default)(bkcompile.rules.pointwise)
"""

from bkcompile.passes.facts import REDUCED, REPLICATED, Batched, Reduced, Replicated
from bkcompile.passes.rules import (
    RuleInput,
    along_dim,
    pointwise,
    reads_batch_sums,
    register_batch_rule,
    sum_dims,
    view,
)

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
