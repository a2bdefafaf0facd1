"""Evaluation settings: the attacks, grids, subsets, corruptions, dynamics, health and gallery."""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """Paper-protocol evaluation settings: every attack on the full test split.

    `num_examples=None` everywhere means the full test split; a smaller number is stored
    in the results and stated in the report.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 250  # examples per compiled attack call
    c.num_examples = None  # clean accuracy and default for every attack; None = full split
    c.attacks = ("pgd_l2", "pgd_linf", "autoattack_linf", "square_linf", "cw_l2", "cw_l2_strong")
    c.progress = True

    def _attack(values, large, **settings):
        a = ml_collections.ConfigDict()
        a.grid = tuple(values)
        a.large = large  # the health-check (a) strength
        a.num_examples = ml_collections.FieldReference(None, field_type=int)
        a.settings = ml_collections.ConfigDict(settings)
        return a

    linf = (1 / 255, 3 / 255, 5 / 255, 8 / 255)
    c.pgd_l2 = _attack(
        (0.07, 0.31, 0.49, 1.0), 10.0, steps=20, step_size=None, random_start=True, restarts=1
    )
    c.pgd_linf = _attack(linf, 0.5, steps=20, step_size=None, random_start=True, restarts=1)
    c.autoattack_linf = _attack(linf, 0.5, version="standard")
    c.autoattack_l2 = _attack((0.5,), 10.0, version="standard")
    # AutoAttack's "rand" version (EOT over 20 draws of a randomised classifier's sampler).
    c.autoattack_rand_linf = _attack(linf, 0.5, steps=100, eot_iter=20)
    c.autoattack_rand_l2 = _attack((0.5,), 10.0, steps=100, eot_iter=20)
    c.square_linf = _attack(linf, 0.5, queries=5000, p_init=0.8)
    # The black-box counterpart of the L2 attacks (check (b) for PGD-L2 / AutoAttack-L2).
    c.square_l2 = _attack((0.07, 0.31, 0.49, 1.0), 10.0, queries=5000, p_init=0.8)
    # C&W as run by the papers (ART defaults): `c` is the initial constant of a 10-step binary
    # search, 10 Adam iterations per search step.
    c.cw_l2 = _attack(
        (0.005, 0.01, 0.1, 1.0), 100.0, steps=10, lr=0.01, confidence=0.0, binary_search_steps=10
    )
    # C&W that optimises its objective: c is the fixed constant (one search step), with enough
    # Adam steps that accuracy falls with c and reaches ~0 at a large one (BUILD_NOTES.md,
    # "Strong C&W and converged PGD").
    c.cw_l2_strong = _attack(
        (0.01, 0.1, 1.0, 10.0), 100.0, steps=100, lr=0.1, confidence=0.0, binary_search_steps=1
    )

    c.corruptions = ml_collections.ConfigDict()
    c.corruptions.enabled = True
    c.corruptions.names = ml_collections.FieldReference(None, field_type=tuple)  # None = all 15
    c.corruptions.severities = (1, 2, 3, 4, 5)
    c.corruptions.num_examples = ml_collections.FieldReference(None, field_type=int)

    # Dynamics of equilibrium models (EP free phase, DEQ solver): accuracy along the trajectory,
    # and robust accuracy with each attack-gradient variant (same prediction).
    c.dynamics = ml_collections.ConfigDict()
    c.dynamics.num_examples = ml_collections.FieldReference(None, field_type=int)
    c.dynamics.attack = "pgd_l2"  # attack run with each gradient variant
    c.dynamics.grid = (0.31, 0.49, 1.0)

    c.health = ml_collections.ConfigDict()
    c.health.num_examples = ml_collections.FieldReference(None, field_type=int)
    c.health.large_max_accuracy = 0.05  # (a)
    c.health.masking_tolerance = 0.02  # (b): 2 points
    c.health.more_steps_factor = 5  # (c)
    c.health.more_restarts_factor = 5  # (c)
    c.health.convergence_tolerance = 0.01  # (c): 1 point
    c.health.convergence_attacks = ("pgd_l2", "pgd_linf")  # (c) is run for these
    # (c) fails when the attack loss's input gradient is exactly zero on more than this fraction
    # of the correctly classified examples (no change under more steps is then masking).
    c.health.convergence_max_zero_gradient = 0.5
    # (d): the measured gradient check (images, random directions, finite-difference step).
    c.health.gradient_images = 8
    c.health.gradient_directions = 4
    c.health.gradient_step = 1e-5  # in float64 (the probe casts the model's weights)
    c.health.gradient_min_correlation = 0.95
    c.health.gradient_max_relative_error = 0.1
    c.health.gradient_max_zero_fraction = 0.5
    c.health.residual_images = 64  # (g): examples whose predicted-state residual is measured
    c.health.max_residual = 0.75  # (g): mean relative residual of the predicted state
    c.health.robust_above_clean_z = 3.0  # (h): Wilson bound (z) of robust accuracy above clean
    c.health.determinism_tolerance = 1e-5  # (f): largest logit change between repeated calls

    c.gallery = ml_collections.ConfigDict()
    c.gallery.num_images = 6
    c.gallery.attack = "pgd_l2"
    c.gallery.eps = 1.0  # in the PGD-L2 grid: the gallery reuses that run
    c.gallery.steps = ml_collections.FieldReference(None, field_type=int)  # None: attack's steps
    return c


def _keys(c: Any, prefix: str = "") -> set[str]:
    out = set()
    for k, v in dict(c).items():
        out.add(prefix + k)
        # An attack's `settings` are its keyword arguments: the attack checks those itself.
        if isinstance(v, ml_collections.ConfigDict | dict) and k != "settings":
            out |= _keys(v, f"{prefix}{k}.")
    return out


def check_config(config: Any) -> None:
    """Raises ValueError for evaluation-config keys that `default_config()` does not have (a
    misspelt key would otherwise be ignored and its default used) and for a batch_size < 1."""
    known = _keys(default_config())
    unknown = sorted(_keys(config) - known)
    if unknown:
        hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
        msg = ", ".join(
            f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items()
        )
        raise ValueError(f"unknown evaluation config key(s): {msg}")
    bs = config.get("batch_size", 1)
    if not (isinstance(bs, int) and bs >= 1):
        raise ValueError(f"evaluation batch_size must be an int >= 1, got {bs!r}")
