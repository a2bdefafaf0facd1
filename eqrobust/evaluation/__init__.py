"""Robustness suite: a runner over stages (clean, attacks, masking and convergence comparisons,
corruptions, dynamics, gallery) and health checks, producing typed `eqrobust.results`.

Where things go: a new analysis is a stage in `stages.py` (added to `STAGES`); a new health check
is a function in `health.py`; a new attack is an entry in `eqrobust.attacks.registry`.
"""

from eqrobust.attacks.registry import ATTACKS, AttackSpec
from eqrobust.evaluation.config import default_config
from eqrobust.evaluation.context import Context, gradient_info, predict
from eqrobust.evaluation.health import health_checks, mean_robustness
from eqrobust.evaluation.runner import evaluate, evaluate_classifier
from eqrobust.evaluation.stages import STAGES
from eqrobust.results import HEALTH_CHECKS

__all__ = [
    "ATTACKS",
    "HEALTH_CHECKS",
    "STAGES",
    "AttackSpec",
    "Context",
    "default_config",
    "evaluate",
    "evaluate_classifier",
    "gradient_info",
    "health_checks",
    "mean_robustness",
    "predict",
]
