"""The evaluation stages, in order; each takes the shared `Context` and returns result fields."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from eqrobust import corruptions as corruptions_lib
from eqrobust import ops
from eqrobust.attacks import _common, registry
from eqrobust.classifier import Classifier
from eqrobust.evaluation.cache import (
    array_digest,
    arrays_to_fields,
    field_shapes,
    fields_to_arrays,
    key_digest,
)
from eqrobust.evaluation.context import Context, gradient_info, predict
from eqrobust.evaluation.probes import (
    determinism_probe,
    gradient_probe,
    residual_probe,
    zero_gradient_mask,
)
from eqrobust.results import (
    Accuracy,
    AttackDepth,
    AttackResult,
    ConvergenceRun,
    CorruptionResult,
    Curve,
    DepthVariant,
    DeterminismProbe,
    DynamicsResult,
    Gallery,
    GradientProbe,
    LargeRun,
    MaskingComparison,
    ResidualProbe,
    WorstCase,
    value_label,
)

# stage(ctx, fields) -> new result fields; `fields` holds what earlier stages returned.
Stage = Callable[[Context, dict[str, Any]], dict[str, Any]]

# Keys folded into the evaluation key per stage, so a stage's randomness does not depend on which
# other stages ran.
_ATTACK_KEY, _CONVERGENCE_KEY, _DYNAMICS_KEY, _GALLERY_KEY = 1000, 3000, 4000, 5000
_PROBE_KEY = 6000


def clean(ctx: Context, fields: dict[str, Any]) -> dict[str, Any]:
    """Clean accuracy on every evaluation example."""
    n = len(ctx.x)
    out = ctx.cached(
        "clean",
        dict(n=n, examples=ctx.examples_digest(n), batch_size=ctx.batch_size),
        lambda: dict(
            pred=predict(
                ctx.classifier.logits_fn, ctx.x, batch_size=ctx.batch_size, devices=ctx.devices
            )
        ),
        {"pred": (n,)},
    )
    ctx.clean_pred = np.asarray(out["pred"])
    ctx.clean_correct = ctx.clean_pred == ctx.y
    acc = float(ctx.clean_correct.mean())
    ctx.log(f"clean accuracy {acc:.4f} (n={len(ctx.x)} of {ctx.num_test})")
    return dict(clean=Accuracy(accuracy=acc, n=len(ctx.x)))


def _wants_gallery(ctx: Context, name: str, value: float) -> bool:
    g = ctx.config.gallery
    return name == g.attack and math.isclose(value, float(g.eps)) and int(g.num_images) > 0


def _attack_one(
    ctx: Context, a_i: int, name: str, acfg: ml_collections.ConfigDict | None = None
) -> AttackResult:
    t0 = time.perf_counter()
    spec = registry.get(name)
    acfg = ctx.config[name] if acfg is None else acfg
    settings = acfg.settings.to_dict()
    n = ctx.n_of(acfg.num_examples)
    akey = jax.random.fold_in(ctx.key, _ATTACK_KEY + a_i)
    accs = []
    for v_i, value in enumerate(acfg.grid):
        value = float(value)
        want_adv = _wants_gallery(ctx, name, value)
        out = ctx.robust_correct(
            name, value, settings, n, key=jax.random.fold_in(akey, v_i), return_adv=want_adv
        )
        if want_adv:
            out, adv = out
            ctx.gallery_adv = adv[: int(ctx.config.gallery.num_images)]
        ctx.correct[(name, value)] = out
        accs.append(float(out.mean()))
        ctx.log(f"{spec.label} {value_label(spec.param, value)}: {accs[-1]:.4f} (n={n})")
    large = None
    if acfg.large is not None:
        nh = ctx.config.health.num_examples
        nl = n if nh is None else min(n, nh)
        out = ctx.robust_correct(
            name, float(acfg.large), settings, nl, key=jax.random.fold_in(akey, 999)
        )
        large = LargeRun(value=float(acfg.large), accuracy=float(out.mean()), n=nl)
    ctx.stage_seconds[f"attacks.{name}"] = time.perf_counter() - t0
    return AttackResult(
        label=spec.label,
        norm=spec.norm,
        box=spec.box,
        param=spec.param,
        values=tuple(float(v) for v in acfg.grid),
        accuracy=tuple(accs),
        n=n,
        settings=settings,
        large=large,
        reduced=bool(spec.is_reduced(settings)),
        headline=spec.headline,
    )


def attacks(ctx: Context, fields: dict[str, Any]) -> dict[str, Any]:
    """Every configured attack over its strength grid, on its (nested) subset; for a randomised
    classifier (one with a `sample_logits_fn`) also AutoAttack's "rand" version (EOT) beside
    each standard AutoAttack, as the AutoAttack authors prescribe (`rand_versions`)."""
    names = list(ctx.config.attacks)
    for name in names:
        registry.get(name)  # unknown names fail before any attack runs
    extra = rand_versions(ctx.config) if ctx.classifier.sample_logits_fn is not None else {}
    out = {name: _attack_one(ctx, i, name) for i, name in enumerate(names)}
    for i, (name, acfg) in enumerate(extra.items(), start=len(names)):
        out[name] = _attack_one(ctx, i, name, acfg)
    return dict(attacks=out)


def rand_versions(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """{autoattack_rand_<norm>: its entry} for each standard `autoattack_<norm>` in
    config.attacks whose rand version is not listed itself: the rand entry's settings (EOT draws,
    iterations) on the standard entry's grid, examples and large-eps check, so that both versions
    are compared on the same points."""
    out = {}
    for name in config.attacks:
        rand = name.replace("autoattack_", "autoattack_rand_", 1)
        if (
            name.startswith("autoattack_")
            and rand in registry.ATTACKS
            and rand not in config.attacks
        ):
            acfg = ml_collections.ConfigDict(config[name].to_dict())
            acfg.settings = ml_collections.ConfigDict(config[rand].settings.to_dict())
            out[rand] = acfg
    return out


def worst_cases(
    correct: dict[tuple[str, float], np.ndarray], norms: dict[str, str]
) -> tuple[WorstCase, ...]:
    """Pointwise minimum over attacks of one norm at one eps.

    Args:
      correct: robust-correct masks per (attack, eps), each [n_attack] over the first n_attack
        examples of one fixed order (nested prefixes).
      norms: attack name -> norm, for the eps-parameterised attacks to combine (others, e.g.
        C&W's constant, are left out).

    Returns:
      One `WorstCase` per (norm, eps), sorted by norm and eps.
    """
    groups: dict[tuple[str, float], list[str]] = {}
    for name, value in correct:
        if name in norms:
            key = next(
                (k for k in groups if k[0] == norms[name] and math.isclose(k[1], value)),
                (norms[name], value),
            )
            groups.setdefault(key, []).append(name)
    out = []
    for (norm, value), names in sorted(groups.items()):
        masks = [correct[(a, v)] for a, v in correct if a in names and math.isclose(v, value)]
        n = min(len(m) for m in masks)
        robust = np.logical_and.reduce([np.asarray(m[:n], bool) for m in masks])
        acc = float(robust.mean()) if n else 0.0
        out.append(WorstCase(norm, float(value), acc, int(n), tuple(sorted(names))))
    return tuple(out)


def worst_case(ctx: Context, fields: dict[str, Any]) -> dict[str, Any]:
    """The headline robust accuracy: per norm and eps, an example is robust only if every
    attack of the grid at that eps failed on it (run right after `attacks`)."""
    norms = {a: r.norm for a, r in fields.get("attacks", {}).items() if r.param == "eps"}
    grid = {k: v for k, v in ctx.correct.items() if k[0] in norms}
    return dict(worst_case=worst_cases(grid, norms))


_PROBE_TYPES = dict(
    gradient_probe=GradientProbe, determinism=DeterminismProbe, residual=ResidualProbe
)


def _run_probes(ctx: Context, x: np.ndarray, y: np.ndarray, key: jax.Array) -> dict[str, Any]:
    h = ctx.config.health
    fn = ctx.classifier.logits_fn
    grad = gradient_probe(
        fn,
        x,
        y,
        key=key,
        directions=int(h.gradient_directions),
        step=float(h.gradient_step),
    )
    out = dict(gradient_probe=grad, determinism=determinism_probe(fn, x))
    if ctx.classifier.residual_fn is not None:
        out["residual"] = residual_probe(
            ctx.classifier.residual_fn, ctx.x[: int(h.residual_images)]
        )
    return out


def probes(ctx: Context, fields: dict[str, Any]) -> dict[str, Any]:
    """Checks (d) and (f)'s measurements on the first correctly classified examples; (g)'s
    residual of the predicted state on the first `health.residual_images` examples."""
    h = ctx.config.health
    idx = np.flatnonzero(ctx.clean_correct)[: int(h.gradient_images)]
    if len(idx) == 0:  # nothing classified correctly: probe the first examples anyway
        idx = np.arange(min(int(h.gradient_images), len(ctx.x)))
    x, y = ctx.x[idx], ctx.y[idx]
    key = jax.random.fold_in(ctx.key, _PROBE_KEY)
    has_residual = ctx.classifier.residual_fn is not None
    nr = min(int(h.residual_images), len(ctx.x))
    parts = dict(
        directions=int(h.gradient_directions),
        step=float(h.gradient_step),
        key=key_digest(key),
        examples=array_digest(x, y),
        residual=ctx.examples_digest(nr) if has_residual else None,
    )
    types = {k: v for k, v in _PROBE_TYPES.items() if k != "residual" or has_residual}
    arrays = ctx.cached(
        "probes",
        parts,
        lambda: fields_to_arrays(_run_probes(ctx, x, y, key)),
        field_shapes(types),
    )
    out = arrays_to_fields(arrays, types)
    grad = out["gradient_probe"]
    ctx.log(
        f"gradient probe: correlation {grad.correlation:.3f}, relative error "
        f"{grad.relative_error:.3f}, zero gradients {grad.zero_gradient_fraction:.0%}"
    )
    if "residual" in out:
        res = out["residual"]
        ctx.log(f"relative residual of the predicted state: mean {res.mean:.3g} (n={res.n})")
    return out


def masking(ctx: Context, fields: dict[str, Any]) -> dict[str, Any]:
    """Check (b)'s comparisons: white-box attacks vs Square of the same norm on their common
    examples (PGD-Linf / AutoAttack-Linf vs Square-Linf; PGD-L2 / AutoAttack-L2 vs Square-L2)."""
    out = []
    pairs = (
        ("pgd_linf", "square_linf"),
        ("autoattack_linf", "square_linf"),
        ("pgd_l2", "square_l2"),
        ("autoattack_l2", "square_l2"),
    )
    for white, black in pairs:
        for (name, value), cw in ctx.correct.items():
            if name != white or (black, value) not in ctx.correct:
                continue
            cb = ctx.correct[(black, value)]
            m = min(len(cw), len(cb))
            out.append(
                MaskingComparison(
                    attack=white,
                    value=value,
                    white_accuracy=float(cw[:m].mean()),
                    black_accuracy=float(cb[:m].mean()),
                    n=m,
                )
            )
    return dict(masking_comparisons=tuple(out))


def _zero_gradients(ctx: Context, n: int, loss: str) -> np.ndarray:
    """Which of the first n examples, where classified correctly, have a zero loss gradient."""
    idx = np.flatnonzero(ctx.clean_correct[:n])
    if not len(idx):
        return np.zeros(0, bool)
    x, y = ctx.x[idx], ctx.y[idx]
    out = ctx.cached(
        "zero_gradients",
        dict(loss=loss, examples=array_digest(x, y), batch_size=ctx.batch_size),
        lambda: dict(
            zero=zero_gradient_mask(
                ctx.classifier.logits_fn, x, y, loss=loss, batch_size=ctx.batch_size
            )
        ),
        {"zero": (len(idx),)},
    )
    return np.asarray(out["zero"], bool)


def convergence(ctx: Context, fields: dict[str, Any]) -> dict[str, Any]:
    """Check (c)'s runs: PGD with more iterations and restarts at the most informative eps."""
    attack_results = fields.get("attacks", {})
    h = ctx.config.health
    runs = []
    for p_i, name in enumerate(h.convergence_attacks):
        if name not in ("pgd_l2", "pgd_linf"):
            raise ValueError(f"health.convergence_attacks must be PGD attacks, got {name!r}")
        if name not in attack_results:
            continue
        entry = attack_results[name]
        target = 0.5 * float(ctx.clean_correct.mean())
        value = entry.values[int(np.argmin([abs(a - target) for a in entry.accuracy]))]
        base = ctx.correct[(name, value)]
        nh = len(base) if h.num_examples is None else min(len(base), h.num_examples)
        strong = dict(entry.settings)
        steps, restarts = int(strong.get("steps", 20)), int(strong.get("restarts", 1))
        strong["steps"] = steps * int(h.more_steps_factor)
        strong["restarts"] = restarts * int(h.more_restarts_factor)
        corr = ctx.robust_correct(
            name, value, strong, nh, key=jax.random.fold_in(ctx.key, _CONVERGENCE_KEY + p_i)
        )
        # Zero gradients make "more steps change nothing" trivially true: measure them.
        zero = _zero_gradients(ctx, nh, str(strong.get("loss", "ce")))
        runs.append(
            ConvergenceRun(
                attack=name,
                value=value,
                steps=steps,
                restarts=restarts,
                strong_steps=strong["steps"],
                strong_restarts=strong["restarts"],
                accuracy=float(base[:nh].mean()),
                strong_accuracy=float(corr.mean()),
                n=nh,
                zero_gradient_fraction=float(zero.mean()) if len(zero) else 0.0,
            )
        )
    return dict(convergence_runs=tuple(runs))


def corruptions(ctx: Context, fields: dict[str, Any]) -> dict[str, Any]:
    """Accuracy under each corruption and severity (the same corrupted images for every model)."""
    cfg = ctx.config.corruptions
    if not cfg.enabled:
        return {}
    corrupt = ctx.corrupt or corruptions_lib.corrupt
    names = ctx.corruption_names or cfg.names or tuple(corruptions_lib.CORRUPTIONS)
    n = ctx.n_of(cfg.num_examples)
    xs, ys = ctx.x[:n], ctx.y[:n]
    severities = tuple(int(s) for s in cfg.severities)
    acc: dict[str, list[float]] = {}
    jobs = [(c, s) for c in names for s in severities]
    bar = tqdm(jobs, desc=f"{ctx.name} corruptions", leave=False, disable=not ctx.progress)
    for c_i, (cname, sev) in enumerate(bar):
        # The seed depends only on (corruption, severity): every model sees the same images.
        seed = ctx.config.seed + c_i

        def compute(cname=cname, sev=sev, seed=seed):
            xc = np.asarray(corrupt(xs, cname, sev, seed=seed), dtype=np.float32)
            pred = predict(
                ctx.classifier.logits_fn, xc, batch_size=ctx.batch_size, devices=ctx.devices
            )
            return dict(correct=pred == ys)

        if ctx.corrupt is None:  # the library's corruptions: their code is in the cache's key
            parts = dict(corruption=cname, severity=sev, seed=seed, n=n, batch_size=ctx.batch_size)
            parts["examples"] = ctx.examples_digest(n)
            out = ctx.cached("corruption", parts, compute, {"correct": (n,)})
        else:
            out = compute()
        acc.setdefault(cname, []).append(float(np.mean(out["correct"])))
    mean = float(np.mean([a for v in acc.values() for a in v])) if acc else None
    per_severity = tuple(float(np.mean([acc[c][i] for c in acc])) for i in range(len(severities)))
    ctx.log(f"corruption mean accuracy {mean:.4f} (n={n})")
    result = CorruptionResult(
        n=n,
        severities=severities,
        accuracy={k: tuple(v) for k, v in acc.items()},
        per_severity=per_severity,
        mean=mean,
    )
    return dict(corruptions=result)


def _trajectory_curve(ctx: Context) -> Curve:
    """Clean accuracy of the readout after every step of the dynamics (all examples)."""
    traj = ctx.classifier.trajectory_fn

    def correct_per_step(xb, yb):  # [T, B] -> [B, T] so that chunks concatenate over B
        return (jnp.argmax(_common.logits(traj, xb), -1) == yb[None]).T

    n = len(ctx.x)
    out = ctx.cached(
        "trajectory",
        dict(n=n, examples=ctx.examples_digest(n), batch_size=ctx.batch_size),
        lambda: dict(
            correct=ops.run_chunked(correct_per_step, ctx.x, ctx.y, batch_size=ctx.batch_size)
        ),
        {"correct": None},
    )
    corr = np.asarray(out["correct"])
    curve = corr.mean(axis=0)
    ctx.log(f"accuracy along the dynamics at step T={len(curve)}: {curve[-1]:.4f}")
    return Curve(
        steps=tuple(range(1, len(curve) + 1)), accuracy=tuple(float(a) for a in curve), n=len(ctx.x)
    )


def _variant_id(var: Classifier) -> str:
    """A gradient variant's identity for the cache: its name and gradient path (the variants
    share the evaluated model's weights, which the model's fingerprint covers)."""
    info = gradient_info(var)
    return f"{var.name}|{info.mode}|depth={info.gradient_depth}|pred={info.prediction_depth}"


def _attack_depth(ctx: Context, key: jax.Array) -> AttackDepth:
    """Robust accuracy with each gradient variant's attack, judged by the real prediction."""
    cfg = ctx.config.dynamics
    name = cfg.attack
    settings = ctx.config[name].settings.to_dict()
    n = ctx.n_of(cfg.num_examples)
    rows = []
    for i, var in enumerate(ctx.gradient_variants):
        accs = []
        for j, value in enumerate(cfg.grid):
            corr = ctx.robust_correct(
                name,
                float(value),
                settings,
                n,
                key=jax.random.fold_in(jax.random.fold_in(key, i), j),
                attack_logits_fn=var.logits_fn,
                attack_id=_variant_id(var),
            )
            accs.append(float(corr.mean()))
        info = gradient_info(var)
        rows.append(
            DepthVariant(
                mode=info.mode,
                gradient_depth=info.gradient_depth,
                prediction_depth=info.prediction_depth,
                matches_prediction=info.matches_prediction,
                accuracy=tuple(accs),
            )
        )
        ctx.log(
            f"{registry.get(name).label} with {info.mode} gradient, prediction depth "
            f"{info.prediction_depth}: " + ", ".join(f"{a:.3f}" for a in accs)
        )
    return AttackDepth(
        attack=name, values=tuple(float(v) for v in cfg.grid), n=n, variants=tuple(rows)
    )


def dynamics(ctx: Context, fields: dict[str, Any]) -> dict[str, Any]:
    """Equilibrium models: accuracy along the dynamics and robustness vs attack-gradient path."""
    if ctx.classifier.trajectory_fn is None and not ctx.gradient_variants:
        return {}
    key = jax.random.fold_in(ctx.key, _DYNAMICS_KEY)
    result = DynamicsResult(
        prediction_depth=ctx.classifier.prediction_depth,
        trajectory=_trajectory_curve(ctx) if ctx.classifier.trajectory_fn is not None else None,
        attack_depth=_attack_depth(ctx, key) if ctx.gradient_variants else None,
    )
    return dict(dynamics=result)


def gallery(ctx: Context, fields: dict[str, Any]) -> dict[str, Any]:
    """The same first test images for every model, attacked at the gallery strength.

    Reuses the attack grid's adversarials when the gallery strength is part of it.
    """
    g = ctx.config.gallery
    ng = min(int(g.num_images), len(ctx.x))
    if ng <= 0:
        return {}
    x_adv = ctx.gallery_adv
    if x_adv is None or len(x_adv) != ng:
        settings = dict(ctx.config[g.attack].settings.to_dict())
        if g.get("steps") is not None:
            settings["steps"] = int(g.steps)
        _, x_adv = ctx.robust_correct(
            g.attack,
            float(g.eps),
            settings,
            ng,
            key=jax.random.fold_in(ctx.key, _GALLERY_KEY),
            return_adv=True,
        )
    pred_adv = ctx.cached(
        "predict",
        dict(examples=array_digest(x_adv), batch_size=ctx.batch_size),
        lambda: dict(
            pred=predict(
                ctx.classifier.logits_fn, x_adv, batch_size=ctx.batch_size, devices=ctx.devices
            )
        ),
        {"pred": (len(x_adv),)},
    )["pred"]
    result = Gallery(
        attack=g.attack,
        eps=float(g.eps),
        labels=tuple(int(v) for v in ctx.y[:ng]),
        pred_clean=tuple(int(v) for v in ctx.clean_pred[:ng]),
        pred_adversarial=tuple(int(v) for v in pred_adv),
        clean=ctx.x[:ng],
        adversarial=x_adv,
    )
    return dict(gallery=result)


# The order matters: masking and convergence read the attack grid's per-example results.
STAGES: tuple[tuple[str, Stage], ...] = (
    ("clean", clean),
    ("probes", probes),
    ("attacks", attacks),
    ("worst_case", worst_case),
    ("masking", masking),
    ("convergence", convergence),
    ("corruptions", corruptions),
    ("dynamics", dynamics),
    ("gallery", gallery),
)
