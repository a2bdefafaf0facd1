"""Fast Adaptive Boundary attack (Croce & Hein, 2020), FAB and FAB-T, Linf and L2."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eqrobust import compile_options
from eqrobust.attacks import _common as C

# Newton iterations before the exact sorted solve takes over (never reached on FAB's steps:
# 5-6 iterations on the trained BP-CNN's gradients and on random data, BUILD_NOTES).
NEWTON_MAX_ITER = 50


def project_hyperplane(p: jax.Array, w: jax.Array, b: jax.Array, norm: str) -> jax.Array:
    """Minimal-norm step onto a hyperplane inside the unit box, exactly (no tolerance).

    Solves min ||d|| s.t. w . (p + d) = b and 0 <= p + d <= 1. The optimum has the form
    d_i = clip(lam * u_i, -p_i, 1 - p_i) with u = sign(w) (Linf) or u = w (L2), so
    w . d = g(lam) = sum_i a_i min(lam, beta_i) (a_i >= 0, beta_i >= 0 where coordinate i
    saturates) is concave, piecewise linear and nondecreasing. Newton's method from lam = 0
    stays below the root of g(lam) = |c| (the tangent of a concave function lies above it) and
    reaches it exactly once it is on the root's linear piece (`_newton_lambda`); rows that need
    more than NEWTON_MAX_ITER steps get the sorted-breakpoint solution (`_sorted_lambda`), the
    O(D log D) method, which XLA:CPU's sort makes ~30x slower. If the box makes the hyperplane
    unreachable the fully saturated step (closest reachable point) is returned.

    Args:
        p: [N, D] points in [0, 1].
        w: [N, D] normals.
        b: [N] offsets.
        norm: "linf" or "l2".

    Returns:
        d: [N, D].
    """
    c = b - jnp.sum(w * p, axis=1)
    sgn = jnp.where(c < 0, -1.0, 1.0).astype(p.dtype)
    w = w * sgn[:, None]  # now w . d must reach |c| >= 0
    c = jnp.abs(c)
    lo, hi = -p, 1.0 - p
    bound = jnp.where(w > 0, hi, lo)  # how far each coordinate can move in its useful direction
    if norm == "linf":
        u = jnp.sign(w)
        a = jnp.abs(w)
        beta = jnp.abs(bound)
    else:
        u = w
        a = w * w
        beta = jnp.where(w != 0, bound / jnp.where(w != 0, w, 1.0), 0.0)
    lam, done = _newton_lambda(a, beta, c)
    lam = jax.lax.cond(
        jnp.all(done), lambda: lam, lambda: jnp.where(done, lam, _sorted_lambda(a, beta, c))
    )
    return jnp.clip(lam[:, None] * u, lo, hi)


def _newton_lambda(a: jax.Array, beta: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Root of g(lam) = sum_i a_i min(lam, beta_i) = c per row by Newton's method from 0 ->
    (lam [N], done [N]); unreachable rows (c >= g(inf)) get max beta, the saturated step.

    A step from lam < root uses the slope of the piece at lam; by concavity it lands at most at
    the root, so lam increases monotonically and stops when g(lam) >= c, the slope is 0 or a
    step makes no progress in floating point."""
    unreachable = c >= jnp.sum(a * beta, axis=1)

    def cond(s):
        i, _, done = s
        return (i < NEWTON_MAX_ITER) & ~jnp.all(done)

    def body(s):
        i, lam, done = s
        g = jnp.sum(a * jnp.minimum(lam[:, None], beta), axis=1)
        slope = jnp.sum(jnp.where(beta > lam[:, None], a, 0.0), axis=1)
        ok = ~done & (slope > 0) & (g < c)
        new = jnp.where(ok, lam + (c - g) / jnp.where(ok, slope, 1.0), lam)
        return i + 1, new, done | ~ok | (new <= lam)

    init = (jnp.int32(0), jnp.zeros_like(c), unreachable)
    _, lam, done = jax.lax.while_loop(cond, body, init)
    return jnp.where(unreachable, jnp.max(beta, axis=1), lam), done


def _sorted_lambda(a: jax.Array, beta: jax.Array, c: jax.Array) -> jax.Array:
    """Root of g(lam) = c per row from the sorted breakpoints beta (exact, O(D log D)); rows
    with c >= g(inf) get max beta."""
    order = jnp.argsort(beta, axis=1)
    beta_s = jnp.take_along_axis(beta, order, axis=1)
    a_s = jnp.take_along_axis(a, order, axis=1)
    cum_a = jnp.cumsum(a_s, axis=1)
    cum_ab = jnp.cumsum(a_s * beta_s, axis=1)
    total = cum_a[:, -1:]
    g_at = cum_ab + beta_s * (total - cum_a)  # w . d at lam = each breakpoint
    k = jnp.sum(g_at < c[:, None], axis=1)  # the segment holding the solution
    n = a.shape[1]
    prev = jnp.clip(k - 1, 0, n - 1)[:, None]
    s_prev = jnp.where(k > 0, jnp.take_along_axis(cum_ab, prev, axis=1)[:, 0], 0.0)
    a_rest = total[:, 0] - jnp.where(k > 0, jnp.take_along_axis(cum_a, prev, axis=1)[:, 0], 0.0)
    lam = jnp.where(a_rest > 0, (c - s_prev) / jnp.where(a_rest > 0, a_rest, 1.0), 0.0)
    return jnp.where(k >= n, beta_s[:, -1], lam)


def _fab_single(
    logits_fn, x, y, target, key, eps, active, use_rand, *, norm, steps, alpha_max, eta, beta
):
    """One FAB run; returns (best adversarial [B, ...], its distance [B] (inf if none), iters)."""
    b = x.shape[0]
    flat = lambda v: v.reshape(b, -1)

    if target is not None:

        def diff_and_grad(z):
            def f(z):
                lg = logits_fn(z)
                zt = jnp.take_along_axis(lg, target[:, None], 1)[:, 0]
                zy = jnp.take_along_axis(lg, y[:, None], 1)[:, 0]
                return jnp.sum(zt - zy), zt - zy

            (_, df), dg = jax.value_and_grad(f, has_aux=True)(z)
            return df, dg

    else:

        def diff_and_grad(z):
            lg, vjp = jax.vjp(logits_fn, z)
            k = lg.shape[-1]
            jac = jax.vmap(lambda e: vjp(jnp.broadcast_to(e, lg.shape))[0])(
                jnp.eye(k, dtype=z.dtype)
            )
            jac = jnp.moveaxis(jac, 0, 1)  # [B, K, H, W, C]
            jy = jnp.take_along_axis(jac, y[:, None, None, None, None], 1)
            dg = flat_k(jac - jy)
            df = lg - jnp.take_along_axis(lg, y[:, None], 1)
            dual = jnp.sum(jnp.abs(dg), -1) if norm == "linf" else jnp.sqrt(jnp.sum(dg**2, -1))
            d = jnp.abs(df) / (dual + 1e-12)
            d = jnp.where(jax.nn.one_hot(y, k, dtype=bool), jnp.inf, d)
            ind = jnp.argmin(d, axis=1)
            df = jnp.take_along_axis(df, ind[:, None], 1)[:, 0]
            dg = jnp.take_along_axis(dg, ind[:, None, None], 1)[:, 0]
            return df, dg.reshape(z.shape)

        def flat_k(j):
            return j.reshape(j.shape[0], j.shape[1], -1)

    if norm == "linf":
        t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
        start = x + eps * t / C.bcast(C.linf(t)) * 0.5
    else:
        t = jax.random.normal(key, x.shape, x.dtype)
        start = x + eps * t / C.bcast(C.l2(t) + 1e-12) * 0.5
    x1 = jnp.where(use_rand, jnp.clip(start, 0.0, 1.0), x)
    x1 = C.where_b(active, x1, x)

    def cond(s):
        i, _, _, _, act, _ = s
        return (i < steps) & jnp.any(act)

    def body(s):
        i, x1, adv, res, act, iters = s
        df, dg = diff_and_grad(x1)
        w = flat(dg)
        bb = -df + jnp.sum(w * flat(x1), axis=1)
        d = project_hyperplane(
            jnp.concatenate([flat(x1), flat(x)]),
            jnp.concatenate([w, w]),
            jnp.concatenate([bb, bb]),
            norm,
        )
        d1, d2 = d[:b].reshape(x.shape), d[b:].reshape(x.shape)
        a1 = jnp.maximum(C.dist(d1, norm), 1e-8)
        a2 = jnp.maximum(C.dist(d2, norm), 1e-8)
        alpha = C.bcast(jnp.clip(a1 / (a1 + a2), 0.0, alpha_max))
        xn = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x + eta * d2) * alpha, 0.0, 1.0)
        is_adv = C.misclassified(logits_fn(xn), y)
        tn = C.dist(xn - x, norm)
        better = act & is_adv & (tn < res)
        adv = C.where_b(better, xn, adv)
        res = jnp.where(better, tn, res)
        # Having crossed the boundary, move back towards x by beta (search for a closer one).
        xn = C.where_b(is_adv, x + (xn - x) * beta, xn)
        x1 = C.where_b(act, xn, x1)
        iters = iters + act.astype(jnp.int32)
        return i + 1, x1, adv, res, act & ~(res <= eps), iters

    init = (
        jnp.int32(0),
        x1,
        x,
        jnp.full((b,), jnp.inf, x.dtype),
        active,
        jnp.zeros((b,), jnp.int32),
    )
    _, _, adv, res, _, iters = jax.lax.while_loop(cond, body, init)
    return adv, res, iters


@functools.partial(
    compile_options.jit,
    static_argnames=(
        "norm",
        "steps",
        "targeted",
        "n_targets",
        "restarts",
        "alpha_max",
        "eta",
        "beta",
    ),
)
def _fab(
    logits_fn,
    x,
    y,
    key,
    eps,
    active,
    *,
    norm,
    steps,
    targeted,
    n_targets,
    restarts,
    alpha_max,
    eta,
    beta,
):
    clean = logits_fn(x)
    wrong = active & C.misclassified(clean, y)
    order = jnp.argsort(clean, axis=-1)
    runs = n_targets * restarts if targeted else restarts

    def run(r, carry):
        x_adv, success, iters = carry
        todo = active & ~success
        target = order[:, -(r // restarts) - 2] if targeted else None
        adv, res, it = _fab_single(
            logits_fn,
            x,
            y,
            target,
            jax.random.fold_in(key, r),
            eps,
            todo,
            (r % restarts) > 0,
            norm=norm,
            steps=steps,
            alpha_max=alpha_max,
            eta=eta,
            beta=beta,
        )
        ok = todo & (res <= eps)
        return C.where_b(ok, adv, x_adv), success | ok, iters + it

    init = (x, wrong, jnp.zeros(x.shape[0], jnp.int32))
    x_adv, success, iters = jax.lax.fori_loop(0, runs, run, init)
    success = active & C.misclassified(logits_fn(x_adv), y)
    return C.AttackResult(C.where_b(success, x_adv, x), success, iters)


def fab(
    logits_fn: C.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: float,
    norm: str = "linf",
    targeted: bool = True,
    n_target_classes: int = 9,
    steps: int = 100,
    restarts: int = 1,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    active: jax.Array | None = None,
) -> C.AttackResult:
    """FAB: iterated projections onto the linearised decision boundary, biased towards x.

    Each step projects both the current iterate and the clean point onto the linearised boundary
    (box-constrained, `project_hyperplane`), mixes the two with weight alpha <= alpha_max,
    extrapolates by eta, and after crossing the boundary moves back towards x by beta. FAB-T
    (targeted=True, AutoAttack) uses the boundary to each of the 2nd, 3rd, ... most likely clean
    classes in turn; untargeted FAB picks the closest linearised boundary (needs the full
    Jacobian, K backward passes). An example stops once it has an adversarial point within eps.

    Args:
        logits_fn: x [B, H, W, C] -> logits [B, K] (a pytree argument of the compiled attack, see
            `_common.as_pytree_fn`).
        x: [B, H, W, C] clean images in [0, 1].
        y: [B] int labels.
        key: PRNG key (random starts of restarts after the first).
        eps: threat model radius; success requires an adversarial point within it.
        norm: "linf" or "l2".
        targeted: FAB-T.
        n_target_classes: targets for FAB-T (<= K - 1).
        steps: iterations per run.
        restarts: runs per target; the first starts at x, later ones at random points.
        alpha_max, eta, beta: FAB's step constants (AutoAttack: 0.1, 1.05, 0.9).
        active: optional [B] bool mask of the examples to attack.

    Returns:
        AttackResult; x_adv is the closest adversarial found where successful, else x.
    """
    x, y = C.check_inputs(x, y, "fab", logits_fn)
    norm = C.check_norm(norm, "fab")
    C.check_eps(eps, "fab")
    if steps < 1 or restarts < 1:
        raise ValueError(f"fab: steps and restarts must be >= 1, got {steps}, {restarts}")
    k = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape[-1]
    if targeted and not 1 <= n_target_classes <= k - 1:
        raise ValueError(
            f"fab: n_target_classes must be in [1, K - 1 = {k - 1}], got {n_target_classes}"
        )
    return _fab(
        C.as_pytree_fn(logits_fn),
        x,
        y,
        key,
        jnp.asarray(eps, x.dtype),
        C.active_mask(active, x.shape[0]),
        norm=norm,
        steps=int(steps),
        targeted=bool(targeted),
        n_targets=int(n_target_classes),
        restarts=int(restarts),
        alpha_max=float(alpha_max),
        eta=float(eta),
        beta=float(beta),
    )
