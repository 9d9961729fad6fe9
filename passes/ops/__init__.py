"""The op-law table, split by op family (see ``table.py`` for what a law holds).

Importing this package fills the table: every family module registers its laws.
"""

from bkcompile.passes.ops import (  # noqa: F401  (each module registers its family's laws)
    attention,
    conv,
    embedding,
    indexing,
    losses,
    matmul,
    normalization,
    parametrizations,
    pointwise,
    reductions,
    views,
)
from bkcompile.passes.ops.table import (
    LAWS,
    FactOut,
    OpLaw,
    Rule,
    RuleInput,
    law_for,
    reads_batch_sums,
    register_batch_rule,
    rule_for,
)

# Decompositions the backend applies while tracing: fused ops whose parts have laws
DECOMPOSITIONS = {**embedding.DECOMPOSITIONS, **parametrizations.DECOMPOSITIONS}

__all__ = [
    "DECOMPOSITIONS",
    "LAWS",
    "FactOut",
    "OpLaw",
    "Rule",
    "RuleInput",
    "law_for",
    "reads_batch_sums",
    "register_batch_rule",
    "rule_for",
]
