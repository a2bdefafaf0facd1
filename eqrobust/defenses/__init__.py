"""Test-time defences of DEQs (early state, ensemble state, entropy reduction) and their attacks."""

from eqrobust.defenses.adaptive import (
    ER_VARIANTS,
    DefenseAttackResult,
    attack_defense,
    attack_entropy_reduction,
    entropy_reduction_surrogates,
)
from eqrobust.defenses.entropy import (
    MODES,
    EntropyReduction,
    EntropyReductionOutput,
    entropy_reduction,
    entropy_reduction_forward,
    entropy_reduction_logits_fn,
    prediction_entropy,
    reinject,
)
from eqrobust.defenses.states import (
    EarlyStateSelection,
    early_state,
    ensemble_logits,
    ensemble_state,
    select_early_state,
)

__all__ = [
    "ER_VARIANTS",
    "MODES",
    "DefenseAttackResult",
    "EarlyStateSelection",
    "EntropyReduction",
    "EntropyReductionOutput",
    "attack_defense",
    "attack_entropy_reduction",
    "early_state",
    "ensemble_logits",
    "ensemble_state",
    "entropy_reduction",
    "entropy_reduction_forward",
    "entropy_reduction_logits_fn",
    "entropy_reduction_surrogates",
    "prediction_entropy",
    "reinject",
    "select_early_state",
]
