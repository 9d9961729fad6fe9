"""Privacy auditing: empirical lower bounds on epsilon, and a canary game through bkcompile's own pipeline.

``python -m bkcompile audit --noise-multiplier S --steps T --canaries M --seed K`` plays the game and
prints ``empirical epsilon lower bound X <= epsilon Y`` (X: the one-run bound, Y: the accountant's).
"""

from bkcompile.audit.estimators import (
    AuditError,
    CanaryScoreAuditor,
    epsilon_from_gdp,
    epsilon_one_run,
    gdp_delta,
    gdp_epsilon,
    gdp_mu_lower_bound,
    one_run_p_value,
)
from bkcompile.audit.game import AuditResult, CanaryGame, run_canary_game

__all__ = [
    "AuditError",
    "AuditResult",
    "CanaryGame",
    "CanaryScoreAuditor",
    "epsilon_from_gdp",
    "epsilon_one_run",
    "gdp_delta",
    "gdp_epsilon",
    "gdp_mu_lower_bound",
    "one_run_p_value",
    "run_canary_game",
]
