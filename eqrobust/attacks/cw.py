"""Carlini & Wagner L2 attack (2017): Adam in tanh space with a per-example binary search on c."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eqrobust import compile_options
from eqrobust.attacks import _common as C
from eqrobust.attacks import losses

_ADAM_B1, _ADAM_B2, _ADAM_EPS = 0.9, 0.999, 1e-8
_UPPER_INIT = 1e10


class CWResult(NamedTuple):
    """Result of C&W-L2.

    Attributes:
        x_adv: [B, H, W, C] smallest adversarial found (x where none was found).
        success: [B] bool, misclassified at x_adv.
        iterations: [B] int32, Adam steps spent on the example (all binary-search steps).
        l2: [B] L2 norm of x_adv - x (0 where unsuccessful).
    """

    x_adv: jax.Array
    success: jax.Array
    iterations: jax.Array
    l2: jax.Array


def _to_img(w: jax.Array) -> jax.Array:
    return (jnp.tanh(w) + 1.0) / 2.0


@functools.partial(
    compile_options.jit, static_argnames=("steps", "binary_search_steps", "abort_early")
)
def _cw(logits_fn, x, y, c0, lr, confidence, active, *, steps, binary_search_steps, abort_early):
    b = x.shape[0]
    w0 = jnp.arctanh(jnp.clip(2.0 * x - 1.0, -1 + 1e-6, 1 - 1e-6))

    def objective(w, const):
        xa = _to_img(w)
        logits = logits_fn(xa)
        dist = jnp.sum((xa - x) ** 2, axis=(1, 2, 3))
        f = jnp.maximum(losses.margin(logits, y) + confidence, 0.0)
        per = dist + const * f
        return jnp.sum(per), (per, logits, xa, dist)

    vg = jax.value_and_grad(objective, has_aux=True)
    check_every = max(steps // 10, 1)

    def search_fn(_, carry):
        const, lower, upper, best_d, best_x, iters = carry

        def cond(s):
            return (s[0] < steps) & jnp.any(s[6])

        def body(s):
            i, w, m, v, found, prev, act, it, best_d, best_x = s
            (_, (per, logits, xa, d)), g = vg(w, const)
            adv = act & (losses.margin(logits, y) + confidence < 0)
            better = adv & (d < best_d)
            best_d = jnp.where(better, d, best_d)
            best_x = C.where_b(better, xa, best_x)
            found = found | adv
            t = (i + 1).astype(x.dtype)
            m = _ADAM_B1 * m + (1 - _ADAM_B1) * g
            v = _ADAM_B2 * v + (1 - _ADAM_B2) * g * g
            upd = lr * (m / (1 - _ADAM_B1**t)) / (jnp.sqrt(v / (1 - _ADAM_B2**t)) + _ADAM_EPS)
            it = it + act.astype(jnp.int32)
            w = C.where_b(act, w - upd, w)
            if abort_early:
                # Stop an example whose objective stalled over the last tenth of the steps.
                check = (i % check_every == 0) & (i > 0)
                stall = check & (per > 0.9999 * prev)
                prev = jnp.where(check, per, prev)
                act = act & ~stall
            return i + 1, w, m, v, found, prev, act, it, best_d, best_x

        z = jnp.zeros_like(x)
        init = (
            jnp.int32(0),
            w0,
            z,
            z,
            jnp.zeros(b, bool),
            jnp.full((b,), jnp.inf, x.dtype),
            active,
            iters,
            best_d,
            best_x,
        )
        _, _, _, _, found, _, _, iters, best_d, best_x = jax.lax.while_loop(cond, body, init)
        # Binary search on c: shrink it where an adversarial was found, grow it elsewhere.
        upper = jnp.where(found, jnp.minimum(upper, const), upper)
        lower = jnp.where(found, lower, jnp.maximum(lower, const))
        bounded = upper < _UPPER_INIT * 0.1
        const = jnp.where(bounded, (lower + upper) / 2, const * 10)
        return const, lower, upper, best_d, best_x, iters

    init = (
        jnp.full((b,), c0, x.dtype),
        jnp.zeros((b,), x.dtype),
        jnp.full((b,), _UPPER_INIT, x.dtype),
        jnp.full((b,), jnp.inf, x.dtype),
        x,
        jnp.zeros((b,), jnp.int32),
    )
    _, _, _, best_d, best_x, iters = jax.lax.fori_loop(0, binary_search_steps, search_fn, init)
    success = active & C.misclassified(logits_fn(best_x), y)
    x_adv = C.where_b(success, best_x, x)
    return CWResult(x_adv, success, iters, jnp.where(success, C.l2(x_adv - x), 0.0))


def cw_l2(
    logits_fn: C.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array | None = None,
    c: float = 0.01,
    steps: int = 100,
    lr: float = 0.01,
    confidence: float = 0.0,
    binary_search_steps: int = 10,
    abort_early: bool = True,
    active: jax.Array | None = None,
) -> CWResult:
    """Minimum-norm L2 attack: minimise ||x' - x||^2 + c * max(z_y - max_{i!=y} z_i + kappa, 0).

    x' = (tanh(w) + 1) / 2 keeps the image in [0, 1]; Adam runs `steps` iterations per value of
    c, and c follows a per-example binary search (x10 until the first success). The smallest
    adversarial over all iterates is kept. Defaults follow ART (lr 0.01, 10 search steps,
    confidence 0, initial c 0.01). The attack is deterministic; `key` is accepted for a uniform
    interface.

    Args:
        logits_fn: x [B, H, W, C] -> logits [B, K] (a pytree argument of the compiled attack, see
            `_common.as_pytree_fn`).
        x: [B, H, W, C] clean images in [0, 1].
        y: [B] int labels.
        key: unused.
        c: initial trade-off constant.
        steps: Adam steps per binary-search step.
        lr: Adam learning rate.
        confidence: margin kappa required of an adversarial.
        binary_search_steps: values of c tried.
        abort_early: stop an example's search step when its objective stalls.
        active: optional [B] bool mask of the examples to attack.

    Returns:
        CWResult with x_adv, success, iterations and the L2 distance.
    """
    del key
    x, y = C.check_inputs(x, y, "cw_l2", logits_fn)
    if steps < 1 or binary_search_steps < 1:
        raise ValueError(
            f"cw_l2: steps and binary_search_steps must be >= 1, got {steps}, {binary_search_steps}"
        )
    if not c > 0 or not lr > 0 or confidence < 0:
        raise ValueError(f"cw_l2: need c > 0, lr > 0, confidence >= 0; got {c}, {lr}, {confidence}")
    return _cw(
        C.as_pytree_fn(logits_fn),
        x,
        y,
        jnp.asarray(c, x.dtype),
        jnp.asarray(lr, x.dtype),
        jnp.asarray(confidence, x.dtype),
        C.active_mask(active, x.shape[0]),
        steps=int(steps),
        binary_search_steps=int(binary_search_steps),
        abort_early=bool(abort_early),
    )
