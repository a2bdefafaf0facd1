"""Shared helpers of the attacks: input checks, norms, projections, random starts, results."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eqrobust import compile_options, ops

LogitsFn = Callable[[jax.Array], jax.Array]
NORMS = ("linf", "l2")


class AttackResult(NamedTuple):
    """Result of a gradient attack (PGD, APGD, FAB, C&W).

    Attributes:
        x_adv: [B, H, W, C] adversarial images (the clean image where an example was not attacked).
        success: [B] bool, the example is misclassified at x_adv (and was attacked).
        iterations: [B] int32, gradient iterations spent on the example.
    """

    x_adv: jax.Array
    success: jax.Array
    iterations: jax.Array


def as_pytree_fn(logits_fn: LogitsFn) -> jax.tree_util.Partial:
    """`logits_fn` as a pytree callable for the compiled attack cores.

    A `jax.tree_util.Partial` (e.g. `eqrobust.models.logits_fn`) keeps its bound arrays (the
    model's parameters) as traced arguments, so they are not baked into the program as constants
    and models of one architecture share one compilation. Any other callable becomes a Partial
    without arguments: static, keyed on the function object as before.
    """
    if isinstance(logits_fn, jax.tree_util.Partial):
        return logits_fn
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable, got {type(logits_fn).__name__}")
    return jax.tree_util.Partial(logits_fn)


@compile_options.jit
def _apply(logits_fn: jax.tree_util.Partial, x: jax.Array) -> jax.Array:
    return logits_fn(x)


def logits(logits_fn: LogitsFn, x: jax.Array) -> jax.Array:
    """Compiled `logits_fn(x)`, one compilation per architecture (see `as_pytree_fn`)."""
    return _apply(as_pytree_fn(logits_fn), x)


def num_classes(logits_fn: LogitsFn, x: jax.Array) -> int:
    """K of `logits_fn` on images like x, by shape inference (no computation). Cached per
    program, parameter shapes and image shape, so the attacks' repeated calls trace it once."""
    fn = as_pytree_fn(logits_fn)
    leaves = tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(fn))
    key = (fn.func, leaves, tuple(x.shape[1:]), str(x.dtype))
    if key not in _NUM_CLASSES:
        if len(_NUM_CLASSES) >= 256:  # keys hold the functions (and their closures): bounded
            _NUM_CLASSES.clear()
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype))
        _NUM_CLASSES[key] = int(out.shape[-1])
    return _NUM_CLASSES[key]


_NUM_CLASSES: dict = {}


def check_inputs(
    x: jax.Array, y: jax.Array, who: str, logits_fn: LogitsFn | None = None
) -> tuple[jax.Array, jax.Array]:
    """Validates an attack's batch and returns (x float, y int32).

    Args:
        x: [B, H, W, C] float images in [0, 1], B >= 1.
        y: [B] int labels, in [0, K) where K is the classifier's number of classes (checked
            when logits_fn is given and y is concrete).
        who: the attack's name for error messages.
        logits_fn: the attacked classifier.
    """
    x = ops.check_images(x, who=who)
    if x.shape[0] == 0:
        raise ValueError(f"{who} got an empty batch (0 images); pass at least one image")
    k = None if logits_fn is None else num_classes(logits_fn, x)
    return x, ops.check_labels(y, x.shape[0], k, who=who)


def check_norm(norm: str, who: str) -> str:
    """Returns the lower-cased norm name or raises ValueError."""
    n = str(norm).lower()
    if n not in NORMS:
        raise ValueError(f"{who}: norm must be one of {NORMS}, got {norm!r}")
    return n


def check_eps(eps: float, who: str) -> float:
    """Raises ValueError unless eps is a positive number."""
    if not isinstance(eps, jax.core.Tracer) and not float(eps) > 0:
        raise ValueError(f"{who}: eps must be > 0, got {eps}")
    return eps


def active_mask(active: jax.Array | None, batch: int) -> jax.Array:
    """[B] bool mask of the examples to attack (all when None)."""
    if active is None:
        return jnp.ones((batch,), bool)
    active = jnp.asarray(active, bool)
    if active.shape != (batch,):
        raise ValueError(f"active must be a [B] = [{batch}] bool mask, got {tuple(active.shape)}")
    return active


def bcast(v: jax.Array) -> jax.Array:
    """[B] -> [B, 1, 1, 1] for broadcasting against images."""
    return v.reshape((-1, 1, 1, 1))


def where_b(mask: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """Per-example select: mask [B], a and b [B, ...]."""
    return jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)


def l2(v: jax.Array) -> jax.Array:
    """Per-example L2 norm: [B, H, W, C] -> [B]."""
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2, 3)))


def linf(v: jax.Array) -> jax.Array:
    """Per-example Linf norm: [B, H, W, C] -> [B]."""
    return jnp.max(jnp.abs(v), axis=(1, 2, 3))


def dist(v: jax.Array, norm: str) -> jax.Array:
    """Per-example norm of a perturbation [B, H, W, C] -> [B]."""
    return linf(v) if norm == "linf" else l2(v)


def project(x_adv: jax.Array, x: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
    """Projects x_adv onto the eps-ball around x intersected with [0, 1].

    Clipping to [0, 1] after the ball projection only shrinks every coordinate of the
    perturbation (x is in [0, 1]), so the result stays inside the ball.
    """
    if norm == "linf":
        x_adv = jnp.clip(x_adv, x - eps, x + eps)
    else:
        delta = x_adv - x
        n = l2(delta)
        delta = delta * bcast(jnp.minimum(1.0, eps / (n + 1e-12)))
        x_adv = x + delta
    return jnp.clip(x_adv, 0.0, 1.0)


def normalized_step(g: jax.Array, norm: str) -> jax.Array:
    """Steepest-ascent direction of unit norm: sign(g) for Linf, g / ||g||_2 for L2."""
    if norm == "linf":
        return jnp.sign(g)
    return g / bcast(l2(g) + 1e-12)


def misclassified(logits: jax.Array, y: jax.Array) -> jax.Array:
    """[B, K], [B] -> [B] bool: argmax differs from y."""
    return jnp.argmax(logits, axis=-1) != y


def loss_and_grad(logits_fn: LogitsFn, objective: Callable[[jax.Array], jax.Array]):
    """x -> ((per-example objective [B], logits [B, K]), gradient of the summed objective).

    Summing per-example objectives gives each example its own gradient, because the
    classifier treats examples independently (eval mode).
    """

    def f(xa: jax.Array):
        logits = logits_fn(xa)
        obj = objective(logits)
        return jnp.sum(obj), (obj, logits)

    def vg(xa: jax.Array):
        (_, (obj, logits)), g = jax.value_and_grad(f, has_aux=True)(xa)
        return obj, logits, g

    return vg


SampleLogitsFn = Callable[[jax.Array, jax.Array], jax.Array]
# Folded into an attack run's key to derive its EOT draws' keys (apart from its random start).
_EOT_TAG = 0x454F54


def eot_loss_and_grad(
    logits_fn: LogitsFn,
    sample_logits_fn: SampleLogitsFn,
    objective: Callable[[jax.Array], jax.Array],
    eot_iter: int,
):
    """Expectation over transformation: (x, key) -> (objective [B], logits [B, K], grad).

    The objective [B] and the gradient [B, H, W, C] are means over `eot_iter` draws
    `sample_logits_fn(x, k_j)`, k_j = `jax.random.split(key, eot_iter)[j]`, accumulated in one
    `lax.fori_loop` (memory of one draw, not eot_iter). The logits are `logits_fn(x)`, the
    reproducible forward that judges success (one extra forward, no gradient). The reference
    AutoAttack also averages the gradients; its loss value is the last draw's, here the mean.
    """

    def draw(xa: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
        def f(z: jax.Array):
            obj = objective(sample_logits_fn(z, k))
            return jnp.sum(obj), obj

        (_, obj), g = jax.value_and_grad(f, has_aux=True)(xa)
        return obj, g

    def vg(xa: jax.Array, key: jax.Array):
        keys = jax.random.split(key, eot_iter)

        def body(j: jax.Array, acc: tuple[jax.Array, jax.Array]):
            obj, g = draw(xa, keys[j])
            return acc[0] + obj, acc[1] + g

        init = (jnp.zeros(xa.shape[0], xa.dtype), jnp.zeros_like(xa))
        obj, g = jax.lax.fori_loop(0, eot_iter, body, init)
        return obj / eot_iter, logits_fn(xa), g / eot_iter

    return vg


def step_loss_and_grad(
    logits_fn: LogitsFn,
    objective: Callable[[jax.Array], jax.Array],
    sample_logits_fn: SampleLogitsFn | None,
    eot_iter: int,
    key: jax.Array,
):
    """(x, step) -> (objective [B], judged logits [B, K], gradient [B, H, W, C]) of an attack.

    Without a sampler: `loss_and_grad(logits_fn, objective)` at x, the step unused (the program
    of the attacks before EOT, unchanged). With one: `eot_loss_and_grad` with the key
    `fold_in(fold_in(key, _EOT_TAG), step)`, so every iteration of a run draws fresh samples.
    """
    if sample_logits_fn is None:
        vg = loss_and_grad(logits_fn, objective)
        return lambda xa, step: vg(xa)
    vg_eot = eot_loss_and_grad(logits_fn, sample_logits_fn, objective, eot_iter)
    base = jax.random.fold_in(key, _EOT_TAG)
    return lambda xa, step: vg_eot(xa, jax.random.fold_in(base, step))


def check_eot(
    eot_iter: int, sample_logits_fn: SampleLogitsFn | None, who: str
) -> jax.tree_util.Partial | None:
    """Validates `eot_iter` (>= 1; > 1 needs a sampler) -> the sampler as a pytree callable."""
    if not (isinstance(eot_iter, int) and eot_iter >= 1):
        raise ValueError(f"{who}: eot_iter must be an int >= 1, got {eot_iter!r}")
    if sample_logits_fn is None:
        if eot_iter > 1:
            raise ValueError(
                f"{who}: eot_iter={eot_iter} averages gradients over random draws of "
                "sample_logits_fn(x, key), but none was given; pass the classifier's sampler, "
                "or eot_iter=1 for a deterministic classifier"
            )
        return None
    return as_pytree_fn(sample_logits_fn)
