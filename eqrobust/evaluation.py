"""Robustness suite: clean, adversarial, corruption and EP analyses + health checks -> results."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from eqrobust.classifier import GradientPath

SCHEMA_VERSION = 1

Array = jax.Array
LogitsFn = Callable[[Array], Array]


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """Static description of one attack family in the suite."""

    label: str  # name in tables and plots
    norm: str  # "l2" or "linf"
    box: str  # "white" (gradient-based) or "black" (query-based)
    param: str  # what the strength grid means: "eps" or "c"


ATTACKS: dict[str, AttackSpec] = {
    "pgd_l2": AttackSpec("PGD-L2", "l2", "white", "eps"),
    "pgd_linf": AttackSpec("PGD-Linf", "linf", "white", "eps"),
    "autoattack_linf": AttackSpec("AutoAttack-Linf", "linf", "white", "eps"),
    "square_linf": AttackSpec("Square-Linf", "linf", "black", "eps"),
    "cw_l2": AttackSpec("C&W-L2", "l2", "white", "c"),
}

HEALTH_CHECKS = {
    "a": "accuracy at a very large eps is ~0",
    "b": "white-box accuracy <= black-box (Square) accuracy + tolerance",
    "c": "more PGD iterations/restarts change accuracy by <= tolerance",
    "d": "attack gradient path == prediction path",
}


def default_config() -> ml_collections.ConfigDict:
    """Paper-protocol evaluation settings: every attack on the full test split.

    `num_examples=None` everywhere means the full test split; a smaller number is stored
    in the results and stated in the report.
    """
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 250  # examples per compiled attack call
    c.num_examples = None  # clean accuracy and default for every attack; None = full split
    c.attacks = ("pgd_l2", "pgd_linf", "autoattack_linf", "square_linf", "cw_l2")
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
    c.square_linf = _attack(linf, 0.5, queries=5000, p_init=0.8)
    # C&W as run by the papers (ART defaults): `c` is the initial constant of a 10-step binary
    # search, 10 Adam iterations per search step.
    c.cw_l2 = _attack(
        (0.005, 0.01, 0.1, 1.0), 100.0, steps=10, lr=0.01, confidence=0.0, binary_search_steps=10
    )

    c.corruptions = ml_collections.ConfigDict()
    c.corruptions.enabled = True
    c.corruptions.names = ml_collections.FieldReference(None, field_type=tuple)  # None = all 15
    c.corruptions.severities = (1, 2, 3, 4, 5)
    c.corruptions.num_examples = ml_collections.FieldReference(None, field_type=int)

    c.ep = ml_collections.ConfigDict()
    c.ep.num_examples = ml_collections.FieldReference(None, field_type=int)
    c.ep.attack = "pgd_l2"  # attack run with each gradient variant
    c.ep.grid = (0.31, 0.49, 1.0)

    c.health = ml_collections.ConfigDict()
    c.health.num_examples = ml_collections.FieldReference(None, field_type=int)
    c.health.large_max_accuracy = 0.05  # (a)
    c.health.masking_tolerance = 0.02  # (b): 2 points
    c.health.more_steps_factor = 5  # (c)
    c.health.more_restarts_factor = 5  # (c)
    c.health.convergence_tolerance = 0.01  # (c): 1 point
    c.health.convergence_attacks = ("pgd_l2", "pgd_linf")  # (c) is run for these

    c.gallery = ml_collections.ConfigDict()
    c.gallery.num_images = 6
    c.gallery.attack = "pgd_l2"
    c.gallery.eps = 1.0  # in the PGD-L2 grid: the gallery reuses that run
    c.gallery.steps = ml_collections.FieldReference(None, field_type=int)  # None: attack's steps
    return c


# ----------------------------------------------------------------------------------------------
# Batched execution


def _take_prefix(order: np.ndarray, n: int | None, total: int) -> np.ndarray:
    if n is None:
        return order
    if n <= 0:
        raise ValueError(f"num_examples must be positive or None (full split), got {n}")
    return order[: min(n, total)]


def _run_chunked(
    fn: Callable[[Array, Array, Array], Array],
    x: np.ndarray,
    y: np.ndarray,
    *,
    key: Array,
    batch_size: int,
    desc: str,
    progress: bool,
) -> np.ndarray:
    """Applies a jitted `fn(x, y, key) -> out [B, ...]` over fixed-size chunks.

    The last chunk is padded (repeating its first example) so one compiled program serves all
    chunks; the padded outputs are dropped.
    """
    n = len(x)
    bs = min(batch_size, n)
    outs = []
    starts = range(0, n, bs)
    for i, start in enumerate(tqdm(starts, desc=desc, leave=False, disable=not progress)):
        xb, yb = x[start : start + bs], y[start : start + bs]
        m = len(xb)
        if m < bs:
            xb = np.concatenate([xb, np.repeat(xb[:1], bs - m, axis=0)])
            yb = np.concatenate([yb, np.repeat(yb[:1], bs - m, axis=0)])
        out = fn(jnp.asarray(xb), jnp.asarray(yb), jax.random.fold_in(key, i))
        outs.append(np.asarray(out)[:m])
    return np.concatenate(outs)


def _jitted_argmax(logits_fn: LogitsFn) -> Callable[[Array], Array]:
    """`x -> argmax logits_fn(x)`; the logits compile once per architecture (`attacks._common`)."""
    from eqrobust.attacks import _common

    return lambda x: jnp.argmax(_common.logits(logits_fn, x), axis=-1)


def predict(logits_fn: LogitsFn, x: np.ndarray, *, batch_size: int = 250) -> np.ndarray:
    """Predicted labels of `logits_fn` on `x: [N, H, W, C]` in chunks -> `[N]` int."""
    fn = _jitted_argmax(logits_fn)
    y0 = np.zeros(len(x), np.int32)
    return _run_chunked(
        lambda xb, yb, k: fn(xb),
        x,
        y0,
        key=jax.random.key(0),
        batch_size=batch_size,
        desc="predict",
        progress=False,
    )


def _attack_fn(name: str, logits_fn: LogitsFn, value: float, settings: dict[str, Any]):
    """Returns `(x, y, key) -> x_adv` for one attack at one strength.

    The attacks compile themselves with the strength traced (and a `Partial` logits_fn's
    parameters traced), so one compilation serves every strength of a grid and every model of
    one architecture; wrapping them in another jit would recompile per strength.
    """
    from eqrobust import attacks  # imported lazily: the suite's structure does not need it

    s = dict(settings)
    if name in ("pgd_l2", "pgd_linf"):
        norm = ATTACKS[name].norm

        def run(x, y, key):
            return attacks.pgd(logits_fn, x, y, key=key, eps=value, norm=norm, **s).x_adv

    elif name == "autoattack_linf":

        def run(x, y, key):
            return attacks.autoattack(logits_fn, x, y, key=key, eps=value, norm="linf", **s).x_adv

    elif name == "square_linf":

        def run(x, y, key):
            return attacks.square(logits_fn, x, y, key=key, eps=value, norm="linf", **s).x_adv

    elif name == "cw_l2":

        def run(x, y, key):
            return attacks.cw_l2(logits_fn, x, y, key=key, c=value, **s).x_adv

    else:
        raise ValueError(f"unknown attack {name!r}; expected one of {sorted(ATTACKS)}")
    return run


def _robust_correct(
    attack_logits_fn: LogitsFn,
    judge_logits_fn: LogitsFn,
    name: str,
    value: float,
    settings: dict[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    clean_correct: np.ndarray,
    *,
    key: Array,
    batch_size: int,
    progress: bool,
    return_adv: bool = False,
):
    """Per-example robustness: correct on the clean point AND at x_adv under the prediction.

    The attack may use a different gradient path (`attack_logits_fn`); the verdict is always
    the real prediction (`judge_logits_fn`) at the returned point, never the attack's own flag.
    """
    attack = _attack_fn(name, attack_logits_fn, value, settings)
    judge = _jitted_argmax(judge_logits_fn)

    def fn(xb, yb, k):
        x_adv = attack(xb, yb, k)
        pred = judge(x_adv)
        return np.concatenate(
            [np.asarray(pred == yb, np.float32)[:, None], np.asarray(x_adv).reshape(len(xb), -1)],
            axis=1,
        )

    desc = f"{ATTACKS[name].label} {ATTACKS[name].param}={value:.4g}"
    out = _run_chunked(fn, x, y, key=key, batch_size=batch_size, desc=desc, progress=progress)
    correct = (out[:, 0] > 0.5) & clean_correct
    if return_adv:
        return correct, out[:, 1:].reshape(x.shape)
    return correct


# ----------------------------------------------------------------------------------------------
# Health checks (pure functions of the results, so they are testable on hand-written results)


def health_checks(model: dict[str, Any], config: ml_collections.ConfigDict) -> list[dict]:
    """Computes checks (a)-(d) for one model's results.

    Args:
      model: a per-model results dict as produced by `evaluate_classifier` (uses `attacks`,
        `gradient`, and the private `masking_comparisons` / `convergence_runs` entries).
      config: evaluation config (`health` thresholds).

    Returns:
      A list of check dicts: id, attack, value (strength or None), passed, message.
    """
    h = config.health
    checks: list[dict] = []
    for name, res in model["attacks"].items():
        large = res.get("large")
        if large is None:
            continue
        acc = large["accuracy"]
        ok = acc <= h.large_max_accuracy
        checks.append(
            dict(
                id="a",
                attack=name,
                value=None,
                passed=bool(ok),
                message=(
                    f"{ATTACKS[name].label} at {ATTACKS[name].param}={large['value']:g}: "
                    f"accuracy {acc:.3f} (n={large['n']}) "
                    + ("~0" if ok else f"> {h.large_max_accuracy:g}: attack too weak or masked")
                ),
            )
        )
    for cmp in model.get("masking_comparisons", []):
        white, black = cmp["white_accuracy"], cmp["black_accuracy"]
        ok = white <= black + h.masking_tolerance
        checks.append(
            dict(
                id="b",
                attack=cmp["attack"],
                value=cmp["value"],
                passed=bool(ok),
                message=(
                    f"{ATTACKS[cmp['attack']].label} eps={cmp['value']:.4g}: white-box {white:.3f} "
                    f"vs Square {black:.3f} (n={cmp['n']})"
                    + ("" if ok else " -> possible gradient masking")
                ),
            )
        )
    for conv in model.get("convergence_runs", []):
        base, strong = conv["accuracy"], conv["strong_accuracy"]
        diff = strong - base
        ok = abs(diff) <= h.convergence_tolerance
        if ok:
            verdict = "converged"
        elif diff < 0:
            verdict = "not converged: the stronger attack lowers accuracy"
        else:
            verdict = "stronger attack RAISES accuracy: unreliable gradients"
        checks.append(
            dict(
                id="c",
                attack=conv["attack"],
                value=conv["value"],
                passed=bool(ok),
                message=(
                    f"{ATTACKS[conv['attack']].label} eps={conv['value']:.4g}: {conv['steps']} "
                    f"steps x{conv['restarts']} restarts {base:.3f} vs {conv['strong_steps']} "
                    f"steps x{conv['strong_restarts']} restarts {strong:.3f} (n={conv['n']}): "
                    + verdict
                ),
            )
        )
    g = model["gradient"]
    ok = g["matches_prediction"]
    checks.append(
        dict(
            id="d",
            attack="*",
            value=None,
            passed=bool(ok),
            message=(
                f"gradient mode {g['mode']!r}, gradient depth {g['gradient_depth']}, prediction "
                f"depth {g['prediction_depth']}: "
                + (
                    "gradient path equals prediction path"
                    if ok
                    else "MISMATCH: white-box numbers use a gradient of a different function "
                    "than the prediction"
                )
            ),
        )
    )
    return checks


def cell_flags(checks: Sequence[dict], attack: str, value: float | None = None) -> list[str]:
    """Ids of failed checks that apply to one table cell (attack at one strength)."""
    flags = []
    white = attack in ATTACKS and ATTACKS[attack].box == "white"
    for c in checks:
        if c["passed"]:
            continue
        if c["attack"] == "*":
            applies = white
        else:
            applies = c["attack"] == attack and (
                c["value"] is None or value is None or math.isclose(c["value"], value)
            )
        if applies and c["id"] not in flags:
            flags.append(c["id"])
    return sorted(flags)


# ----------------------------------------------------------------------------------------------
# The suite


def _gradient_info(classifier) -> dict[str, Any]:
    return dict(
        mode=str(classifier.gradient or "autodiff"),
        gradient_depth=classifier.gradient.depth if classifier.gradient else None,
        prediction_depth=classifier.prediction_depth,
        matches_prediction=bool(classifier.gradient_matches_prediction),
    )


def _check_data(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 4:
        raise ValueError(f"x must be [N, H, W, C], got shape {x.shape}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"x must be in [0, 1] (or uint8), got range [{x.min()}, {x.max()}]")
    if y.shape != (len(x),):
        raise ValueError(f"y must be [N] labels matching x, got {y.shape} for {len(x)} images")
    return x, y.astype(np.int32)


def evaluate_classifier(
    classifier,
    x_test: np.ndarray,
    y_test: np.ndarray,
    config: ml_collections.ConfigDict | None = None,
    *,
    seed: int = 0,
    gradient_variants: Sequence[Any] = (),
    corrupt: Callable[..., np.ndarray] | None = None,
    corruption_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Runs the whole suite on one classifier.

    Args:
      classifier: an `eqrobust.models.Classifier` (logits_fn, name, optional trajectory_fn,
        gradient mode and depths).
      x_test: `[N, H, W, C]` test images, float in [0, 1] or uint8.
      y_test: `[N]` int labels.
      config: evaluation config (`default_config()` when None).
      seed: the training seed of this model (stored; results with the same name and different
        seeds are averaged by the report).
      gradient_variants: classifiers with the same prediction but other attack-gradient paths
        (EP: BPTT through t steps, implicit); each is attacked with `config.ep.attack` and judged
        by `classifier.logits_fn`.
      corrupt: `corrupt(x, name, severity, *, seed) -> x` (default `eqrobust.corruptions.corrupt`).
      corruption_names: corruptions to run (default: `config.corruptions.names` or all).

    Returns:
      The per-model results dict (schema in `eqrobust.report.validate_results`); images for the
      gallery are numpy arrays under `gallery`.
    """
    config = default_config() if config is None else config
    x_test, y_test = _check_data(x_test, y_test)
    progress = bool(config.progress)
    bs = int(config.batch_size)
    total = len(x_test)
    key = jax.random.key(config.seed)
    order = np.random.default_rng(config.seed).permutation(total)
    name = classifier.name
    seconds: dict[str, float] = {}
    log = tqdm.write if progress else logging.info

    # Clean accuracy on the evaluation split (all attacks use prefixes of the same order, so
    # subsets are nested and any two attacks can be compared on their common examples).
    t0 = time.perf_counter()
    idx = _take_prefix(order, config.num_examples, total)
    x_all, y_all = x_test[idx], y_test[idx]
    clean_pred = predict(classifier.logits_fn, x_all, batch_size=bs)
    clean_correct = clean_pred == y_all
    result: dict[str, Any] = dict(
        name=name,
        seed=int(seed),
        num_test=total,
        clean=dict(accuracy=float(clean_correct.mean()), n=len(idx)),
        gradient=_gradient_info(classifier),
        attacks={},
        corruptions=None,
        ep=None,
        seconds=seconds,
    )
    seconds["clean"] = time.perf_counter() - t0
    log(f"[{name}] clean accuracy {clean_correct.mean():.4f} (n={len(idx)} of {total})")

    def n_of(sub):
        n = sub.get("num_examples")
        return len(idx) if n is None else min(int(n), len(idx))

    correct_cache: dict[tuple[str, float], np.ndarray] = {}
    gallery_adv = None  # adversarials of the gallery images when the main grid produces them
    for a_i, aname in enumerate(config.attacks):
        if aname not in ATTACKS:
            raise ValueError(f"unknown attack {aname!r} in config.attacks; known: {list(ATTACKS)}")
        t0 = time.perf_counter()
        acfg = config[aname]
        settings = acfg.settings.to_dict()
        n = n_of(acfg)
        akey = jax.random.fold_in(key, 1000 + a_i)
        accs = []
        for v_i, value in enumerate(acfg.grid):
            want_adv = (
                aname == config.gallery.attack
                and math.isclose(float(value), float(config.gallery.eps))
                and int(config.gallery.num_images) > 0
            )
            corr = _robust_correct(
                classifier.logits_fn,
                classifier.logits_fn,
                aname,
                float(value),
                settings,
                x_all[:n],
                y_all[:n],
                clean_correct[:n],
                key=jax.random.fold_in(akey, v_i),
                batch_size=bs,
                progress=progress,
                return_adv=want_adv,
            )
            if want_adv:
                corr, gallery_adv = corr
                gallery_adv = gallery_adv[: int(config.gallery.num_images)]
            correct_cache[(aname, float(value))] = corr
            accs.append(float(corr.mean()))
            log(
                f"[{name}] {ATTACKS[aname].label} {ATTACKS[aname].param}={value:.4g}: "
                f"{accs[-1]:.4f} (n={n})"
            )
        entry = dict(
            label=ATTACKS[aname].label,
            norm=ATTACKS[aname].norm,
            box=ATTACKS[aname].box,
            param=ATTACKS[aname].param,
            values=[float(v) for v in acfg.grid],
            accuracy=accs,
            n=n,
            settings=settings,
            large=None,
        )
        if acfg.large is not None:
            nl = n if config.health.num_examples is None else min(n, config.health.num_examples)
            corr = _robust_correct(
                classifier.logits_fn,
                classifier.logits_fn,
                aname,
                float(acfg.large),
                settings,
                x_all[:nl],
                y_all[:nl],
                clean_correct[:nl],
                key=jax.random.fold_in(akey, 999),
                batch_size=bs,
                progress=progress,
            )
            entry["large"] = dict(value=float(acfg.large), accuracy=float(corr.mean()), n=nl)
        result["attacks"][aname] = entry
        seconds[aname] = time.perf_counter() - t0

    # (b): white-box vs Square on the common prefix of examples.
    compare = []
    if "square_linf" in result["attacks"]:
        for white in ("pgd_linf", "autoattack_linf"):
            if white not in result["attacks"]:
                continue
            for value in result["attacks"][white]["values"]:
                if ("square_linf", value) not in correct_cache:
                    continue
                cw, cb = correct_cache[(white, value)], correct_cache[("square_linf", value)]
                m = min(len(cw), len(cb))
                compare.append(
                    dict(
                        attack=white,
                        value=value,
                        white_accuracy=float(cw[:m].mean()),
                        black_accuracy=float(cb[:m].mean()),
                        n=m,
                    )
                )
    result["masking_comparisons"] = compare

    # (c): PGD with more iterations and restarts at the most informative eps of the grid.
    t0 = time.perf_counter()
    convergence = []
    h = config.health
    for p_i, aname in enumerate(h.convergence_attacks):
        if aname not in ("pgd_l2", "pgd_linf"):
            raise ValueError(f"health.convergence_attacks must be PGD attacks, got {aname!r}")
        if aname not in result["attacks"]:
            continue
        entry = result["attacks"][aname]
        target = 0.5 * result["clean"]["accuracy"]
        v_i = int(np.argmin([abs(a - target) for a in entry["accuracy"]]))
        value = entry["values"][v_i]
        base = correct_cache[(aname, value)]
        nh = len(base) if h.num_examples is None else min(len(base), h.num_examples)
        strong = dict(entry["settings"])
        steps, restarts = int(strong.get("steps", 20)), int(strong.get("restarts", 1))
        strong["steps"] = steps * int(h.more_steps_factor)
        strong["restarts"] = restarts * int(h.more_restarts_factor)
        corr = _robust_correct(
            classifier.logits_fn,
            classifier.logits_fn,
            aname,
            value,
            strong,
            x_all[:nh],
            y_all[:nh],
            clean_correct[:nh],
            key=jax.random.fold_in(key, 3000 + p_i),
            batch_size=bs,
            progress=progress,
        )
        convergence.append(
            dict(
                attack=aname,
                value=value,
                steps=steps,
                restarts=restarts,
                strong_steps=strong["steps"],
                strong_restarts=strong["restarts"],
                accuracy=float(base[:nh].mean()),
                strong_accuracy=float(corr.mean()),
                n=nh,
            )
        )
    result["convergence_runs"] = convergence
    seconds["health"] = time.perf_counter() - t0

    # Natural corruptions.
    if config.corruptions.enabled:
        t0 = time.perf_counter()
        result["corruptions"] = _corruption_accuracy(
            classifier.logits_fn,
            x_all,
            y_all,
            config,
            corrupt=corrupt,
            names=corruption_names,
            log=log,
            model_name=name,
        )
        seconds["corruptions"] = time.perf_counter() - t0

    # EP analyses: accuracy along the free phase, robust accuracy vs attack-gradient depth.
    if classifier.trajectory_fn is not None or gradient_variants:
        t0 = time.perf_counter()
        result["ep"] = _ep_analyses(
            classifier,
            gradient_variants,
            x_all,
            y_all,
            clean_correct,
            config,
            key=jax.random.fold_in(key, 4000),
            log=log,
        )
        seconds["ep"] = time.perf_counter() - t0

    # Gallery: the same test images for every model (same order), PGD-L2 at a visible eps;
    # taken from the main grid when the gallery eps is part of it (no extra attack run).
    t0 = time.perf_counter()
    g = config.gallery
    ng = min(int(g.num_images), len(idx))
    if ng > 0 and gallery_adv is not None and len(gallery_adv) == ng:
        x_adv = gallery_adv
    elif ng > 0:
        gsettings = dict(config[g.attack].settings.to_dict())
        if g.get("steps") is not None:
            gsettings["steps"] = int(g.steps)
        _, x_adv = _robust_correct(
            classifier.logits_fn,
            classifier.logits_fn,
            g.attack,
            float(g.eps),
            gsettings,
            x_all[:ng],
            y_all[:ng],
            clean_correct[:ng],
            key=jax.random.fold_in(key, 5000),
            batch_size=bs,
            progress=False,
            return_adv=True,
        )
    if ng > 0:
        result["gallery"] = dict(
            attack=g.attack,
            eps=float(g.eps),
            clean=x_all[:ng],
            adversarial=x_adv,
            labels=[int(v) for v in y_all[:ng]],
            pred_clean=[int(v) for v in clean_pred[:ng]],
            pred_adversarial=[int(v) for v in predict(classifier.logits_fn, x_adv, batch_size=bs)],
        )
    seconds["gallery"] = time.perf_counter() - t0

    result["mean_robustness"] = mean_robustness(result)
    result["health"] = health_checks(result, config)
    for c in result["health"]:
        log(f"[{name}] health ({c['id']}) {'PASS' if c['passed'] else 'FAIL'}: {c['message']}")
    return result


def mean_robustness(model: dict[str, Any]) -> float | None:
    """Paper Table 1: mean robust accuracy over all attacks and strengths of the grid.

    The large-eps sanity points are excluded; clean accuracy is excluded.
    """
    accs = [a for res in model["attacks"].values() for a in res["accuracy"]]
    return float(np.mean(accs)) if accs else None


def _corruption_accuracy(
    logits_fn: LogitsFn,
    x: np.ndarray,
    y: np.ndarray,
    config: ml_collections.ConfigDict,
    *,
    corrupt,
    names,
    log,
    model_name: str,
) -> dict[str, Any]:
    if corrupt is None or names is None:
        from eqrobust import corruptions as corruptions_lib

        corrupt = corruptions_lib.corrupt if corrupt is None else corrupt
        if names is None:
            names = config.corruptions.names or tuple(corruptions_lib.CORRUPTIONS)
    n = config.corruptions.num_examples
    n = len(x) if n is None else min(int(n), len(x))
    xs, ys = x[:n], y[:n]
    severities = [int(s) for s in config.corruptions.severities]
    acc: dict[str, list[float]] = {}
    jobs = [(c, s) for c in names for s in severities]
    for c_i, (cname, sev) in enumerate(
        tqdm(jobs, desc=f"{model_name} corruptions", leave=False, disable=not config.progress)
    ):
        # The corruption seed depends only on (corruption, severity): every model sees the
        # same corrupted images.
        xc = np.asarray(corrupt(xs, cname, sev, seed=config.seed + c_i), dtype=np.float32)
        pred = predict(logits_fn, xc, batch_size=config.batch_size)
        acc.setdefault(cname, []).append(float((pred == ys).mean()))
    mean = float(np.mean([a for v in acc.values() for a in v])) if acc else None
    per_severity = [float(np.mean([acc[c][i] for c in acc])) for i in range(len(severities))]
    log(f"[{model_name}] corruption mean accuracy {mean:.4f} (n={n})")
    return dict(n=n, severities=severities, accuracy=acc, per_severity=per_severity, mean=mean)


def _ep_analyses(
    classifier,
    variants: Sequence[Any],
    x: np.ndarray,
    y: np.ndarray,
    clean_correct: np.ndarray,
    config: ml_collections.ConfigDict,
    *,
    key: Array,
    log,
) -> dict[str, Any]:
    out: dict[str, Any] = dict(prediction_depth=classifier.prediction_depth)
    n = config.ep.num_examples
    n = len(x) if n is None else min(int(n), len(x))
    xs, ys = x[:n], y[:n]
    if classifier.trajectory_fn is not None:
        # On the clean-accuracy examples: the last step must reproduce the clean accuracy.
        traj = _jitted_argmax(classifier.trajectory_fn)  # [T, B]
        fn = lambda xb, yb, k: (traj(xb) == yb[None]).T  # chunked over B
        corr = _run_chunked(
            fn, x, y, key=key, batch_size=config.batch_size, desc="free phase", progress=False
        )
        curve = corr.mean(axis=0)
        out["free_phase"] = dict(
            steps=list(range(1, len(curve) + 1)), accuracy=[float(a) for a in curve], n=len(x)
        )
        log(f"[{classifier.name}] free-phase accuracy at step T={len(curve)}: {curve[-1]:.4f}")
    else:
        out["free_phase"] = None
    if variants:
        aname = config.ep.attack
        settings = config[aname].settings.to_dict()
        rows = []
        for i, var in enumerate(variants):
            accs = []
            for j, value in enumerate(config.ep.grid):
                corr = _robust_correct(
                    var.logits_fn,
                    classifier.logits_fn,
                    aname,
                    float(value),
                    settings,
                    xs,
                    ys,
                    clean_correct[:n],
                    key=jax.random.fold_in(jax.random.fold_in(key, i), j),
                    batch_size=config.batch_size,
                    progress=config.progress,
                )
                accs.append(float(corr.mean()))
            info = _gradient_info(var)
            rows.append(dict(**info, accuracy=accs))
            log(
                f"[{classifier.name}] {ATTACKS[aname].label} with {info['mode']} gradient "
                f"(depth {info['gradient_depth']}), prediction depth {info['prediction_depth']}: "
                + ", ".join(f"{a:.3f}" for a in accs)
            )
        out["attack_depth"] = dict(
            attack=aname, values=[float(v) for v in config.ep.grid], n=n, variants=rows
        )
    else:
        out["attack_depth"] = None
    return out


def evaluate(
    classifiers: Sequence[Any],
    x_test: np.ndarray,
    y_test: np.ndarray,
    config: ml_collections.ConfigDict | None = None,
    *,
    seeds: Sequence[int] | None = None,
    gradient_variants: dict[str, Sequence[Any]] | None = None,
    meta: dict[str, Any] | None = None,
    **kwargs,
) -> dict[str, Any]:
    """Runs `evaluate_classifier` on several classifiers -> the full results dict.

    Returns:
      {"schema_version", "meta": {...}, "models": [per-model dicts]}.
    """
    config = default_config() if config is None else config
    seeds = [0] * len(classifiers) if seeds is None else list(seeds)
    models = []
    for clf, s in zip(classifiers, seeds, strict=True):
        variants = (gradient_variants or {}).get(clf.name, ())
        models.append(
            evaluate_classifier(
                clf, x_test, y_test, config, seed=s, gradient_variants=variants, **kwargs
            )
        )
    m = dict(meta or {})
    m.setdefault("num_test", len(x_test))
    m.setdefault("eval_config", config.to_dict())
    return dict(schema_version=SCHEMA_VERSION, meta=m, models=models)


# ----------------------------------------------------------------------------------------------
# Studies: train-or-load several models, evaluate, report


CLASS_NAMES = {
    "fashion_mnist": [
        "T-shirt",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Boot",
    ],
    "cifar10": ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


def ep_gradient_variants(
    trained, analysis: ml_collections.ConfigDict, name: str, data=None
) -> list[Any]:
    """Classifiers of a trained EP model with other attack-gradient paths (same prediction).

    Args:
      trained: `eqrobust.train.Trained` from the EP trainer (state["params"]).
      analysis: `bptt_depths` (depths > T are dropped; T itself is the exact BPTT gradient) and
        `implicit`.
      name: display name for the variants.
      data: the training `Dataset` (its statistics normalise the input); loaded when None.

    Returns:
      Classifiers: BPTT through each depth t, then the implicit gradient.
    """
    from eqrobust import ep
    from eqrobust.train import ep as ep_train
    from eqrobust.train.supervised import load_data

    data = load_data(trained.config) if data is None else data
    params = trained.state["params"]
    ep_config = ep_train.build_ep_config(trained.config, data)
    depths = sorted({int(t) for t in analysis.bptt_depths if int(t) <= ep_config.t1})
    out = [
        ep.classifier(params, ep_config, gradient=GradientPath("unrolled", t), name=name)
        for t in depths
    ]
    if analysis.implicit:
        out.append(ep.classifier(params, ep_config, gradient=GradientPath("implicit"), name=name))
    return out


def _merged(base: ml_collections.ConfigDict, over) -> ml_collections.ConfigDict:
    """A copy of `base` with the (nested) entries of `over` replacing its own."""
    out = ml_collections.ConfigDict(base.to_dict())

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict | ml_collections.ConfigDict) and k in dst:
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(out, over)
    return out


def run_study(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    out_dir: str | None = None,
    only: Sequence[str] | None = None,
    require_trained: bool = False,
) -> dict[str, Any]:
    """Trains (or loads finished runs of) every model of a study, evaluates them, writes the report.

    Args:
      config: see eqrobust/configs/study.py (models, model_order, seeds, ep_analysis, eval).
      workdir: model runs go to workdir/<model key> (workdir/<key>-seed<s> with several seeds).
      out_dir: report.md, results.json, plots and galleries go here (default: workdir).
      only: model keys to include (default: config.model_order).
      require_trained: raise FileNotFoundError instead of training a model without checkpoints
        (experiments/evaluate.py).

    Returns:
      The results dict (also written to workdir/results.json).
    """
    import os

    from eqrobust import report
    from eqrobust.train import get_trainer
    from eqrobust.train.supervised import load_data

    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    keys = list(config.model_order) if only is None else list(only)
    unknown = [k for k in keys if k not in config.models]
    if unknown:
        raise ValueError(f"model_order names {unknown} not in config.models {list(config.models)}")
    data = load_data(config.models[keys[0]])
    for k in keys[1:]:  # every model must be evaluated on the same test split
        other = load_data(config.models[k])
        if not (
            np.array_equal(other.x_test, data.x_test) and np.array_equal(other.y_test, data.y_test)
        ):
            raise ValueError(
                f"models {keys[0]!r} and {k!r} have different test splits "
                f"({config.models[keys[0]].dataset} vs {config.models[k].dataset}); a study "
                "compares models on one dataset"
            )
    seeds = [int(s) for s in config.seeds]
    classifiers, run_seeds, run_keys, variants = [], [], [], {}
    for key in keys:
        for seed in seeds:
            cfg = ml_collections.ConfigDict(config.models[key].to_dict())
            cfg.seed = seed
            run_dir = os.path.join(workdir, key if len(seeds) == 1 else f"{key}-seed{seed}")
            if require_trained and not os.path.isdir(os.path.join(run_dir, "checkpoints")):
                raise FileNotFoundError(
                    f"no checkpoints for {cfg.name} in {run_dir}; train it first, e.g. "
                    f"python -m experiments.study --config=... --workdir={workdir}"
                )
            t0 = time.perf_counter()
            trained = get_trainer(cfg.trainer)(cfg, run_dir)
            timing[f"train-or-load {cfg.name} (seed {seed})"] = time.perf_counter() - t0
            clf = dataclasses.replace(trained.classifier, name=cfg.name)
            classifiers.append(clf)
            run_seeds.append(seed)
            run_keys.append(key)
            if cfg.trainer == "ep":
                variants.setdefault(cfg.name, [])
                if seed == seeds[0]:  # the depth analysis on the first seed only
                    variants[cfg.name] = ep_gradient_variants(
                        trained, config.ep_analysis, cfg.name, data
                    )
    t0 = time.perf_counter()
    models = []
    overrides = config.get("eval_overrides", None) or {}
    for key, clf, seed in zip(run_keys, classifiers, run_seeds, strict=True):
        var = variants.get(clf.name, ()) if seed == seeds[0] else ()
        ecfg = config.eval
        if key in overrides:
            ecfg = _merged(config.eval, overrides[key])
        models.append(
            evaluate_classifier(
                clf, data.x_test, data.y_test, ecfg, seed=seed, gradient_variants=var
            )
        )
    timing["evaluate all models"] = time.perf_counter() - t0
    trainers = ", ".join(f"{config.models[k].name} ({config.models[k].trainer})" for k in keys)
    notes = [f"models (trainer): {trainers}"]
    meta = dict(
        title=config.get("title", "Robustness study"),
        dataset=config.models[keys[0]].dataset,
        scale=config.get("scale", "?"),
        num_test=len(data.x_test),
        notes=notes,
        timing=timing,
        eval_config=config.eval.to_dict(),
        class_names=CLASS_NAMES.get(config.models[keys[0]].dataset),
    )
    results = dict(schema_version=SCHEMA_VERSION, meta=meta, models=models)
    timing["total before report"] = time.perf_counter() - t_start
    report.write_report(results, workdir if out_dir is None else out_dir)
    return results
