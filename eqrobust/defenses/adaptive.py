"""Attacks on the test-time defences: transfer and adaptive PGD, judged on the defended output."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eqrobust.attacks import _common as C
from eqrobust.attacks import pgd
from eqrobust.defenses.entropy import EntropyReduction, entropy_reduction_logits_fn
from eqrobust.models.deq import deq_classifier

LogitsFn = Callable[[jax.Array], jax.Array]

# transfer: PGD on the undefended DEQ (its declared gradient), x_adv then fed to the defence.
# full / bpda / phantom: PGD on the defended forward with the gradient of that mode
# (see `eqrobust.defenses.entropy.MODES`).
ER_VARIANTS = ("transfer", "full", "bpda", "phantom")


class DefenseAttackResult(NamedTuple):
    """What `attack_defense` returns.

    Attributes:
        accuracy: {"clean": defended clean accuracy, <variant>: defended accuracy at that
            variant's x_adv, ..., "worst": per-example worst case over all variants}.
        robust: {<variant> or "clean" or "worst": [B] bool, defended prediction correct}.
        x_adv: {<variant>: [B, H, W, C] adversarial images}.
    """

    accuracy: dict[str, float]
    robust: dict[str, np.ndarray]
    x_adv: dict[str, np.ndarray]


def attack_defense(
    defended: LogitsFn,
    surrogates: Mapping[str, LogitsFn],
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: float,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    restarts: int = 1,
) -> DefenseAttackResult:
    """PGD through each surrogate's gradient; success always judged on the defended output.

    Every variant uses the same PGD settings and key. A surrogate whose forward value is the
    defended prediction (an adaptive attack) stops attacking an example once the defence is
    fooled; a transfer surrogate (the undefended model) stops once the undefended model is.

    Args:
        defended: x [B, H, W, C] -> defended logits [B, K] (the prediction being evaluated).
        surrogates: {variant name: logits_fn whose input gradient PGD follows}.
        x: [B, H, W, C] clean images in [0, 1].
        y: [B] int labels.
        key: PRNG key of PGD's random starts (fixed: results are deterministic).
        eps, norm, steps, step_size, random_start, restarts: PGD settings (step_size None:
            eps / 4, the DEQ papers' 2/255 at 8/255).

    Returns:
        DefenseAttackResult with side-by-side accuracies.
    """
    ss = eps / 4.0 if step_size is None else step_size
    correct = lambda xa: np.asarray(jnp.argmax(C.logits(defended, xa), -1) == y)
    robust = {"clean": correct(x)}
    x_adv: dict[str, np.ndarray] = {}
    for name, fn in surrogates.items():
        res = pgd(
            fn,
            x,
            y,
            key=key,
            eps=eps,
            norm=norm,
            steps=steps,
            step_size=ss,
            random_start=random_start,
            restarts=restarts,
        )
        x_adv[name] = np.asarray(res.x_adv)
        robust[name] = correct(res.x_adv)
    robust["worst"] = np.logical_and.reduce([robust[k] for k in robust])
    accuracy = {k: float(v.mean()) for k, v in robust.items()}
    return DefenseAttackResult(accuracy, robust, x_adv)


def entropy_reduction_surrogates(
    model: Any, cfg: EntropyReduction, variants: Sequence[str] = ER_VARIANTS
) -> dict[str, LogitsFn]:
    """{variant: logits_fn} for `attack_defense` on the entropy-reduction defence of `model`."""
    out: dict[str, LogitsFn] = {}
    for v in variants:
        if v not in ER_VARIANTS:
            raise ValueError(f"unknown variant {v!r}; expected one of {ER_VARIANTS}")
        if v == "transfer":
            out[v] = deq_classifier(model).logits_fn
        else:
            out[v] = entropy_reduction_logits_fn(model, cfg, mode=v)
    return out


def attack_entropy_reduction(
    model: Any,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    cfg: EntropyReduction | None = None,
    variants: Sequence[str] = ER_VARIANTS,
    eps: float = 8 / 255,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
) -> DefenseAttackResult:
    """Transfer and adaptive PGD on a DEQ with entropy reduction, side by side.

    Args:
        model: a DEQNet (Broyden forward solver).
        x: [B, H, W, C] clean images in [0, 1].
        y: [B] int labels.
        key: PRNG key (PGD random starts).
        cfg: the defence's settings (None: EntropyReduction()).
        variants: a subset of `ER_VARIANTS`.
        eps, norm, steps, step_size, random_start: PGD settings (default PGD-10, Linf 8/255).

    Returns:
        DefenseAttackResult (accuracies of the defended prediction per variant and worst case).
    """
    cfg = EntropyReduction() if cfg is None else cfg
    return attack_defense(
        entropy_reduction_logits_fn(model, cfg, mode="none"),
        entropy_reduction_surrogates(model, cfg, variants),
        x,
        y,
        key=key,
        eps=eps,
        norm=norm,
        steps=steps,
        step_size=step_size,
        random_start=random_start,
    )
