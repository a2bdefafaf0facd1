"""AutoAttack (Croce & Hein, 2020): standard (APGD-CE -> APGD-T -> FAB-T -> Square) and the
"rand" version for randomised classifiers (APGD-CE -> APGD-DLR with EOT), worst case."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eqrobust.attacks import _common as C
from eqrobust.attacks.apgd import apgd
from eqrobust.attacks.fab import fab
from eqrobust.attacks.square import square

# broken_by codes: -1 robust, 0 misclassified clean, j >= 1 broken by VERSIONS[version][j - 1].
COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")
# The reference 'rand' version: untargeted APGD-CE and APGD-DLR, 1 restart, EOT over 20 draws.
RAND_COMPONENTS = ("apgd-ce", "apgd-dlr")
VERSIONS = {"standard": COMPONENTS, "rand": RAND_COMPONENTS}
# The 'standard' budget: APGD/FAB iterations, Square queries, APGD-T/FAB-T target classes.
STANDARD_BUDGET = {"steps": 100, "queries": 5000, "targets": 9}
# The 'rand' budget: APGD iterations (rho 0.75, as apgd's RHO) and EOT draws per gradient.
RAND_BUDGET = {"steps": 100, "eot_iter": 20}


def is_reduced(settings: dict) -> bool:
    """Whether AutoAttack settings (missing keys: the version's standard budget) are below the
    budget of their version (`settings["version"]`, default "standard")."""
    budget = RAND_BUDGET if settings.get("version", "standard") == "rand" else STANDARD_BUDGET
    return any(settings.get(k, v) < v for k, v in budget.items())


def is_reduced_rand(settings: dict) -> bool:
    """`is_reduced` for settings of the "rand" version (which do not name it)."""
    return is_reduced({**settings, "version": "rand"})


class AutoAttackResult(NamedTuple):
    """Result of AutoAttack.

    Attributes:
        x_adv: [B, H, W, C] the first successful attack's point (x for robust examples).
        success: [B] bool, misclassified at x_adv (including clean errors).
        robust: [B] bool, correctly classified at x and under every component.
        broken_by: [B] int32, -1 robust, 0 clean error, j >= 1 broken by COMPONENTS[j - 1].
        clean_correct: [B] bool, correctly classified at x.
    """

    x_adv: jax.Array
    success: jax.Array
    robust: jax.Array
    broken_by: jax.Array
    clean_correct: jax.Array


def component_kwargs(
    name: str,
    *,
    eps: float,
    norm: str,
    num_classes: int,
    steps: int = 100,
    queries: int = 5000,
    targets: int = 9,
    eot_iter: int = 1,
) -> dict:
    """Keyword arguments AutoAttack passes to component `name` (besides key, active and a
    sampler).

    steps=100, queries=5000 and targets=9 are the 'standard' budgets; other values give a
    weaker, non-standard AutoAttack that must be reported as such. eot_iter > 1 (the "rand"
    version: 20) is passed to the APGD components.
    """
    if targets < 1:
        raise ValueError(f"autoattack: targets must be >= 1, got {targets}")
    n_targets = min(targets, num_classes - 1)
    eot = dict(eot_iter=eot_iter) if eot_iter > 1 else {}
    if name in ("apgd-ce", "apgd-dlr"):
        return dict(eps=eps, norm=norm, steps=steps, loss=name[5:], restarts=1, **eot)
    if name == "apgd-t":
        return dict(
            eps=eps,
            norm=norm,
            steps=steps,
            loss="dlr",
            targeted=True,
            n_target_classes=n_targets,
            restarts=1,
            **eot,
        )
    if name == "fab-t":
        return dict(
            eps=eps, norm=norm, steps=steps, targeted=True, n_target_classes=n_targets, restarts=1
        )
    if name == "square":
        return dict(eps=eps, norm=norm, queries=queries, p_init=0.8)
    known = COMPONENTS + RAND_COMPONENTS[1:]
    raise ValueError(f"unknown AutoAttack component {name!r}; expected one of {known}")


def component_fn(name: str):
    """The attack function of component `name`."""
    return {"apgd-ce": apgd, "apgd-dlr": apgd, "apgd-t": apgd, "fab-t": fab, "square": square}[name]


def _run_component(
    name: str,
    kw: dict,
    logits_fn: C.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    robust: jax.Array,
    compact: bool,
) -> tuple[jax.Array, jax.Array]:
    """Component `name` on the still-robust points -> (success [B], x_adv [B, H, W, C]).

    With compact=True the robust points are gathered into B/8, B/4 or B/2 rows (rounded up,
    padding masked out) when they fit; otherwise the full batch runs with the others masked.
    """
    b, n = x.shape[0], int(jnp.sum(robust))
    size = next((m for m in (-(-b // 8), -(-b // 4), -(-b // 2)) if m >= n), b)
    if compact and size < b:
        idx = np.flatnonzero(np.asarray(robust))
        idx = np.concatenate([idx, np.full(size - n, idx[0])])
        pad_mask = jnp.arange(size) < n
        part = component_fn(name)(logits_fn, x[idx], y[idx], active=pad_mask, **kw)
        succ = jnp.zeros(b, bool).at[idx[:n]].set(part.success[:n])
        return succ, x.at[idx[:n]].set(part.x_adv[:n])
    res = component_fn(name)(logits_fn, x, y, active=robust, **kw)
    return res.success, res.x_adv


def _check_version(
    version: str, eot_iter: int | None, sample_logits_fn: C.SampleLogitsFn | None, k: int
) -> int:
    """Validates the version against K and its EOT arguments -> the components' eot_iter."""
    if version not in VERSIONS:
        raise ValueError(f"autoattack: version must be one of {sorted(VERSIONS)}, got {version!r}")
    if version == "standard":
        if sample_logits_fn is not None or eot_iter not in (None, 1):
            raise ValueError(
                "autoattack: version='standard' attacks logits_fn without EOT; for a "
                "randomised classifier use version='rand' with its sample_logits_fn"
            )
        if k < 4:
            raise ValueError(f"autoattack needs at least 4 classes (targeted DLR), got K = {k}")
        return 1
    if k < 3:
        raise ValueError(f"autoattack version='rand' needs at least 3 classes (DLR), got K = {k}")
    n = RAND_BUDGET["eot_iter"] if eot_iter is None else eot_iter
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"autoattack: eot_iter must be an int >= 1, got {eot_iter!r}")
    return 1 if sample_logits_fn is None else n


def autoattack(
    logits_fn: C.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    active: jax.Array | None = None,
    compact: bool = True,
    steps: int = 100,
    queries: int = 5000,
    targets: int = 9,
    eot_iter: int | None = None,
    sample_logits_fn: C.SampleLogitsFn | None = None,
) -> AutoAttackResult:
    """AutoAttack: each component attacks only the points that are still robust.

    version="standard": APGD-CE -> APGD-T -> FAB-T -> Square (COMPONENTS). version="rand" (for
    randomised classifiers, as the reference code): APGD-CE -> APGD-DLR, untargeted, 1 restart,
    `steps` iterations, each gradient the mean over eot_iter = 20 draws of `sample_logits_fn`
    (RAND_COMPONENTS, RAND_BUDGET). Success is always judged with `logits_fn` (clean accuracy
    too), the forward the user can reproduce; the reference judges on a fresh random draw. A
    "rand" run without a sampler treats the classifier as deterministic: its draws would all be
    equal, so each gradient is computed once.
    Component j (1-based, in the version's order) runs with key `jax.random.fold_in(key, j)`
    and `component_kwargs`. With compact=True the still-robust points are gathered into a
    smaller batch (`_run_component`; each of its few sizes compiles once), so an expensive
    classifier is not run on points already broken. With compact=False every component runs on
    the full batch with the broken points masked, so a point's trajectory equals that of the
    same component run alone on the same batch and key, and robustness is pointwise <= each
    component's run alone. APGD-T and FAB-T need K >= 4 classes for the targeted DLR loss and
    use min(targets, K - 1) target classes (the runner-up classes by clean logit first).

    Args:
        logits_fn: x [B, H, W, C] -> logits [B, K] (pass the same object each call to reuse
            compilations); the judged forward.
        x: [B, H, W, C] clean images in [0, 1].
        y: [B] int labels.
        key: PRNG key.
        eps: threat model radius.
        norm: "linf" or "l2".
        version: "standard" or "rand".
        active: optional [B] bool mask of the examples to evaluate (others: robust False,
            broken_by -1, success False).
        compact: gather the still-robust points before each component (see above).
        steps: iterations of the APGD and FAB components (standard: 100).
        queries: Square's query budget (standard: 5000). Smaller budgets are for CPU-scale runs
            on expensive classifiers and give a weaker attack; results must say so.
        targets: target classes of APGD-T and FAB-T (standard: 9); fewer is weaker, as above.
        eot_iter: "rand" only: draws per gradient (None: 20); fewer is weaker, as above.
        sample_logits_fn: "rand" only: (x [B, H, W, C], key) -> logits [B, K], one draw of
            the classifier's randomness (`Classifier.sample_logits_fn`).

    Returns:
        AutoAttackResult; broken_by j >= 1 names VERSIONS[version][j - 1].
    """
    x, y = C.check_inputs(x, y, "autoattack", logits_fn)
    norm = C.check_norm(norm, "autoattack")
    C.check_eps(eps, "autoattack")
    k = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape[-1]
    n_eot = _check_version(version, eot_iter, sample_logits_fn, k)
    act = C.active_mask(active, x.shape[0])
    correct = ~C.misclassified(C.logits(logits_fn, x), y)
    robust = act & correct
    x_adv = x
    broken_by = jnp.where(act & ~correct, 0, -1).astype(jnp.int32)
    for j, name in enumerate(VERSIONS[version], start=1):
        if int(jnp.sum(robust)) == 0:
            break
        kw = component_kwargs(
            name, eps=eps, norm=norm, num_classes=k, steps=steps, queries=queries,
            targets=targets, eot_iter=n_eot,
        )  # fmt: skip
        kw["key"] = jax.random.fold_in(key, j)
        if sample_logits_fn is not None:  # "rand" only (`_check_version`)
            kw["sample_logits_fn"] = sample_logits_fn
        succ, adv = _run_component(name, kw, logits_fn, x, y, robust, compact)
        newly = robust & succ
        x_adv = C.where_b(newly, adv, x_adv)
        broken_by = jnp.where(newly, j, broken_by)
        robust = robust & ~succ
    success = act & ~robust & (broken_by >= 0)
    return AutoAttackResult(x_adv, success, robust, broken_by, act & correct)
