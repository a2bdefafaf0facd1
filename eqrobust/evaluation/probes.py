"""Measurements of a classifier itself (not of an attack): is its attack gradient the derivative
of its prediction, and is its prediction deterministic?

These never read the classifier's metadata: a mislabelled gradient path, a surrogate gradient, a
zero gradient or a forward that draws fresh noise are found numerically.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from eqrobust import compile_options, ops
from eqrobust.attacks import _common as C
from eqrobust.attacks import losses
from eqrobust.results import DeterminismProbe, GradientProbe, ResidualProbe

Array = jax.Array
LogitsFn = Callable[[Array], Array]


def _margin(logits_fn: LogitsFn, x: Array, y: Array) -> Array:
    """[B] true-class margin z_y - max_{j != y} z_j of the prediction at x."""
    return losses.margin(logits_fn(x), y)


def gradient_probe(
    logits_fn: LogitsFn,
    x: np.ndarray,
    y: np.ndarray,
    *,
    key: Array,
    directions: int = 4,
    step: float = 1e-5,
    interior: float = 0.02,
) -> GradientProbe:
    """Compares autodiff directional derivatives of the margin with central finite differences
    of the prediction itself.

    The points are moved into the interior of [0, 1] and jittered (`interior`): at exact ties,
    e.g. a constant background giving equal conv outputs in a max-pool window, the prediction has
    a kink (an EP-CNN's, whose dynamics route feedback to the pool's argmax, even a jump) right at
    the point, where no gradient can match both one-sided slopes; an attack's random start moves
    off them the same way. For each image and random unit direction d (L2),
    autodiff gives g.d = <grad margin(x), d>; the prediction gives
    fd = (margin(x + h d) - margin(x - h d)) / (2 h). An honest gradient gives g.d ~= fd; a
    zero, surrogate or shallower gradient does not.

    Runs in float64: the arrays of a pytree `logits_fn` (a `jax.tree_util.Partial` holding the
    weights, as every eqrobust model's) are cast, so finite differences with a small step are
    exact up to the prediction's kinks. A model that computes in float32 anyway is probed in
    float32 (`dtype` says which), where a step of 1e-5 is too small: pass a larger one.

    Args:
        logits_fn: the classifier's `logits_fn` (its forward value is the prediction).
        x: [N, H, W, C] images in [0, 1]; y: [N] labels.
        key: PRNG key (interior noise and directions).
        directions: random directions per image.
        step: finite-difference step h along the unit direction (L2 norm of the change).
        interior: size of the uniform noise moving points off the [0, 1] boundaries.

    Returns:
        `GradientProbe` with the correlation and median relative error over all (image,
        direction) pairs and the fraction of images whose gradient is exactly zero.
    """
    with jax.enable_x64(True):
        floating = lambda a: hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)
        to64 = lambda a: a.astype(jnp.float64) if floating(a) else a
        fn = jax.tree.map(to64, logits_fn)
        x = jnp.asarray(x, jnp.float64)
        y = jnp.asarray(y, jnp.int32)
        x0, d = _probe_points(x, key, directions, interior)
        margin = compile_options.jit(lambda xx: _margin(fn, xx, y))
        dtype = str(margin(x0).dtype)
        grad = jax.grad(lambda xx: jnp.sum(_margin(fn, xx, y)))(x0)
        autodiff = jnp.sum((grad[None] * d).reshape(directions, x.shape[0], -1), axis=-1)
        fd = jnp.stack([(margin(x0 + step * di) - margin(x0 - step * di)) / (2 * step) for di in d])
        a, f = np.asarray(autodiff, np.float64).ravel(), np.asarray(fd, np.float64).ravel()
        zero = np.asarray(jnp.all(grad.reshape(x.shape[0], -1) == 0, axis=1))
    # Cross-entropy, as the attacks compute it, in the model's own precision: a saturated softmax
    # makes its gradient exactly zero although the margin's is not.
    x32 = jnp.asarray(x0, jnp.float32)
    ce = jax.grad(lambda xx: jnp.sum(losses.cross_entropy(logits_fn(xx), y)))(x32)
    ce_zero = np.asarray(jnp.all(ce.reshape(x.shape[0], -1) == 0, axis=1))
    return _summary(a, f, zero, ce_zero, directions, step, dtype)


def _summary(
    a: np.ndarray,
    f: np.ndarray,
    zero: np.ndarray,
    ce_zero: np.ndarray,
    directions: int,
    step: float,
    dtype: str,
) -> GradientProbe:
    """GradientProbe of autodiff (a) vs finite-difference (f) directional derivatives, both
    flat over (direction, image); zero / ce_zero: [N] per-image zero-gradient flags."""
    corr = float(np.corrcoef(a, f)[0, 1]) if np.std(a) > 0 and np.std(f) > 0 else 0.0
    scale = np.abs(a) + np.abs(f)
    rel = np.where(scale > 0, np.abs(a - f) / np.where(scale > 0, scale, 1.0), 0.0)
    return GradientProbe(
        correlation=corr,
        relative_error=float(np.median(rel)),
        zero_gradient_fraction=float(zero.mean()),
        ce_zero_gradient_fraction=float(ce_zero.mean()),
        function_change=float(np.median(np.abs(f))),
        n=int(zero.shape[0]),
        directions=int(directions),
        step=float(step),
        dtype=dtype,
    )


@functools.partial(compile_options.jit, static_argnames=("loss",))
def _zero_loss_gradient(logits_fn, x, y, *, loss):
    g = jax.grad(lambda xx: jnp.sum(losses.objective(loss, logits_fn(xx), y, None)))(x)
    return jnp.all(g.reshape(x.shape[0], -1) == 0, axis=1)


def zero_gradient_mask(
    logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, *, loss: str = "ce", batch_size: int = 250
) -> np.ndarray:
    """[N] bool: the input gradient of an attack's loss ("ce", "dlr", "margin") is exactly zero
    at x [N, H, W, C] (check (c): an attack that cannot move has "converged" trivially)."""
    fn = C.as_pytree_fn(logits_fn)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    step = lambda xb, yb: _zero_loss_gradient(fn, xb, yb, loss=loss)
    return np.asarray(ops.run_chunked(step, x, y, batch_size=batch_size), bool)


def _straight_through(predict: LogitsFn, grad_logits: LogitsFn, x: Array) -> Array:
    """predict(x) forward; backward: the VJP of grad_logits at x (the cotangent is taken at
    predict's logits and pulled back through grad_logits' Jacobian)."""

    @jax.custom_vjp
    def logits(xa):
        return predict(xa)

    def fwd(xa):
        _, vjp = jax.vjp(grad_logits, xa)
        return predict(xa), vjp

    def bwd(vjp, ct):
        return vjp(ct)

    logits.defvjp(fwd, bwd)
    return logits(x)


def prediction_with_gradient(predict: LogitsFn, grad_logits: LogitsFn) -> jax.tree_util.Partial:
    """A logits function whose forward value is `predict` and whose input gradient follows
    `grad_logits` (straight-through, a `jax.custom_vjp`).

    This is what an attack that is judged on a defence's prediction but steps along another
    gradient path (a phantom gradient, a purified input held constant, BPDA, an intermediate
    surrogate) effectively attacks; `gradient_probe` of it measures whether that path is the
    derivative of the prediction (check (d)). Reverse mode only.

    Args:
        predict: x [B, H, W, C] -> logits [B, K], the prediction (judged, probed by finite
            differences).
        grad_logits: x -> [B, K] logits whose VJP is the attack's gradient path (its value is
            not used).

    Returns:
        a `jax.tree_util.Partial` (the arrays of both functions stay pytree leaves).
    """
    return jax.tree_util.Partial(
        _straight_through, C.as_pytree_fn(predict), C.as_pytree_fn(grad_logits)
    )


# The probe programs run once on a few images: compile them fast (XLA:CPU's LLVM optimisation
# dominates their cost; the optimised attack programs stay as they are).
_probe_jit = functools.partial(
    compile_options.jit,
    compiler_options={
        "xla_backend_optimization_level": 0,
        "xla_llvm_disable_expensive_passes": True,
    },
)


def _probe_points(x: Array, key: Array, directions: int, interior: float) -> tuple[Array, Array]:
    """(x0 [N, ...] moved into the interior and jittered, d [D, N, ...] unit L2 per image),
    as `gradient_probe` draws them."""
    k_noise, k_dir = jax.random.split(key)
    # Shrink into [interior, 1 - interior], then jitter by +-interior/2: no pixel is clipped,
    # so no constant regions (whose exact ties put a max pool's kink right at x0) remain.
    noise = jax.random.uniform(k_noise, x.shape, x.dtype, -interior / 2, interior / 2)
    x0 = interior + (1.0 - 2.0 * interior) * x + noise
    d = jax.random.normal(k_dir, (directions,) + x.shape, x.dtype)
    return x0, d / jnp.sqrt(jnp.sum(d * d, axis=(2, 3, 4), keepdims=True))  # unit L2 per image


@functools.partial(_probe_jit, static_argnames=("directions",))
def _fd_margins(
    predict: LogitsFn, x: Array, y: Array, key: Array, step: Array, interior: Array, *, directions
) -> tuple:
    """The probe points and one call of the prediction on [x0, x0 + h d, x0 - h d]: x0 [N, ...],
    d [D, N, ...], central differences [D, N] of the margin, its cotangent at predict(x0)
    [N, K] and the zeros [N] of the float32 CE cotangent there."""
    x0, d = _probe_points(x, key, directions, interior)
    n, k = x0.shape[0], directions
    pts = jnp.concatenate([x0[None], x0[None] + step * d, x0[None] - step * d])
    logits = predict(pts.reshape(-1, *x0.shape[1:]))
    m = losses.margin(logits, jnp.tile(y, 1 + 2 * k)).reshape(1 + 2 * k, n)
    fd = (m[1 : 1 + k] - m[1 + k :]) / (2 * step)
    z0 = logits[:n]
    ct = jax.grad(lambda z: jnp.sum(losses.margin(z, y)))(z0)
    p32 = jax.nn.softmax(z0.astype(jnp.float32), axis=-1)
    ce_zero = jnp.all(p32 - jax.nn.one_hot(y, z0.shape[-1], dtype=jnp.float32) == 0, axis=-1)
    return x0, d, fd, ct, ce_zero


@_probe_jit
def _path_vjp(grad_logits: LogitsFn, x0: Array, d: Array, ct: Array) -> tuple[Array, Array]:
    """Directional derivatives [D, N] of the path's VJP at cotangent ct, and its zeros [N]."""
    _, vjp = jax.vjp(grad_logits, x0)
    g = vjp(ct.astype(x0.dtype))[0]
    n = x0.shape[0]
    autodiff = jnp.sum((g[None] * d).reshape(d.shape[0], n, -1), axis=-1)
    return autodiff, jnp.all(g.reshape(n, -1) == 0, axis=1)


def gradient_path_probe(
    predict: LogitsFn,
    grad_logits: LogitsFn,
    x: np.ndarray,
    y: np.ndarray,
    *,
    key: Array,
    directions: int = 4,
    step: float = 1e-5,
    interior: float = 0.02,
) -> GradientProbe:
    """`gradient_probe(prediction_with_gradient(predict, grad_logits), ...)`, compiled in two
    programs that do not depend on each other (see `gradient_path_probes`).

    Args:
        predict: the prediction (forward value the attack is judged on).
        grad_logits: logits function whose VJP is the attack's gradient path.
        x, y, key, directions, step, interior: as `gradient_probe`.

    Returns:
        GradientProbe.
    """
    out = gradient_path_probes(
        predict,
        {"": grad_logits},
        x,
        y,
        key=key,
        directions=directions,
        step=step,
        interior=interior,
    )
    return out[""]


def gradient_path_probes(
    predict: LogitsFn,
    paths: Mapping[str, LogitsFn],
    x: np.ndarray,
    y: np.ndarray,
    *,
    key: Array,
    directions: int = 4,
    step: float = 1e-5,
    interior: float = 0.02,
) -> dict[str, GradientProbe]:
    """Check (d)'s measurement for several gradient paths of one prediction.

    For each path p: `gradient_probe(prediction_with_gradient(predict, p), ...)` on the same
    points and directions. The finite differences of the prediction's margin (one call of
    `predict` on all 2 D + 1 points per image) are computed once, in one program per
    prediction; each gradient is the VJP of its path at x0 with the margin's cotangent at
    predict(x0), one program per path. Both take the functions as pytree arguments, so models
    of one architecture, and defences probed with the same path, share the compilations.
    Float64 as `gradient_probe`; the cross-entropy zero-gradient fraction is that of a zero
    float32 CE cotangent at the prediction (a saturated softmax) rather than of a float32
    gradient.

    Args:
        predict: the prediction (forward value the attacks are judged on).
        paths: {name: logits function whose VJP is that attack's gradient path}.
        x, y, key, directions, step, interior: as `gradient_probe`.

    Returns:
        {name: GradientProbe}.
    """
    with jax.enable_x64(True):
        floating = lambda a: hasattr(a, "dtype") and jnp.issubdtype(a.dtype, jnp.floating)
        to64 = lambda fn: jax.tree.map(
            lambda a: a.astype(jnp.float64) if floating(a) else a, C.as_pytree_fn(fn)
        )
        x64, y = np.asarray(x, np.float64), np.asarray(y, np.int32)
        h, noise = np.float64(step), np.float64(interior)
        x0, d, fd, ct, ce_zero = _fd_margins(
            to64(predict), x64, y, key, h, noise, directions=int(directions)
        )
        f = np.asarray(fd, np.float64).ravel()
        out = {}
        for name, fn in paths.items():
            autodiff, zero = _path_vjp(to64(fn), x0, d, ct)
            a = np.asarray(autodiff, np.float64).ravel()
            out[name] = _summary(
                a, f, np.asarray(zero), np.asarray(ce_zero), directions, step, str(fd.dtype)
            )
    return out


def determinism_probe(logits_fn: LogitsFn, x: np.ndarray, *, calls: int = 3) -> DeterminismProbe:
    """Calls the forward `calls` times on the same images and measures the largest change of the
    logits and the fraction of changed predictions."""
    x = jnp.asarray(x, jnp.float32)
    outs = [np.asarray(logits_fn(x), np.float64) for _ in range(calls)]
    diff = max(float(np.max(np.abs(o - outs[0]))) for o in outs[1:])
    preds = np.stack([o.argmax(-1) for o in outs])  # [calls, N]
    flips = float(np.mean(np.any(preds != preds[0], axis=0)))
    return DeterminismProbe(max_logit_change=diff, prediction_change=flips, n=int(x.shape[0]))


def residual_probe(
    residual_fn: Callable[[Array], Array], x: np.ndarray, *, batch_size: int = 250
) -> ResidualProbe:
    """Relative residual of the predicted state on images x [N, H, W, C] (a fixed point that was
    not reached means the "equilibrium" prediction is an arbitrary unrolled net: gradients of an
    implicit or phantom path then need not match it)."""
    fn = compile_options.jit(lambda xx: residual_fn(xx.astype(jnp.float32)))
    r = np.asarray(ops.run_chunked(fn, np.asarray(x), batch_size=batch_size), np.float64)
    return ResidualProbe(
        mean=float(r.mean()), median=float(np.median(r)), max=float(r.max()), n=int(len(r))
    )
