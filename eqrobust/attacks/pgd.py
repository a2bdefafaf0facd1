"""Projected gradient descent (Madry et al., 2018), Linf and L2, per-example early stopping."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from eqrobust import compile_options
from eqrobust.attacks import _common as C
from eqrobust.attacks import losses


def random_start_pgd(key: jax.Array, x: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
    """Random point of the eps-ball around x, clipped to [0, 1].

    Linf: uniform in the cube. L2: a uniformly random direction with a radius uniform in [0, eps].
    """
    if norm == "linf":
        delta = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0) * eps
    else:
        kd, kr = jax.random.split(key)
        d = jax.random.normal(kd, x.shape, x.dtype)
        r = jax.random.uniform(kr, (x.shape[0],), x.dtype)
        delta = d / C.bcast(C.l2(d) + 1e-12) * C.bcast(r) * eps
    return jnp.clip(x + delta, 0.0, 1.0)


def _pgd_single(
    logits_fn, sample_fn, x, y, key, eps, step_size, active, *, norm, steps, random_start, loss,
    eot_iter,
):  # fmt: skip
    """One PGD run; examples misclassified (by logits_fn) at the current iterate are frozen
    there. With a sampler the gradient is the mean over eot_iter draws (`_common`)."""
    objective = lambda z: losses.objective(loss, z, y, None)  # noqa: E731
    vg = C.step_loss_and_grad(logits_fn, objective, sample_fn, eot_iter, key)
    x0 = random_start_pgd(key, x, eps, norm) if random_start else x
    x0 = C.where_b(active, x0, x)

    def cond(s):
        i, _, act, _ = s
        return (i < steps) & jnp.any(act)

    def body(s):
        i, xa, act, iters = s
        _, logits, g = vg(xa, i)
        act = act & ~C.misclassified(logits, y)
        xn = C.project(xa + step_size * C.normalized_step(g, norm), x, eps, norm)
        xa = C.where_b(act, xn, xa)
        return i + 1, xa, act, iters + act.astype(jnp.int32)

    init = (jnp.int32(0), x0, active, jnp.zeros(x.shape[0], jnp.int32))
    _, xa, _, iters = jax.lax.while_loop(cond, body, init)
    return xa, iters


@functools.partial(
    compile_options.jit,
    static_argnames=("norm", "steps", "random_start", "restarts", "loss", "eot_iter"),
)
def _pgd(
    logits_fn, sample_fn, x, y, key, eps, step_size, active, *, norm, steps, random_start,
    restarts, loss, eot_iter,
):  # fmt: skip
    def restart(r, carry):
        x_adv, success, iters = carry
        todo = active & ~success
        xa, it = _pgd_single(
            logits_fn,
            sample_fn,
            x,
            y,
            jax.random.fold_in(key, r),
            eps,
            step_size,
            todo,
            norm=norm,
            steps=steps,
            random_start=random_start,
            loss=loss,
            eot_iter=eot_iter,
        )
        ok = todo & C.misclassified(logits_fn(xa), y)
        x_adv = C.where_b(todo, xa, x_adv)
        return x_adv, success | ok, iters + it

    init = (x, jnp.zeros(x.shape[0], bool), jnp.zeros(x.shape[0], jnp.int32))
    return C.AttackResult(*jax.lax.fori_loop(0, restarts, restart, init))


def pgd(
    logits_fn: C.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: float,
    norm: str = "linf",
    steps: int = 20,
    step_size: float | None = None,
    step_fraction: float = 0.125,
    random_start: bool = True,
    restarts: int = 1,
    loss: str = "ce",
    active: jax.Array | None = None,
    eot_iter: int = 1,
    sample_logits_fn: C.SampleLogitsFn | None = None,
) -> C.AttackResult:
    """Untargeted PGD in the Linf or L2 ball intersected with [0, 1].

    Each step is x <- Proj(x + step_size * d) with d = sign(grad) (Linf) or grad / ||grad||_2
    (L2). An example stops being attacked as soon as it is misclassified; restarts (each from a
    fresh random start) run only on examples not yet broken.

    Args:
        logits_fn: x [B, H, W, C] -> logits [B, K]; a pure JAX function (jit-compatible). A
            `jax.tree_util.Partial` passes its arrays as traced arguments (see
            `_common.as_pytree_fn`); any other function is static, so pass the same function
            object to reuse the compilation.
        x: [B, H, W, C] clean images in [0, 1].
        y: [B] int labels.
        key: PRNG key (random starts).
        eps: radius of the threat model ball.
        norm: "linf" or "l2".
        steps: gradient steps per restart.
        step_size: step length; None means step_fraction * eps.
        step_fraction: the step as a fraction of eps when step_size is None (default 1/8: the EP
            papers' 20 steps of eps / 8; one setting for a whole eps grid).
        random_start: start from a random point of the ball (False reproduces the reference
            EP evaluation).
        restarts: number of runs.
        loss: "ce", "dlr" or "margin".
        active: optional [B] bool mask of the examples to attack; the others keep x_adv = x.
        eot_iter: expectation over transformation for randomised classifiers: each step's
            gradient (and loss) is the mean over eot_iter draws of `sample_logits_fn`, with
            keys folded in from the run's key and the iteration. > 1 needs a sampler.
        sample_logits_fn: optional randomised forward (x [B, H, W, C], key) -> logits [B, K]
            (`Classifier.sample_logits_fn`); when given, gradients come from its draws
            (eot_iter=1: a single draw per step). Success, early stopping included, is always
            judged with `logits_fn`, the forward the user can reproduce.

    Returns:
        AttackResult with x_adv [B, H, W, C], success [B] (misclassified at x_adv) and
        iterations [B] (gradient steps spent, summed over restarts).
    """
    x, y = C.check_inputs(x, y, "pgd", logits_fn)
    norm = C.check_norm(norm, "pgd")
    C.check_eps(eps, "pgd")
    if steps < 1 or restarts < 1:
        raise ValueError(f"pgd: steps and restarts must be >= 1, got {steps}, {restarts}")
    if loss not in ("ce", "dlr", "margin"):
        raise ValueError(f"pgd: loss must be 'ce', 'dlr' or 'margin', got {loss!r}")
    sample_fn = C.check_eot(eot_iter, sample_logits_fn, "pgd")
    if not step_fraction > 0:
        raise ValueError(f"pgd: step_fraction must be > 0, got {step_fraction}")
    ss = step_fraction * eps if step_size is None else step_size
    return _pgd(
        C.as_pytree_fn(logits_fn),
        sample_fn,
        x,
        y,
        key,
        jnp.asarray(eps, x.dtype),
        jnp.asarray(ss, x.dtype),
        C.active_mask(active, x.shape[0]),
        norm=norm,
        steps=int(steps),
        random_start=bool(random_start),
        restarts=int(restarts),
        loss=loss,
        eot_iter=int(eot_iter),
    )
