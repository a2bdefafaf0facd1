"""Health checks (a)-(d): small pure functions of the typed results, testable on hand-made ones."""

from __future__ import annotations

import dataclasses
import math

import ml_collections
import numpy as np

from eqrobust.results import (
    AttackResult,
    ConvergenceRun,
    DeterminismProbe,
    GradientInfo,
    GradientProbe,
    HealthCheck,
    MaskingComparison,
    ModelResult,
    ResidualProbe,
    value_label,
    wilson,
)


def _label(a: AttackResult, value: float) -> str:
    return f"{a.label} {value_label(a.param, value)}"


def check_large(name: str, a: AttackResult, max_accuracy: float) -> HealthCheck | None:
    """(a): at a very large strength the attack must reach ~0 accuracy."""
    if a.large is None:
        return None
    ok = a.large.accuracy <= max_accuracy
    return HealthCheck(
        id="a",
        attack=name,
        value=None,
        passed=bool(ok),
        message=(
            f"{a.label} at {value_label(a.param, a.large.value)}: accuracy {a.large.accuracy:.3f} "
            f"(n={a.large.n}) " + ("~0" if ok else f"> {max_accuracy:g}: attack too weak or masked")
        ),
    )


def check_masking(cmp: MaskingComparison, label: str, tolerance: float) -> HealthCheck:
    """(b): a white-box attack must not be weaker than black-box Square on the same examples."""
    ok = cmp.white_accuracy <= cmp.black_accuracy + tolerance
    return HealthCheck(
        id="b",
        attack=cmp.attack,
        value=cmp.value,
        passed=bool(ok),
        message=(
            f"{label} {value_label('eps', cmp.value)}: white-box {cmp.white_accuracy:.3f} "
            f"vs Square {cmp.black_accuracy:.3f} (n={cmp.n})"
            + ("" if ok else " -> possible gradient masking")
        ),
    )


def check_convergence(
    run: ConvergenceRun, label: str, tolerance: float, max_zero_gradient: float = 0.5
) -> HealthCheck:
    """(c): more iterations and restarts must not change the robust accuracy, and the attack must
    be able to move: unchanged accuracy with zero loss gradients on more than `max_zero_gradient`
    of the correctly classified examples is masking, not convergence."""
    # Counts, not floats: a change of exactly the tolerance must not fail by rounding.
    diff = round(run.strong_accuracy * run.n) - round(run.accuracy * run.n)
    zero = run.zero_gradient_fraction > max_zero_gradient
    ok = abs(diff) <= math.floor(tolerance * run.n + 1e-9) and not zero
    if zero:
        verdict = "ZERO loss gradients: the attack cannot move, so more steps prove nothing"
    elif ok:
        verdict = "converged"
    elif diff < 0:
        verdict = "not converged: the stronger attack lowers accuracy"
    else:
        verdict = "stronger attack RAISES accuracy: unreliable gradients"
    return HealthCheck(
        id="c",
        attack=run.attack,
        value=run.value,
        passed=bool(ok),
        message=(
            f"{label} {value_label('eps', run.value)}: {run.steps} steps x{run.restarts} restarts "
            f"{run.accuracy:.3f} vs {run.strong_steps} steps x{run.strong_restarts} restarts "
            f"{run.strong_accuracy:.3f} (n={run.n}; zero gradients "
            f"{run.zero_gradient_fraction:.0%}): " + verdict
        ),
    )


def check_gradient_probe(p: GradientProbe, h: ml_collections.ConfigDict) -> HealthCheck:
    """(d): measured, not declared: autodiff directional derivatives of the margin must match
    finite differences of the prediction (high correlation, small relative error), and the
    gradient must not be zero."""
    zero = p.zero_gradient_fraction > h.gradient_max_zero_fraction
    saturated = p.ce_zero_gradient_fraction > h.gradient_max_zero_fraction
    ok = (
        not zero
        and not saturated
        and p.correlation >= h.gradient_min_correlation
        and p.relative_error <= h.gradient_max_relative_error
    )
    if zero:
        verdict = "ZERO input gradients: white-box attacks cannot move (masked)"
    elif saturated:
        verdict = "SATURATED softmax: cross-entropy gradients are zero (use margin/DLR losses)"
    elif not ok:
        verdict = (
            "the attack gradient is NOT the derivative of the prediction (masked or surrogate)"
        )
    else:
        verdict = "gradient matches the prediction"
    return HealthCheck(
        id="d",
        attack="*",
        value=None,
        passed=bool(ok),
        message=(
            f"autodiff vs finite differences on {p.n} images x {p.directions} directions "
            f"(h={p.step:g}, {p.dtype}): correlation {p.correlation:.3f}, median relative error "
            f"{p.relative_error:.3f}, zero gradients {p.zero_gradient_fraction:.0%} (cross-"
            f"entropy {p.ce_zero_gradient_fraction:.0%}), median "
            f"|change| {p.function_change:.2e}: {verdict}"
        ),
    )


def check_determinism(p: DeterminismProbe, tolerance: float) -> HealthCheck:
    """(f): the same input twice must give the same logits; otherwise attacks need EOT."""
    ok = p.max_logit_change <= tolerance
    return HealthCheck(
        id="f",
        attack="*",
        value=None,
        passed=bool(ok),
        message=(
            f"forward repeated on {p.n} images: largest logit change {p.max_logit_change:.2e}, "
            f"predictions changed on {p.prediction_change:.0%}"
            + ("" if ok else ": RANDOMISED forward; white-box numbers need EOT attacks")
        ),
    )


def check_gradient_path(g: GradientInfo) -> HealthCheck:
    """(e): the declared attack gradient must be the gradient of the (deterministic) prediction.

    Metadata only (a second line behind the measured (d)). A declared randomised forward needs
    EOT attacks, which fails it too.
    """
    ok = g.matches_prediction and not g.randomized
    detail = (
        "gradient path equals prediction path"
        if g.matches_prediction
        else "MISMATCH: white-box numbers use a gradient of a different function than the "
        "prediction"
    )
    if g.randomized:
        detail += "; RANDOMISED forward: white-box numbers need EOT attacks"
    if g.test_time_optimization:
        detail += "; the forward optimises at test time: only adaptive attacks count"
    return HealthCheck(
        id="e",
        attack="*",
        value=None,
        passed=bool(ok),
        message=(
            f"declared gradient mode {g.mode!r}, gradient depth {g.gradient_depth}, prediction "
            f"depth {g.prediction_depth}: {detail}"
        ),
    )


def check_residual(r: ResidualProbe, max_residual: float, g: GradientInfo) -> HealthCheck:
    """(g): the predicted state must be (near) a fixed point when the attack gradient assumes one
    (implicit or phantom paths); far from it, the "equilibrium" model is an unrolled net those
    gradients need not describe (the exact-trained DEQ with 8/7 solver iterations of the DEQ
    papers). Backpropagation through the prediction's own steps needs no fixed point."""
    assumes_fixed_point = g.mode.startswith(("implicit", "phantom"))
    ok = r.mean <= max_residual or not assumes_fixed_point
    return HealthCheck(
        id="g",
        attack="*",
        value=None,
        passed=bool(ok),
        message=(
            f"relative residual ||f(z)-z||/||f(z)|| of the predicted state on {r.n} clean images: "
            f"mean {r.mean:.3g}, median {r.median:.3g}, max {r.max:.3g}"
            + (
                ""
                if ok
                else f" > {max_residual:g}: NOT an equilibrium, the {g.mode} gradient assumes one"
            )
        ),
    )


def check_robust_above_clean(model: ModelResult, z: float) -> list[HealthCheck]:
    """(h): robust accuracy cannot exceed clean accuracy (an attack leaves correct examples
    alone at worst); a number whose Wilson lower bound (z) lies above the clean accuracy means
    success was judged on another output than the prediction, or the evaluation is broken."""
    out = []
    clean = model.clean.accuracy
    for name, a in model.attacks.items():
        for v, acc in zip(a.values, a.accuracy):
            lo, _ = wilson(acc, a.n, z)
            if lo > clean:
                out.append(
                    HealthCheck(
                        id="h",
                        attack=name,
                        value=float(v),
                        passed=False,
                        message=(
                            f"{_label(a, v)}: robust accuracy {acc:.3f} (n={a.n}) is above the "
                            f"clean accuracy {clean:.3f}: success is not judged on the prediction"
                        ),
                    )
                )
    return out


def health_checks(model: ModelResult, config: ml_collections.ConfigDict) -> list[HealthCheck]:
    """Checks (a)-(h) for one model's results, with the thresholds of `config.health`."""
    h = config.health
    checks = [check_large(n, a, h.large_max_accuracy) for n, a in model.attacks.items()]
    checks = [c for c in checks if c is not None]
    label = lambda name: model.attacks[name].label
    checks += [
        check_masking(c, label(c.attack), h.masking_tolerance) for c in model.masking_comparisons
    ]
    checks += [
        check_convergence(
            r,
            label(r.attack),
            h.convergence_tolerance,
            float(h.get("convergence_max_zero_gradient", 0.5)),
        )
        for r in model.convergence_runs
    ]
    if model.gradient_probe is not None:
        checks.append(check_gradient_probe(model.gradient_probe, h))
    checks.append(check_gradient_path(model.gradient))
    if model.determinism is not None:
        checks.append(check_determinism(model.determinism, h.determinism_tolerance))
    if model.residual is not None:
        checks.append(
            check_residual(model.residual, float(h.get("max_residual", 0.75)), model.gradient)
        )
    checks += check_robust_above_clean(model, float(h.get("robust_above_clean_z", 3.0)))
    return checks


def mean_robustness(model: ModelResult) -> float | None:
    """Paper Table 1: mean robust accuracy over all attacks and strengths of the grid.

    The large-eps sanity points, clean accuracy and attacks reported only for comparison
    (`AttackResult.headline` False: the papers' C&W protocol) are excluded.
    """
    accs = [a for res in model.attacks.values() if res.headline for a in res.accuracy]
    return float(np.mean(accs)) if accs else None


def with_verdicts(model: ModelResult, config: ml_collections.ConfigDict) -> ModelResult:
    """`model` with its health checks and mean robustness filled in."""
    return dataclasses.replace(
        model, health=tuple(health_checks(model, config)), mean_robustness=mean_robustness(model)
    )
