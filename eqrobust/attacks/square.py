"""Square attack (Andriushchenko et al., 2020), score-based and gradient-free, Linf and L2."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eqrobust import compile_options
from eqrobust.attacks import _common as C
from eqrobust.attacks import losses

# p is halved after each of these iterations (AutoAttack's schedule, in iterations of 10k).
P_HALVING_ITERS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_SIGN_DRAWS = 8  # Linf: redraws of a window's signs until the proposal changes the image


class SquareResult(NamedTuple):
    """Result of the Square attack.

    Attributes:
        x_adv: [B, H, W, C] adversarial images (x where the example was not attacked).
        success: [B] bool, misclassified at x_adv.
        queries: [B] int32, model evaluations spent on the example (the clean check excluded).
    """

    x_adv: jax.Array
    success: jax.Array
    queries: jax.Array


def p_schedule(it, p_init: float, queries: int, rescale: bool = False):
    """Fraction p of pixels changed at iteration `it` (0-based; int or int array).

    p_init for it <= 10, p_init / 2 for 10 < it <= 50, ..., p_init / 512 for it > 8000.
    With rescale=True the iteration is first mapped to a 10,000-query budget (the original
    Square code); AutoAttack's standard version uses rescale=False.
    """
    if rescale:
        it = (it * 10000) // queries
    n = sum((it > t) * 1 for t in P_HALVING_ITERS)
    return p_init / 2.0**n


def eta_rect(rows: int, cols: int) -> np.ndarray:
    """Nested-rectangle profile of the L2 Square attack, unit Frobenius norm, [rows, cols]."""
    d = np.zeros((rows, cols))
    rc, cc = rows // 2 + 1, cols // 2 + 1
    for k in range(max(rc, cc)):
        d[max(rc - 1 - k, 0) : rc + k, max(cc - 1 - k, 0) : cc + k] += 1.0 / (k + 1) ** 2
    n = np.sqrt(np.sum(d**2))
    return d / n if n > 0 else d


def eta(s: int) -> np.ndarray:
    """The L2 Square window perturbation [s, s]: +profile on the top half, -profile below."""
    d = np.concatenate([eta_rect(s // 2, s), -eta_rect(s - s // 2, s)], axis=0)
    return d / np.sqrt(np.sum(d**2))


def _eta_rect_canvas(r: jax.Array, c: jax.Array, rows: jax.Array, cols: jax.Array, table):
    """eta_rect(rows, cols) evaluated at local coordinates (r, c) (0 outside), unnormalised.

    The value at (r, c) is sum_{k=a}^{m-1} 1/(k+1)^2 with a the smallest ring index covering the
    point and m = max(rows // 2 + 1, cols // 2 + 1); `table[n]` holds sum_{k<n} 1/(k+1)^2.
    """
    rc, cc = rows // 2 + 1, cols // 2 + 1
    a = jnp.maximum(jnp.maximum(rc - 1 - r, r - rc + 1), jnp.maximum(cc - 1 - c, c - cc + 1))
    a = jnp.maximum(a, 0)
    m = jnp.maximum(rc, cc)
    val = jnp.where(a < m, table[m] - table[jnp.minimum(a, m)], 0.0)
    return jnp.where((r >= 0) & (r < rows) & (c >= 0) & (c < cols), val, 0.0)


def eta_canvas(r: jax.Array, c: jax.Array, s: jax.Array, table: jax.Array) -> jax.Array:
    """eta(s)[r, c] for integer arrays of local coordinates (0 outside the window).

    Args:
        r, c: [B, H, W] local row/column indices (image index minus window origin).
        s: scalar window side (traced).
        table: cumulative sums of 1/(k+1)^2.

    Returns:
        [B, H, W] values; summed over the image it has unit L2 norm.
    """

    def unit(v):
        return v / jnp.sqrt(jnp.sum(v**2, axis=(1, 2), keepdims=True) + 1e-30)

    top = unit(_eta_rect_canvas(r, c, s // 2, s, table))
    bottom = unit(_eta_rect_canvas(r - s // 2, c, s - s // 2, s, table))
    return unit(top - bottom)


def _window(vh: jax.Array, vw: jax.Array, s: jax.Array, h: int, w: int):
    """[B, H, W] bool masks of the s x s windows at (vh, vw) and the local coordinates."""
    rows = jnp.arange(h)[None, :, None] - vh[:, None, None]
    cols = jnp.arange(w)[None, None, :] - vw[:, None, None]
    rows, cols = (
        jnp.broadcast_to(rows, (vh.shape[0], h, w)),
        jnp.broadcast_to(cols, (vh.shape[0], h, w)),
    )
    inside = (rows >= 0) & (rows < s) & (cols >= 0) & (cols < s)
    return inside, rows, cols


def _l2_init(key: jax.Array, x: jax.Array, eps: jax.Array) -> jax.Array:
    """Tiles of +-eta over the image, rescaled to the eps-sphere, clipped to [0, 1]."""
    b, h, w, c = x.shape
    s = max(h // 5, 1)
    sp = (h - s * 5) // 2 if h >= 5 else 0
    base = eta(s)
    delta = jnp.zeros_like(x)
    kt, ks = jax.random.split(key)
    n_tiles = (h // s) * (w // s)
    flips = jax.random.bernoulli(kt, 0.5, (n_tiles, b))
    signs = jax.random.rademacher(ks, (n_tiles, b, 1, 1, c), x.dtype)
    t = 0
    for i in range(h // s):
        for j in range(w // s):
            vh, vw = sp + i * s, sp + j * s
            hh, ww = min(s, h - vh), min(s, w - vw)
            if hh > 0 and ww > 0:
                tile = jnp.where(flips[t][:, None, None], base.T[None], base[None])[:, :hh, :ww]
                delta = delta.at[:, vh : vh + hh, vw : vw + ww, :].add(tile[..., None] * signs[t])
            t += 1
    delta = delta / C.bcast(C.l2(delta) + 1e-12)
    return jnp.clip(x + eps * delta, 0.0, 1.0)


@functools.partial(
    compile_options.jit, static_argnames=("norm", "queries", "p_init", "rescale", "loss")
)
def _square(logits_fn, x, y, key, eps, active, *, norm, queries, p_init, rescale, loss):
    b, h, w, c = x.shape
    n_feat = h * w * c
    side = min(h, w)  # windows are square; keep them inside non-square images
    table = jnp.asarray(
        np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, h + w + 3) ** 2)]), x.dtype
    )

    def score(logits):
        return (
            losses.margin(logits, y) if loss == "margin" else losses.cross_entropy(logits, y) * -1
        )

    k_init, k_loop = jax.random.split(key)
    clean_ok = ~C.misclassified(logits_fn(x), y)
    todo = active & clean_ok
    if norm == "linf":
        stripes = jax.random.rademacher(k_init, (b, 1, w, c), x.dtype)
        x_init = jnp.clip(x + eps * stripes, 0.0, 1.0)
    else:
        x_init = _l2_init(k_init, x, eps)
    x_best = C.where_b(todo, x_init, x)
    logits = logits_fn(x_best)
    loss_min = score(logits)
    margin_min = losses.margin(logits, y)
    q = todo.astype(jnp.int32)
    act = todo & (margin_min >= 0)

    def cond(st):
        i, _, _, _, act, _ = st
        return (i < queries - 1) & jnp.any(act)

    def body(st):
        i, x_best, loss_min, margin_min, act, q = st
        p = p_schedule(i, p_init, queries, rescale)
        ki = jax.random.split(jax.random.fold_in(k_loop, i), 6)
        if norm == "linf":
            s = jnp.clip(jnp.round(jnp.sqrt(p * n_feat / c)).astype(jnp.int32), 1, side - 1)
            vh = jax.random.randint(ki[0], (b,), 0, h - s)
            vw = jax.random.randint(ki[1], (b,), 0, w - s)
            inside, _, _ = _window(vh, vw, s, h, w)
            win = inside[..., None]
            signs = jax.random.rademacher(ki[2], (_SIGN_DRAWS, b, 1, 1, c), x.dtype)
            # A draw's window holds -2 eps or +2 eps per channel, so the two candidates of each
            # channel say which draws change the image (not one candidate image per draw).
            pm = jnp.asarray([-1.0, 1.0], x.dtype).reshape(2, 1, 1, 1, 1)
            cand = jnp.clip(jnp.clip(x_best + 2 * eps * pm, x - eps, x + eps), 0.0, 1.0)
            moves = jnp.any((jnp.abs(cand - x_best) >= 1e-7) & win, axis=(2, 3))  # [2, B, C]
            pos = signs[:, :, 0, 0, :] > 0  # [D, B, C]
            changed = jnp.any(jnp.where(pos, moves[1], moves[0]), axis=-1)  # [D, B]
            first = jnp.where(jnp.any(changed, 0), jnp.argmax(changed, 0), _SIGN_DRAWS - 1)
            sign = jnp.take_along_axis(signs, first[None, :, None, None, None], axis=0)[0]
            rest = jnp.clip(jnp.clip(x_best, x - eps, x + eps), 0.0, 1.0)
            x_new = jnp.where(win, jnp.where(sign > 0, cand[1], cand[0]), rest)
        else:
            s = jnp.maximum(jnp.round(jnp.sqrt(p * n_feat / c)).astype(jnp.int32), 3)
            s = jnp.minimum(s + (s % 2 == 0), side - 1)
            vh = jax.random.randint(ki[0], (b,), 0, h - s)
            vw = jax.random.randint(ki[1], (b,), 0, w - s)
            vh2 = jax.random.randint(ki[2], (b,), 0, h - s)
            vw2 = jax.random.randint(ki[3], (b,), 0, w - s)
            in1, r1, c1 = _window(vh, vw, s, h, w)
            in2, _, _ = _window(vh2, vw2, s, h, w)
            m1, m2 = in1[..., None], in2[..., None]
            delta = x_best - x
            norm_win1 = jnp.sqrt(jnp.sum(jnp.where(m1, delta**2, 0.0), axis=(1, 2), keepdims=True))
            norm_img = C.l2(delta)
            norm_wins = C.l2(jnp.where(m1 | m2, delta, 0.0))
            flip = jax.random.bernoulli(ki[4], 0.5, (b,))[:, None, None]
            prof = jnp.where(flip, eta_canvas(c1, r1, s, table), eta_canvas(r1, c1, s, table))
            sign = jax.random.rademacher(ki[5], (b, 1, 1, c), x.dtype)
            new = prof[..., None] * sign + jnp.where(m1, delta, 0.0) / (1e-12 + norm_win1)
            new_norm = jnp.sqrt(jnp.sum(jnp.where(m1, new**2, 0.0), axis=(1, 2), keepdims=True))
            budget = jnp.sqrt(jnp.maximum(eps**2 - norm_img**2, 0.0) / c + norm_wins**2)
            new = new / (1e-12 + new_norm) * C.bcast(budget)
            delta = jnp.where(m1, new, jnp.where(m2, 0.0, delta))
            x_new = jnp.clip(x + eps * delta / C.bcast(C.l2(delta) + 1e-12), 0.0, 1.0)
        logits = logits_fn(x_new)
        l_new = score(logits)
        improved = act & (l_new < loss_min)
        x_best = C.where_b(improved, x_new, x_best)
        loss_min = jnp.where(improved, l_new, loss_min)
        margin_min = jnp.where(improved, losses.margin(logits, y), margin_min)
        q = q + act.astype(jnp.int32)
        return i + 1, x_best, loss_min, margin_min, act & (margin_min >= 0), q

    st = (jnp.int32(0), x_best, loss_min, margin_min, act, q)
    _, x_best, _, _, _, q = jax.lax.while_loop(cond, body, st)
    success = active & C.misclassified(logits_fn(x_best), y)
    return SquareResult(x_best, success, q)


def square(
    logits_fn: C.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: float,
    norm: str = "linf",
    queries: int = 5000,
    p_init: float = 0.8,
    rescale_schedule: bool = False,
    loss: str = "margin",
    active: jax.Array | None = None,
) -> SquareResult:
    """Untargeted Square attack: random square updates accepted when the loss decreases.

    Only forward passes are used, so zero or masked gradients do not stop it. Each example
    draws its own window positions and signs; an example stops being queried as soon as it is
    misclassified (its margin z_y - max_{i != y} z_i drops below 0).

    Args:
        logits_fn: x [B, H, W, C] -> logits [B, K] (a pytree argument of the compiled attack, see
            `_common.as_pytree_fn`).
        x: [B, H, W, C] clean images in [0, 1].
        y: [B] int labels.
        key: PRNG key.
        eps: threat model radius.
        norm: "linf" (stripe init, +-2 eps windows) or "l2" (eta-profile windows that move
            perturbation mass between two windows).
        queries: query budget per example, the initial query included.
        p_init: initial fraction of pixels changed; halved by `p_schedule`.
        rescale_schedule: map iterations to a 10k budget before the schedule (original code).
        loss: "margin" (AutoAttack) or "ce" (minimise the negative cross-entropy).
        active: optional [B] bool mask of the examples to attack.

    Returns:
        SquareResult with x_adv, success and per-example queries.
    """
    x, y = C.check_inputs(x, y, "square", logits_fn)
    norm = C.check_norm(norm, "square")
    C.check_eps(eps, "square")
    if queries < 1:
        raise ValueError(f"square: queries must be >= 1, got {queries}")
    if not 0 < p_init <= 1:
        raise ValueError(f"square: p_init must be in (0, 1], got {p_init}")
    if min(x.shape[1], x.shape[2]) < 2:
        raise ValueError(f"square: images must be at least 2x2, got {tuple(x.shape[1:3])}")
    if loss not in ("margin", "ce"):
        raise ValueError(f"square: loss must be 'margin' or 'ce', got {loss!r}")
    return _square(
        C.as_pytree_fn(logits_fn),
        x,
        y,
        key,
        jnp.asarray(eps, x.dtype),
        C.active_mask(active, x.shape[0]),
        norm=norm,
        queries=int(queries),
        p_init=float(p_init),
        rescale=bool(rescale_schedule),
        loss=loss,
    )
