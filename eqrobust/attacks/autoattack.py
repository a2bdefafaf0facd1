"""Standard AutoAttack (Croce & Hein, 2020): APGD-CE -> APGD-T -> FAB-T -> Square, worst case."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eqrobust.attacks import _common as C
from eqrobust.attacks.apgd import apgd
from eqrobust.attacks.fab import fab
from eqrobust.attacks.square import square

# broken_by codes: -1 robust, 0 misclassified clean, j >= 1 broken by COMPONENTS[j - 1].
COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")
# The 'standard' budget: APGD/FAB iterations, Square queries, APGD-T/FAB-T target classes.
STANDARD_BUDGET = {"steps": 100, "queries": 5000, "targets": 9}


def is_reduced(settings: dict) -> bool:
    """Whether AutoAttack settings (missing keys: standard) are below the standard budget."""
    return any(settings.get(k, v) < v for k, v in STANDARD_BUDGET.items())


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
) -> dict:
    """Keyword arguments AutoAttack passes to component `name` (besides key, active).

    steps=100, queries=5000 and targets=9 are the 'standard' budgets; other values give a
    weaker, non-standard AutoAttack that must be reported as such.
    """
    if targets < 1:
        raise ValueError(f"autoattack: targets must be >= 1, got {targets}")
    n_targets = min(targets, num_classes - 1)
    if name == "apgd-ce":
        return dict(eps=eps, norm=norm, steps=steps, loss="ce", restarts=1)
    if name == "apgd-t":
        return dict(
            eps=eps,
            norm=norm,
            steps=steps,
            loss="dlr",
            targeted=True,
            n_target_classes=n_targets,
            restarts=1,
        )
    if name == "fab-t":
        return dict(
            eps=eps, norm=norm, steps=steps, targeted=True, n_target_classes=n_targets, restarts=1
        )
    if name == "square":
        return dict(eps=eps, norm=norm, queries=queries, p_init=0.8)
    raise ValueError(f"unknown AutoAttack component {name!r}; expected one of {COMPONENTS}")


def component_fn(name: str):
    """The attack function of component `name`."""
    return {"apgd-ce": apgd, "apgd-t": apgd, "fab-t": fab, "square": square}[name]


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
) -> AutoAttackResult:
    """Standard AutoAttack: each component attacks only the points that are still robust.

    Component j (1-based, in COMPONENTS order) runs with key `jax.random.fold_in(key, j)` and
    `component_kwargs`. With compact=True the still-robust points are gathered into a smaller
    batch (B/8, B/4 or B/2 rows, rounded up; padding masked out) so an expensive classifier is
    not run on points already broken; each of these few sizes compiles once. With
    compact=False every component runs on the full batch with the broken points masked, so a
    point's trajectory equals that of the same component run alone on the same batch and key,
    and robustness is pointwise <= each component's run alone.
    APGD-T and FAB-T need K >= 4 classes for the targeted DLR loss and use min(targets, K - 1)
    target classes (the runner-up classes by clean logit first).

    Args:
        logits_fn: x [B, H, W, C] -> logits [B, K] (pass the same object each call to reuse
            compilations).
        x: [B, H, W, C] clean images in [0, 1].
        y: [B] int labels.
        key: PRNG key.
        eps: threat model radius.
        norm: "linf" or "l2".
        version: only "standard" (randomised defences need an EOT version, not implemented).
        active: optional [B] bool mask of the examples to evaluate (others: robust False,
            broken_by -1, success False).
        compact: gather the still-robust points before each component (see above).
        steps: iterations of APGD-CE, APGD-T and FAB-T (standard: 100).
        queries: Square's query budget (standard: 5000). Smaller budgets are for CPU-scale runs
            on expensive classifiers and give a weaker attack; results must say so.
        targets: target classes of APGD-T and FAB-T (standard: 9); fewer is weaker, as above.

    Returns:
        AutoAttackResult.
    """
    if version != "standard":
        raise ValueError(f"autoattack: only version='standard' is implemented, got {version!r}")
    x, y = C.check_inputs(x, y, "autoattack", logits_fn)
    norm = C.check_norm(norm, "autoattack")
    C.check_eps(eps, "autoattack")
    k = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape[-1]
    if k < 4:
        raise ValueError(f"autoattack needs at least 4 classes (targeted DLR), got K = {k}")
    act = C.active_mask(active, x.shape[0])
    correct = ~C.misclassified(C.logits(logits_fn, x), y)
    robust = act & correct
    x_adv = x
    broken_by = jnp.where(act & ~correct, 0, -1).astype(jnp.int32)
    b = x.shape[0]
    for j, name in enumerate(COMPONENTS, start=1):
        n = int(jnp.sum(robust))
        if n == 0:
            break
        kw = component_kwargs(
            name, eps=eps, norm=norm, num_classes=k, steps=steps, queries=queries, targets=targets
        )
        kw["key"] = jax.random.fold_in(key, j)
        size = next((m for m in (-(-b // 8), -(-b // 4), -(-b // 2)) if m >= n), b)
        if compact and size < b:
            idx = np.flatnonzero(np.asarray(robust))
            idx = np.concatenate([idx, np.full(size - n, idx[0])])
            pad_mask = jnp.arange(size) < n
            part = component_fn(name)(logits_fn, x[idx], y[idx], active=pad_mask, **kw)
            succ = jnp.zeros(b, bool).at[idx[:n]].set(part.success[:n])
            adv = x.at[idx[:n]].set(part.x_adv[:n])
        else:
            res = component_fn(name)(logits_fn, x, y, active=robust, **kw)
            succ, adv = res.success, res.x_adv
        newly = robust & succ
        x_adv = C.where_b(newly, adv, x_adv)
        broken_by = jnp.where(newly, j, broken_by)
        robust = robust & ~succ
    success = act & ~robust & (broken_by >= 0)
    return AutoAttackResult(x_adv, success, robust, broken_by, act & correct)
