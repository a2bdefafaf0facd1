"""Auto-PGD (Croce & Hein, 2020): APGD-CE, APGD-DLR and targeted APGD-T, Linf and L2."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eqrobust import compile_options
from eqrobust.attacks import _common as C
from eqrobust.attacks import losses

MOMENTUM = 0.75  # alpha of the heavy-ball update (1.0 on the first step)
RHO = 0.75  # a step is halved when at most this fraction of the window's steps improved


def schedule_constants(steps: int) -> tuple[int, int, int]:
    """(first window, window decrement, minimal window) in iterations, as the reference code.

    They realise the checkpoints p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
    0.06) of the paper with integer arithmetic (no float rounding at the boundaries).
    """
    return max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)


def checkpoints(steps: int) -> list[int]:
    """0-based iterations at which APGD checks its step size (100 steps -> 21, 40, ..., 98)."""
    k, decr, k_min = schedule_constants(steps)
    out, i = [], k - 1
    while i < steps:
        out.append(i)
        k = max(k - decr, k_min)
        i += k
    return out


def random_start_apgd(key: jax.Array, x: jax.Array, eps: jax.Array, norm: str) -> jax.Array:
    """APGD's start: Linf x + eps * t / ||t||_inf, t ~ U(-1, 1); L2 on the sphere; clipped."""
    if norm == "linf":
        t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
        delta = eps * t / C.bcast(C.linf(t))
    else:
        t = jax.random.normal(key, x.shape, x.dtype)
        delta = eps * t / C.bcast(C.l2(t) + 1e-12)
    return jnp.clip(x + delta, 0.0, 1.0)


class _State(NamedTuple):
    i: jax.Array  # iteration (global)
    counter: jax.Array  # iterations since the last checkpoint (global)
    k: jax.Array  # current window length (global)
    x_adv: jax.Array
    x_old: jax.Array
    grad: jax.Array
    x_best: jax.Array
    grad_best: jax.Array
    loss_best: jax.Array
    loss_prev: jax.Array
    loss_best_last: jax.Array
    reduced_last: jax.Array
    n_improved: jax.Array
    step: jax.Array
    x_found: jax.Array  # last misclassified iterate
    active: jax.Array
    iters: jax.Array


def _apgd_single(
    logits_fn, sample_fn, x, y, target, key, eps, active, *, norm, steps, loss, eot_iter
):
    """One APGD run -> (x_adv, iterations); fooled examples (judged by logits_fn) freeze at the
    fooling point. With a sampler, losses and gradients are means over eot_iter draws."""
    objective = lambda z: losses.objective(loss, z, y, target)  # noqa: E731
    vg = C.step_loss_and_grad(logits_fn, objective, sample_fn, eot_iter, key)
    k0, decr, k_min = schedule_constants(steps)
    x0 = C.where_b(active, random_start_apgd(key, x, eps, norm), x)
    obj, logits, g = vg(x0, steps)  # EOT key index `steps`: the loop uses 0..steps-1
    fooled = C.misclassified(logits, y)
    b = x.shape[0]
    s = _State(
        i=jnp.int32(0), counter=jnp.int32(0), k=jnp.int32(k0),
        x_adv=x0, x_old=x0, grad=g, x_best=x0, grad_best=g, loss_best=obj, loss_prev=obj,
        loss_best_last=obj, reduced_last=jnp.ones(b, bool), n_improved=jnp.zeros(b, jnp.int32),
        step=jnp.full((b,), 2.0, x.dtype) * eps, x_found=x0, active=active & ~fooled,
        iters=jnp.zeros(b, jnp.int32),
    )  # fmt: skip

    def cond(s: _State):
        return (s.i < steps) & jnp.any(s.active)

    def body(s: _State):
        act = s.active
        a = jnp.where(s.i > 0, MOMENTUM, 1.0).astype(x.dtype)
        ss = C.bcast(s.step)
        z = C.project(s.x_adv + ss * C.normalized_step(s.grad, norm), x, eps, norm)
        z = C.project(s.x_adv + (z - s.x_adv) * a + (s.x_adv - s.x_old) * (1 - a), x, eps, norm)
        obj, logits, g = vg(z, s.i)
        fooled = C.misclassified(logits, y)
        improved = obj > s.loss_best
        x_best = C.where_b(improved, z, s.x_best)
        grad_best = C.where_b(improved, g, s.grad_best)
        loss_best = jnp.where(improved, obj, s.loss_best)
        n_improved = s.n_improved + (obj > s.loss_prev).astype(jnp.int32)
        counter = s.counter + 1
        at_check = counter == s.k
        # Step-size rule at a checkpoint: halve on oscillation, or when the previous check did
        # not halve and the best loss has not improved since; halving restarts from the best point.
        halve = (n_improved.astype(x.dtype) <= RHO * s.k.astype(x.dtype)) | (
            ~s.reduced_last & (s.loss_best_last >= loss_best)
        )
        halve = halve & at_check
        new = s._replace(
            x_adv=C.where_b(halve, x_best, z),
            x_old=s.x_adv,
            grad=C.where_b(halve, grad_best, g),
            x_best=x_best,
            grad_best=grad_best,
            loss_best=loss_best,
            loss_prev=obj,
            loss_best_last=jnp.where(at_check, loss_best, s.loss_best_last),
            reduced_last=jnp.where(at_check, halve, s.reduced_last),
            n_improved=jnp.where(at_check, 0, n_improved),
            step=jnp.where(halve, s.step / 2, s.step),
            x_found=C.where_b(fooled, z, s.x_found),
            active=~fooled,
            iters=s.iters + 1,
        )
        new = jax.tree.map(lambda n, o: C.where_b(act, n, o), new, s)
        return new._replace(
            i=s.i + 1,
            counter=jnp.where(at_check, 0, counter),
            k=jnp.where(at_check, jnp.maximum(s.k - decr, k_min), s.k),
        )

    s = jax.lax.while_loop(cond, body, s)
    fooled = ~s.active & active
    return C.where_b(fooled, s.x_found, s.x_best), s.iters


@functools.partial(
    compile_options.jit,
    static_argnames=("norm", "steps", "loss", "targeted", "n_targets", "restarts", "eot_iter"),
)
def _apgd(
    logits_fn, sample_fn, x, y, key, eps, active, *, norm, steps, loss, targeted, n_targets,
    restarts, eot_iter,
):  # fmt: skip
    order = jnp.argsort(logits_fn(x), axis=-1) if targeted else None
    runs = n_targets * restarts if targeted else restarts

    def run(r, carry):
        x_adv, success, iters = carry
        todo = active & ~success
        target = order[:, -(r // restarts) - 2] if targeted else None
        xa, it = _apgd_single(
            logits_fn,
            sample_fn,
            x,
            y,
            target,
            jax.random.fold_in(key, r),
            eps,
            todo,
            norm=norm,
            steps=steps,
            loss=loss,
            eot_iter=eot_iter,
        )
        ok = todo & C.misclassified(logits_fn(xa), y)
        return C.where_b(todo, xa, x_adv), success | ok, iters + it

    init = (x, jnp.zeros(x.shape[0], bool), jnp.zeros(x.shape[0], jnp.int32))
    return C.AttackResult(*jax.lax.fori_loop(0, runs, run, init))


def apgd(
    logits_fn: C.LogitsFn,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    loss: str = "ce",
    targeted: bool = False,
    n_target_classes: int = 9,
    restarts: int = 1,
    active: jax.Array | None = None,
    eot_iter: int = 1,
    sample_logits_fn: C.SampleLogitsFn | None = None,
) -> C.AttackResult:
    """APGD with the reference step-size schedule, momentum 0.75 and per-example early stopping.

    Untargeted (APGD-CE / APGD-DLR) maximises the CE or DLR loss. Targeted (APGD-T) runs once per
    target class, the 2nd, 3rd, ... most likely clean classes, maximising the targeted DLR loss
    (or -CE(target) with loss="ce"); each target runs only on examples not yet broken.

    Args:
        logits_fn: x [B, H, W, C] -> logits [B, K] (a pytree argument of the compiled attack, see
            `_common.as_pytree_fn`).
        x: [B, H, W, C] clean images in [0, 1].
        y: [B] int labels.
        key: PRNG key (random starts).
        eps: threat model radius.
        norm: "linf" or "l2".
        steps: iterations per run (100 in AutoAttack).
        loss: "ce" or "dlr" (targeted DLR when targeted=True).
        targeted: APGD-T.
        n_target_classes: number of target classes (<= K - 1).
        restarts: runs per target (untargeted: runs), each from a new random start.
        active: optional [B] bool mask of the examples to attack.
        eot_iter: expectation over transformation (AutoAttack's `eot_iter`; 20 in its "rand"
            version): every loss and gradient, the first included, is the mean over eot_iter
            draws of `sample_logits_fn`, keys folded in from the run's key and the iteration.
            > 1 needs a sampler.
        sample_logits_fn: optional randomised forward (x [B, H, W, C], key) -> logits [B, K];
            when given, losses and gradients come from its draws. Success (early stopping and
            the returned flag) is always judged with `logits_fn`, a forward the user can
            reproduce; the reference code judges on the last random draw instead.

    Returns:
        AttackResult; iterations are summed over runs.
    """
    x, y = C.check_inputs(x, y, "apgd", logits_fn)
    norm = C.check_norm(norm, "apgd")
    C.check_eps(eps, "apgd")
    if loss not in ("ce", "dlr"):
        raise ValueError(f"apgd: loss must be 'ce' or 'dlr', got {loss!r}")
    if steps < 1 or restarts < 1:
        raise ValueError(f"apgd: steps and restarts must be >= 1, got {steps}, {restarts}")
    if targeted:
        k = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape[-1]
        if not 1 <= n_target_classes <= k - 1:
            raise ValueError(
                f"apgd: n_target_classes must be in [1, K - 1 = {k - 1}], got {n_target_classes}"
            )
    sample_fn = C.check_eot(eot_iter, sample_logits_fn, "apgd")
    return _apgd(
        C.as_pytree_fn(logits_fn),
        sample_fn,
        x,
        y,
        key,
        jnp.asarray(eps, x.dtype),
        C.active_mask(active, x.shape[0]),
        norm=norm,
        steps=int(steps),
        loss=loss,
        targeted=bool(targeted),
        n_targets=int(n_target_classes),
        restarts=int(restarts),
        eot_iter=int(eot_iter),
    )
