"""Measurements of a classifier itself (not of an attack): is its attack gradient the derivative
of its prediction, and is its prediction deterministic?

These never read the classifier's metadata: a mislabelled gradient path, a surrogate gradient, a
zero gradient or a forward that draws fresh noise are found numerically.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from eqrobust import ops
from eqrobust.attacks import _common, losses
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
        k_noise, k_dir = jax.random.split(key)
        # Shrink into [interior, 1 - interior], then jitter by +-interior/2: no pixel is clipped,
        # so no constant regions (whose exact ties put a max pool's kink right at x0) remain.
        noise = jax.random.uniform(k_noise, x.shape, x.dtype, -interior / 2, interior / 2)
        x0 = interior + (1.0 - 2.0 * interior) * x + noise
        margin = jax.jit(lambda xx: _margin(fn, xx, y))
        dtype = str(margin(x0).dtype)
        grad = jax.grad(lambda xx: jnp.sum(_margin(fn, xx, y)))(x0)
        d = jax.random.normal(k_dir, (directions,) + x.shape, x.dtype)
        d = d / jnp.sqrt(jnp.sum(d * d, axis=(2, 3, 4), keepdims=True))  # unit L2 per image
        autodiff = jnp.sum((grad[None] * d).reshape(directions, x.shape[0], -1), axis=-1)
        fd = jnp.stack([(margin(x0 + step * di) - margin(x0 - step * di)) / (2 * step) for di in d])
        a, f = np.asarray(autodiff, np.float64).ravel(), np.asarray(fd, np.float64).ravel()
        zero = np.asarray(jnp.all(grad.reshape(x.shape[0], -1) == 0, axis=1))
    # Cross-entropy, as the attacks compute it, in the model's own precision: a saturated softmax
    # makes its gradient exactly zero although the margin's is not.
    x32 = jnp.asarray(x0, jnp.float32)
    ce = jax.grad(lambda xx: jnp.sum(losses.cross_entropy(logits_fn(xx), y)))(x32)
    ce_zero = np.asarray(jnp.all(ce.reshape(x.shape[0], -1) == 0, axis=1))
    corr = float(np.corrcoef(a, f)[0, 1]) if np.std(a) > 0 and np.std(f) > 0 else 0.0
    scale = np.abs(a) + np.abs(f)
    rel = np.where(scale > 0, np.abs(a - f) / np.where(scale > 0, scale, 1.0), 0.0)
    return GradientProbe(
        correlation=corr,
        relative_error=float(np.median(rel)),
        zero_gradient_fraction=float(zero.mean()),
        ce_zero_gradient_fraction=float(ce_zero.mean()),
        function_change=float(np.median(np.abs(f))),
        n=int(x.shape[0]),
        directions=int(directions),
        step=float(step),
        dtype=dtype,
    )


@functools.partial(jax.jit, static_argnames=("loss",))
def _zero_loss_gradient(logits_fn, x, y, *, loss):
    g = jax.grad(lambda xx: jnp.sum(losses.objective(loss, logits_fn(xx), y, None)))(x)
    return jnp.all(g.reshape(x.shape[0], -1) == 0, axis=1)


def zero_gradient_mask(
    logits_fn: LogitsFn, x: np.ndarray, y: np.ndarray, *, loss: str = "ce", batch_size: int = 250
) -> np.ndarray:
    """[N] bool: the input gradient of an attack's loss ("ce", "dlr", "margin") is exactly zero
    at x [N, H, W, C] (check (c): an attack that cannot move has "converged" trivially)."""
    fn = _common.as_pytree_fn(logits_fn)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    step = lambda xb, yb: _zero_loss_gradient(fn, xb, yb, loss=loss)
    return np.asarray(ops.run_chunked(step, x, y, batch_size=batch_size), bool)


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
    fn = jax.jit(lambda xx: residual_fn(xx.astype(jnp.float32)))
    r = np.asarray(ops.run_chunked(fn, np.asarray(x), batch_size=batch_size), np.float64)
    return ResidualProbe(
        mean=float(r.mean()), median=float(np.median(r)), max=float(r.max()), n=int(len(r))
    )
