"""Intermediate-state attacks on equilibrium models: unrolled intermediates, ensemble, adjoint."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from eqrobust import compile_options, solvers
from eqrobust.attacks import _common as C
from eqrobust.attacks import losses
from eqrobust.attacks.pgd import random_start_pgd
from eqrobust.classifier import Dynamics

PyTree = Any
Partial = jax.tree_util.Partial

_FNS = ("inject", "f", "readout", "trajectory", "init", "predict", "predict_trajectory")


def _canon(dyn: Dynamics) -> Dynamics:
    """Dynamics whose functions are all pytree Partials (jit arguments)."""
    if not isinstance(dyn, Dynamics):
        raise TypeError(f"expected a Dynamics, got {type(dyn).__name__}")
    if not (isinstance(dyn.num_states, int) and dyn.num_states >= 1):
        raise ValueError(f"Dynamics.num_states must be an int >= 1, got {dyn.num_states!r}")
    kw = {n: getattr(dyn, n) for n in _FNS}
    kw = {n: (v if v is None else C.as_pytree_fn(v)) for n, v in kw.items()}
    return dataclasses.replace(dyn, **kw)


# ----------------------------------------------------------------------------- constructors


@functools.lru_cache(maxsize=32)
def _engine_fns(num_states: int, tol: float):
    def solve(inject, f, init, x, record, grad):
        return solvers.solve(
            f,
            init(x),
            inject(x),
            method="broyden",
            max_steps=num_states,
            tol=tol,
            record=record,
            grad=grad,
            memory=num_states,
        )

    def trajectory(inject, f, init, x):
        return lax.stop_gradient(solve(inject, f, init, x, num_states, "none").trajectory.z)

    def predict(inject, f, init, readout, x):
        return readout(solve(inject, f, init, x, 0, "implicit").z)

    def predict_trajectory(inject, f, init, readout, x):  # both from one solve
        sol = solve(inject, f, init, x, num_states, "none")
        return lax.stop_gradient(readout(sol.z)), lax.stop_gradient(sol.trajectory.z)

    return trajectory, predict, predict_trajectory


def broyden_dynamics(
    inject: Callable[[jax.Array], PyTree],
    f: Callable[[PyTree, PyTree], PyTree],
    readout: Callable[[PyTree], jax.Array],
    init: Callable[[jax.Array], PyTree],
    *,
    num_states: int,
    tol: float = 1e-3,
    predict: Callable[[jax.Array], jax.Array] | None = None,
) -> Dynamics:
    """Dynamics of a cell solved by the engine's Broyden (z0 = init(x), B0 = -I, N steps).

    Args:
        inject, f, readout, init: as the `Dynamics` fields (preferably Partials).
        num_states: N solver steps recorded by `trajectory`.
        tol: relative-residual stop of the solver.
        predict: the real prediction; None: readout of the solver's (lowest-residual) state with
            the implicit gradient (and `predict_trajectory` from one solve).

    Returns:
        Dynamics.
    """
    inject, f, readout, init = map(C.as_pytree_fn, (inject, f, readout, init))
    traj_fn, pred_fn, joint_fn = _engine_fns(int(num_states), float(tol))
    joint = None
    if predict is None:
        predict = Partial(pred_fn, inject, f, init, readout)
        joint = Partial(joint_fn, inject, f, init, readout)
    return Dynamics(
        inject=inject,
        f=f,
        readout=readout,
        trajectory=Partial(traj_fn, inject, f, init),
        init=init,
        predict=C.as_pytree_fn(predict),
        num_states=int(num_states),
        tol=float(tol),
        predict_trajectory=joint,
    )


# ----------------------------------------------------------------------------- surrogate gradients


def _state(zs: PyTree, idx: jax.Array) -> PyTree:
    """z_{idx+1} of a trajectory (leaves [N, B, ...] -> [B, ...]), detached."""
    return jax.tree.map(lambda t: lax.stop_gradient(t[idx]), zs)


def _unrolled_readout(dyn: Dynamics, z_i: PyTree, xa: jax.Array, unroll: int, lam) -> jax.Array:
    """readout(z) with z = f(z_i, a(x)), then `unroll` damped steps: logits [B, K]."""
    a = dyn.inject(xa)
    z = dyn.f(z_i, a)

    def step(z, _):
        return jax.tree.map(lambda p, q: (1.0 - lam) * p + lam * q, z, dyn.f(z, a)), None

    z, _ = lax.scan(step, z, None, length=unroll)
    return dyn.readout(z)


def _unrolled_loss(dyn: Dynamics, z_i: PyTree, xa: jax.Array, y: jax.Array, unroll: int, lam):
    """Summed CE of `_unrolled_readout`."""
    return jnp.sum(losses.cross_entropy(_unrolled_readout(dyn, z_i, xa, unroll, lam), y))


def _unrolled_grad(dyn, zs, xa, y, idx, unroll, lam):
    return jax.grad(_unrolled_loss, argnums=2)(dyn, _state(zs, idx), xa, y, unroll, lam)


def _ensemble_grad(dyn, zs, xa, y, idxs, unroll, lam):
    def loss(xa):
        per = jax.vmap(lambda i: _unrolled_loss(dyn, _state(zs, i), xa, y, unroll, lam))(idxs)
        return jnp.sum(per)

    return jax.grad(loss)(xa)


@functools.partial(compile_options.jit, static_argnames=("unroll",))
def _unrolled_grad_jit(dyn, x, y, idxs, lam, *, unroll):
    zs = dyn.trajectory(x)
    return jax.vmap(lambda i: _unrolled_grad(dyn, zs, x, y, i, unroll, lam))(idxs)


@functools.partial(compile_options.jit, static_argnames=("unroll",))
def _ensemble_grad_jit(dyn, x, y, idxs, lam, *, unroll):
    return _ensemble_grad(dyn, dyn.trajectory(x), x, y, idxs, unroll, lam)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) or (hasattr(v, "ndim") and v.ndim == 0)


def _states(states: int | Sequence[int] | None, n: int, who: str) -> tuple[int, ...]:
    """1-based state indices, checked against N."""
    if states is None:
        return tuple(range(1, n + 1))
    s = (int(states),) if _is_int(states) else tuple(int(i) for i in states)
    if not s or any(not 1 <= i <= n for i in s):
        raise ValueError(f"{who}: state indices must be in 1..{n} (num_states), got {states!r}")
    return s


def _check_unroll(unroll: int, lam: float, who: str) -> None:
    if not (isinstance(unroll, int) and unroll >= 1):
        raise ValueError(f"{who}: unroll (K) must be an int >= 1, got {unroll!r}")
    if not 0.0 < float(lam) <= 1.0:
        raise ValueError(f"{who}: lam must be in (0, 1], got {lam!r}")


def _check(dyn, x, y, unroll, lam, who):
    dyn = _canon(dyn)
    x, y = C.check_inputs(x, y, who)
    _check_unroll(unroll, lam, who)
    return dyn, x, y


def unrolled_gradient(
    dyn: Dynamics,
    x: jax.Array,
    y: jax.Array,
    *,
    state: int | Sequence[int],
    unroll: int = 5,
    lam: float = 0.5,
) -> jax.Array:
    """Input gradient of the unrolled-intermediate surrogate (paper eq. 13).

    With z_i the i-th recorded solver iterate of x (a constant), z = f(z_i, a(x)), then `unroll`
    (K) steps z <- (1 - lam) z + lam f(z, a(x)); the loss is the summed CE of readout(z).

    Args:
        dyn: the model's Dynamics.
        x: [B, H, W, C] images in [0, 1].
        y: [B] int labels.
        state: i in 1..N, or a sequence of them.
        unroll: K >= 1.
        lam: damping in (0, 1].

    Returns:
        [B, H, W, C] for an int state, [S, B, H, W, C] for a sequence of S states.
    """
    dyn, x, y = _check(dyn, x, y, unroll, lam, "unrolled_gradient")
    s = _states(state, dyn.num_states, "unrolled_gradient")
    idxs = jnp.asarray(s, jnp.int32) - 1
    g = _unrolled_grad_jit(dyn, x, y, idxs, jnp.asarray(lam, x.dtype), unroll=unroll)
    return g[0] if _is_int(state) else g


def ensemble_gradient(
    dyn: Dynamics,
    x: jax.Array,
    y: jax.Array,
    *,
    states: Sequence[int] | None = None,
    unroll: int = 1,
    lam: float = 0.5,
) -> jax.Array:
    """Gradient ensemble: the sum over states i of `unrolled_gradient(..., state=i)`.

    Args:
        dyn, x, y, unroll, lam: as `unrolled_gradient` (K = 1 by default, as the papers).
        states: the i to sum over (1-based); None: all 1..N.

    Returns:
        [B, H, W, C].
    """
    dyn, x, y = _check(dyn, x, y, unroll, lam, "ensemble_gradient")
    idxs = jnp.asarray(_states(states, dyn.num_states, "ensemble_gradient"), jnp.int32) - 1
    return _ensemble_grad_jit(dyn, x, y, idxs, jnp.asarray(lam, x.dtype), unroll=unroll)


def _surrogate_logits(
    dyn: Dynamics, predict: Callable, idx: jax.Array, lam: jax.Array, x: jax.Array, *, unroll: int
) -> jax.Array:
    """predict(x) forward; backward: the VJP of the unrolled readout from the detached z_idx(x)."""

    @jax.custom_vjp
    def logits(xa):
        return predict(xa)

    def fwd(xa):
        z_i = _state(dyn.trajectory(xa), idx)
        _, vjp = jax.vjp(lambda v: _unrolled_readout(dyn, z_i, v, unroll, lam), xa)
        return predict(xa), vjp

    def bwd(vjp, ct):
        return vjp(ct)

    logits.defvjp(fwd, bwd)
    return logits(x)


def intermediate_surrogate(
    dyn: Dynamics,
    predict_fn: Callable[[jax.Array], jax.Array] | None = None,
    *,
    state: int = 3,
    unroll: int = 5,
    lam: float = 0.5,
) -> Callable[[jax.Array], jax.Array]:
    """A logits function for any attack: the model's prediction, with an intermediate gradient.

    Its forward value is the model's real (defended) prediction `predict_fn(x)` [B, K], so every
    value an attack reads (APGD's losses and step-size rule, success, Square's and FAB's
    queries) is judged on the model. Its backward pass (reverse mode only) is straight-through:
    for a loss L of the logits, the input gradient is J_s(x)^T dL/dlogits, the cotangent taken
    at the model's logits and pulled back through the Jacobian J_s of the unrolled-intermediate
    surrogate of `unrolled_gradient` (readout after f(z_i, a(x)) and K damped steps, z_i the i-th
    solver iterate at x held constant). Paper 5 runs AutoAttack on that surrogate at (i, K, lam)
    = (3, 5, 0.5), and judged success on the surrogate's output; here
    `autoattack(intermediate_surrogate(dyn), x, y, ...)` judges it on the prediction.

    Args:
        dyn: the model's Dynamics.
        predict_fn: the prediction the attack is judged on; None uses `dyn.predict`.
        state: i in 1..N.
        unroll: K >= 1.
        lam: damping in (0, 1].

    Returns:
        x [B, H, W, C] -> logits [B, K], a `jax.tree_util.Partial` (the model's arrays are
        arguments of the compiled attack programs, not constants).
    """
    dyn = _canon(dyn)
    _check_unroll(unroll, lam, "intermediate_surrogate")
    if not _is_int(state):
        raise ValueError(f"intermediate_surrogate: state must be one int i, got {state!r}")
    (i,) = _states(state, dyn.num_states, "intermediate_surrogate")
    predict = _predict(dyn, predict_fn, "intermediate_surrogate")
    return Partial(
        _surrogate_fn(unroll), dyn, predict, jnp.asarray(i - 1, jnp.int32), jnp.asarray(lam)
    )


@functools.lru_cache(maxsize=16)
def _surrogate_fn(unroll: int) -> Callable:
    """One function object per K: the Partial's static part, so models of one architecture
    share the compiled attack programs (a fresh functools.partial per call would recompile)."""
    return functools.partial(_surrogate_logits, unroll=unroll)


def _readout_sum(dyn: Dynamics, idxs: jax.Array, lam: jax.Array, x: jax.Array, *, unroll: int):
    """Sum over idxs of the unrolled readout from the detached z_{idx+1}(x): [B, K]."""
    zs = dyn.trajectory(x)
    per = jax.vmap(lambda i: _unrolled_readout(dyn, _state(zs, i), x, unroll, lam))(idxs)
    return jnp.sum(per, axis=0)


@functools.lru_cache(maxsize=16)
def _path_fn(unroll: int) -> Callable:
    return functools.partial(_readout_sum, unroll=unroll)


def surrogate_path(
    dyn: Dynamics, *, states: int | Sequence[int] | None = None, unroll: int = 1, lam: float = 0.5
) -> Callable[[jax.Array], jax.Array]:
    """The intermediate attacks' gradient path as a logits function (for check (d)).

    x -> sum over the states i of readout(z) with z = f(z_i, a(x)) and K damped steps, z_i the
    detached i-th solver iterate of x. Its VJP at a cotangent c is sum_i J_i(x)^T c: for one
    state the backward of `intermediate_surrogate` (and of a grid cell's PGD), for all states
    (K = 1) that of `gradient_ensemble_pgd`. Its value is not a prediction; pair it with one
    (`eqrobust.evaluation.probes.prediction_with_gradient`).

    Args:
        dyn: the model's Dynamics.
        states: i in 1..N, or a sequence of them (None: all).
        unroll: K >= 1; lam: damping in (0, 1].

    Returns:
        a `jax.tree_util.Partial`, x [B, H, W, C] -> [B, K].
    """
    dyn = _canon(dyn)
    _check_unroll(unroll, lam, "surrogate_path")
    idxs = jnp.asarray(_states(states, dyn.num_states, "surrogate_path"), jnp.int32) - 1
    return Partial(_path_fn(unroll), dyn, idxs, jnp.asarray(lam))


# ----------------------------------------------------------------------------- PGD core


def _pgd_loop(
    grad_fn, predict, x, y, key, eps, step_size, active, *, steps, random_start, joint=None
):
    """Linf PGD on the surrogate gradient `grad_fn(xa)`; success judged on `predict` only.

    `predict` is checked on the clean x, then on every iterate (random start and last included),
    in one traced call (one compiled copy of the model's solver). An example is frozen at the
    first point that fools it (x itself when the clean prediction is already wrong).
    With `joint` (xa -> (predict(xa), states), `Dynamics.predict_trajectory`), one forward solve
    per step gives both, and the step is `grad_fn(xa, states)`.
    Returns (x_adv, success, iterations).
    """
    x0 = random_start_pgd(key, x, eps, "linf") if random_start else x
    if joint is None:
        joint = lambda xa: (predict(xa), None)  # noqa: E731
        grad_at = lambda xa, _: grad_fn(xa)  # noqa: E731
    else:
        grad_at = grad_fn

    def cond(s):
        i, _, act, _, _ = s
        return (i <= steps + 1) & jnp.any(act)

    def body(s):
        i, xa, act, fooled, iters = s
        logits, states = joint(xa)
        wrong = act & C.misclassified(logits, y)
        act, fooled = act & ~wrong, fooled | wrong

        def grad_step(xa):
            return C.project(xa + step_size * jnp.sign(grad_at(xa, states)), x, eps, "linf")

        # i = 0 checked the clean x: move to the start; i = 1..steps: gradient steps.
        branch = jnp.where(i == 0, 0, jnp.where(i <= steps, 1, 2))
        xn = lax.switch(branch, [lambda xa: x0, grad_step, lambda xa: xa], xa)
        stepped = act & (i >= 1) & (i <= steps)
        return i + 1, C.where_b(act, xn, xa), act, fooled, iters + stepped.astype(jnp.int32)

    b = x.shape[0]
    init = (jnp.int32(0), x, active, jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32))
    _, xa, _, fooled, iters = lax.while_loop(cond, body, init)
    return xa, fooled, iters


@functools.partial(
    compile_options.jit,
    static_argnames=("unroll", "steps", "random_start", "recompute", "state_batch"),
)
def _unrolled_pgd(
    dyn,
    predict,
    joint,
    x,
    y,
    keys,
    idxs,
    eps,
    ss,
    lam,
    active,
    *,
    unroll,
    steps,
    random_start,
    recompute,
    state_batch,
):
    """PGD per state index (lax.map over idxs): x_adv [S, B, ...], success [S, B], iters.

    `joint` (or None): `Dynamics.predict_trajectory` when `predict` is the model's own, used
    with `recompute` (the states of the x' just judged serve the step from it)."""
    zs_clean = None if recompute else dyn.trajectory(x)
    joint = joint if recompute else None

    def one(args):
        idx, key = args

        def grad_fn(xa, zs=None):
            if zs is None:
                zs = dyn.trajectory(xa) if recompute else zs_clean
            return _unrolled_grad(dyn, zs, xa, y, idx, unroll, lam)

        xa, fooled, it = _pgd_loop(
            grad_fn, predict, x, y, key, eps, ss, active, steps=steps,
            random_start=random_start, joint=joint,
        )  # fmt: skip
        return C.where_b(active, xa, x), fooled, it

    return lax.map(one, (idxs, keys), batch_size=state_batch)


@functools.partial(compile_options.jit, static_argnames=("unroll", "steps", "random_start"))
def _ensemble_pgd(
    dyn, predict, joint, x, y, key, idxs, eps, ss, lam, active, *, unroll, steps, random_start
):
    def grad_fn(xa, zs=None):
        zs = dyn.trajectory(xa) if zs is None else zs
        return _ensemble_grad(dyn, zs, xa, y, idxs, unroll, lam)

    xa, fooled, it = _pgd_loop(
        grad_fn, predict, x, y, key, eps, ss, active, steps=steps,
        random_start=random_start, joint=joint,
    )  # fmt: skip
    return C.AttackResult(C.where_b(active, xa, x), fooled, it)


def _predict(dyn: Dynamics, predict_fn, who: str):
    p = dyn.predict if predict_fn is None else predict_fn
    if p is None:
        raise ValueError(
            f"{who}: no predict_fn given and the Dynamics has no predict; pass the model's real "
            "logits function (success is judged on it)"
        )
    return C.as_pytree_fn(p)


def _joint(dyn: Dynamics, predict_fn) -> Callable | None:
    """`dyn.predict_trajectory` when the attack judges `dyn.predict` itself, else None."""
    if predict_fn is not None and predict_fn is not dyn.predict:
        return None
    return dyn.predict_trajectory


def _pgd_setup(eps, steps, step_size, who, dtype):
    C.check_eps(eps, who)
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"{who}: steps must be an int >= 1, got {steps!r}")
    ss = eps / 4.0 if step_size is None else step_size
    return jnp.asarray(eps, dtype), jnp.asarray(ss, dtype)


# ----------------------------------------------------------------------------- public attacks


def unrolled_intermediate_pgd(
    dyn: Dynamics,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: float,
    state: int,
    unroll: int = 5,
    lam: float = 0.5,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    predict_fn: C.LogitsFn | None = None,
    recompute_states: bool = True,
    active: jax.Array | None = None,
) -> C.AttackResult:
    """PGD-Linf with the unrolled-intermediate surrogate gradient of state i (one grid cell).

    At every PGD step the surrogate is `unrolled_gradient` at the current x' (with
    `recompute_states`, z_i is the i-th solver iterate of x' itself, detached, as an attacker
    running the model's forward on x' sees it; otherwise z_i of the clean x throughout).
    Success is judged on `predict_fn` only: an example counts as broken, and is frozen, at the
    first iterate (random start included) that predict_fn misclassifies. Examples predict_fn
    already misclassifies at x count as broken with x_adv = x.

    Args:
        dyn: the model's Dynamics.
        x: [B, H, W, C] clean images in [0, 1]; y: [B] int labels.
        key: PRNG key (random start).
        eps: Linf radius.
        state: i in 1..N.
        unroll: K >= 1 damped steps after f(z_i); lam: their damping.
        steps: PGD steps; step_size: None = eps / 4 (the DEQ papers' 2/255 at 8/255).
        random_start: uniform start in the ball.
        predict_fn: x -> logits of the defended model; None: dyn.predict.
        recompute_states: recompute z_i from the current x' at every step.
        active: optional [B] bool mask of the examples to attack.

    Returns:
        AttackResult: x_adv [B, H, W, C], success [B] (predict_fn fooled), iterations [B].
    """
    dyn, x, y = _check(dyn, x, y, unroll, lam, "unrolled_intermediate_pgd")
    (s,) = _states(int(state), dyn.num_states, "unrolled_intermediate_pgd")
    eps_a, ss = _pgd_setup(eps, steps, step_size, "unrolled_intermediate_pgd", x.dtype)
    xa, ok, it = _unrolled_pgd(
        dyn,
        _predict(dyn, predict_fn, "unrolled_intermediate_pgd"),
        _joint(dyn, predict_fn),
        x,
        y,
        key[None],
        jnp.asarray([s - 1], jnp.int32),
        eps_a,
        ss,
        jnp.asarray(lam, x.dtype),
        C.active_mask(active, x.shape[0]),
        unroll=unroll,
        steps=steps,
        random_start=bool(random_start),
        recompute=bool(recompute_states),
        state_batch=None,
    )
    return C.AttackResult(xa[0], ok[0], it[0])


def gradient_ensemble_pgd(
    dyn: Dynamics,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: float,
    states: Sequence[int] | None = None,
    unroll: int = 1,
    lam: float = 0.5,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    predict_fn: C.LogitsFn | None = None,
    active: jax.Array | None = None,
) -> C.AttackResult:
    """PGD-Linf whose step is the sign of `ensemble_gradient` (sum over states) at x'.

    The states z_i are recomputed from the current x' at every step. Success as in
    `unrolled_intermediate_pgd` (judged on predict_fn).

    Args:
        dyn, x, y, key, eps, steps, step_size, random_start, predict_fn, active: as
            `unrolled_intermediate_pgd`.
        states: the i summed over (None: 1..N); unroll: K (1 as the papers); lam: damping.

    Returns:
        AttackResult.
    """
    dyn, x, y = _check(dyn, x, y, unroll, lam, "gradient_ensemble_pgd")
    idxs = jnp.asarray(_states(states, dyn.num_states, "gradient_ensemble_pgd"), jnp.int32) - 1
    eps_a, ss = _pgd_setup(eps, steps, step_size, "gradient_ensemble_pgd", x.dtype)
    return _ensemble_pgd(
        dyn,
        _predict(dyn, predict_fn, "gradient_ensemble_pgd"),
        _joint(dyn, predict_fn),
        x,
        y,
        key,
        idxs,
        eps_a,
        ss,
        jnp.asarray(lam, x.dtype),
        C.active_mask(active, x.shape[0]),
        unroll=unroll,
        steps=steps,
        random_start=bool(random_start),
    )


class GridResult(NamedTuple):
    """Result of `unrolled_intermediate_grid`.

    Attributes:
        x_adv: [B, H, W, C]: per example, the x_adv of the first grid cell (in (i, K, lam) order)
            that fooled predict_fn; x where none did.
        robust: [B] bool, robust in every cell (the minimum over the grid); examples outside
            `active` (not attacked) count as robust.
        cell_robust: [S, nK, nL, B] bool per grid cell (not fooled: predict_fn right on x and
            on every PGD iterate of that cell).
        accuracy: [S, nK, nL] robust accuracy per cell (mean of cell_robust over the batch).
        strongest: (i, K, lam) of the cell with the lowest accuracy (first in grid order on ties).
        states, unrolls, lams: the grid axes.
    """

    x_adv: jax.Array
    robust: jax.Array
    cell_robust: jax.Array
    accuracy: jax.Array
    strongest: tuple[int, int, float]
    states: tuple[int, ...]
    unrolls: tuple[int, ...]
    lams: tuple[float, ...]


def unrolled_intermediate_grid(
    dyn: Dynamics,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: float,
    states: Sequence[int] | None = None,
    unrolls: Sequence[int] = tuple(range(1, 10)),
    lams: Sequence[float] = (0.5, 1.0),
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    predict_fn: C.LogitsFn | None = None,
    recompute_states: bool = True,
    state_batch: int | None = None,
    active: jax.Array | None = None,
) -> GridResult:
    """The papers' full unrolled-intermediate grid: i in 1..N, K in 1..9, lam in {0.5, 1}.

    One compiled program per K (lam is an argument, the states run under `lax.map`), each cell an
    independent `unrolled_intermediate_pgd` with its own random start.

    Args:
        dyn, x, y, key, eps, steps, step_size, random_start, predict_fn, recompute_states,
            active: as `unrolled_intermediate_pgd`.
        states: i values (None: 1..N); unrolls: K values; lams: damping values.
        state_batch: states attacked at once (None: one after another, each stopping when its
            examples are broken; S: all vmapped).

    Returns:
        GridResult.
    """
    who = "unrolled_intermediate_grid"
    unrolls, lams = tuple(int(k) for k in unrolls), tuple(float(v) for v in lams)
    if not unrolls or not lams:
        raise ValueError(f"{who}: unrolls and lams must be non-empty")
    for k, v in ((k, v) for k in unrolls for v in lams):
        _check_unroll(k, v, who)
    dyn, x, y = _check(dyn, x, y, 1, 1.0, who)
    s = _states(states, dyn.num_states, who)
    eps_a, ss = _pgd_setup(eps, steps, step_size, who, x.dtype)
    predict, joint = _predict(dyn, predict_fn, who), _joint(dyn, predict_fn)
    act = C.active_mask(active, x.shape[0])
    idxs = jnp.asarray(s, jnp.int32) - 1
    x_adv, broken = x, jnp.zeros(x.shape[0], bool)
    cells = []
    for ki, k in enumerate(unrolls):
        row = []
        for li, v in enumerate(lams):
            keys = jax.random.split(jax.random.fold_in(key, ki * len(lams) + li), len(s))
            xa, ok, _ = _unrolled_pgd(
                dyn,
                predict,
                joint,
                x,
                y,
                keys,
                idxs,
                eps_a,
                ss,
                jnp.asarray(v, x.dtype),
                act,
                unroll=k,
                steps=steps,
                random_start=bool(random_start),
                recompute=bool(recompute_states),
                state_batch=state_batch,
            )
            for j in range(len(s)):
                new = ok[j] & ~broken
                x_adv = C.where_b(new, xa[j], x_adv)
                broken = broken | ok[j]
            row.append(~ok)  # [S, B]
        cells.append(jnp.stack(row, axis=1))  # [S, nL, B]
    cell_robust = jnp.stack(cells, axis=1)  # [S, nK, nL, B]
    acc = jnp.mean(cell_robust.astype(jnp.float32), axis=-1)
    si, ki, li = (int(t) for t in jnp.unravel_index(jnp.argmin(acc), acc.shape))
    return GridResult(
        x_adv=x_adv,
        robust=jnp.all(cell_robust, axis=(0, 1, 2)),
        cell_robust=cell_robust,
        accuracy=acc,
        strongest=(s[si], unrolls[ki], lams[li]),
        states=s,
        unrolls=unrolls,
        lams=lams,
    )


# ----------------------------------------------------------------------------- simultaneous adjoint


class AdjointResult(NamedTuple):
    """Result of `simultaneous_adjoint` (n = 1..N along the forward Broyden solve).

    Attributes:
        grads: [N, B, H, W, C], eq. 11: (df(z_n; x)/dx)^T u_n (gradient of CE(readout(z_n), y)
            estimated at step n).
        z: [N, B, D] the Broyden iterates z_n, flattened per example.
        u: [N, B, D] the adjoint states u_n.
        residual: [N, B] relative residual ||f(z_n) - z_n|| / (||f(z_n)|| + 1e-9).
    """

    grads: jax.Array
    z: jax.Array
    u: jax.Array
    residual: jax.Array


class _Flat(NamedTuple):
    """Per-example flattening of a state pytree: leaves [B, ...] <-> [B, D]."""

    treedef: Any
    shapes: tuple

    @classmethod
    def of(cls, z):
        leaves, treedef = jax.tree.flatten(z)
        return cls(treedef, tuple(tuple(a.shape[1:]) for a in leaves))

    def flatten(self, z):
        leaves = jax.tree.leaves(z)
        return jnp.concatenate([a.reshape(a.shape[0], -1) for a in leaves], axis=1)

    def unflatten(self, w):
        parts, start = [], 0
        for s in self.shapes:
            n = math.prod(s)
            parts.append(w[:, start : start + n].reshape(w.shape[0], *s))
            start += n
        return jax.tree.unflatten(self.treedef, parts)


def _lowrank(us, vs, w, transpose=False):
    """B w with B = -I + sum_j u_j v_j^T (B^T w if transpose); us, vs [B, m, D], w [B, D]."""
    mv = functools.partial(jnp.einsum, precision=lax.Precision.HIGHEST)
    a, b = (vs, us) if transpose else (us, vs)
    return -w + mv("bmd,bm->bd", a, mv("bmd,bd->bm", b, w))


def _adjoint_run(dyn, x, y, *, n_steps, beta, tol, transpose):
    """Broyden (as the engine's: g = f(z) - z, B0 = -I, no restart) with the adjoint alongside."""
    a, inj_vjp = jax.vjp(dyn.inject, x)
    z0 = dyn.init(x)
    fl = _Flat.of(z0)
    w0 = lax.stop_gradient(fl.flatten(z0))
    b, d = w0.shape

    def fvjp(w, u):
        """f(w), J_z^T u, J_a^T u at (w, a)."""
        fz, vjp = jax.vjp(lambda w_, a_: fl.flatten(dyn.f(fl.unflatten(w_), a_)), w, a)
        jz, ja = vjp(u)
        return fz, jz, ja

    def dloss(w):
        return jax.grad(lambda w_: jnp.sum(losses.cross_entropy(dyn.readout(fl.unflatten(w_)), y)))(
            w
        )

    def resid(fw, w):
        num = jnp.sqrt(jnp.sum(jnp.square(fw - w), axis=1))
        return num / (jnp.sqrt(jnp.sum(jnp.square(fw), axis=1)) + 1e-9)

    u0 = jnp.zeros_like(w0)
    fw0, jtu0, _ = fvjp(w0, u0)
    buf = jnp.zeros((b, n_steps, d), w0.dtype)

    def step(c, n):
        w, fw, jtu, u, us, vs = c
        g = fw - w
        active = resid(fw, w) >= tol  # the engine freezes converged examples
        # Adjoint (eqs. 9-10): v = J^T u + dL/dz - u at z_n; u <- u - beta B_n v.
        v = jtu + dloss(w) - u
        u_new = u - beta * _lowrank(us, vs, v, transpose)
        # Broyden step (eqs. 7-8), alpha = 1.
        dz = jnp.where(active[:, None], -_lowrank(us, vs, g), 0.0)
        w_new = w + dz
        fw_new, jtu_new, ja = fvjp(w_new, u_new)
        dg = fw_new - w_new - g
        vt = _lowrank(us, vs, dz, transpose=True)  # dz^T B_n
        den = jnp.sum(vt * dg, axis=1, keepdims=True)
        ok = active[:, None] & (jnp.abs(den) > jnp.finfo(den.dtype).tiny) & jnp.isfinite(den)
        uu = jnp.where(ok, (dz - _lowrank(us, vs, dg)) / jnp.where(ok, den, 1.0), 0.0)
        vt = jnp.where(ok, vt, 0.0)
        us = lax.dynamic_update_index_in_dim(us, uu, n, 1)
        vs = lax.dynamic_update_index_in_dim(vs, vt, n, 1)
        out = (w_new, u_new, ja, resid(fw_new, w_new))
        return (w_new, fw_new, jtu_new, u_new, us, vs), out

    _, (ws, uvec, jas, res) = lax.scan(step, (w0, fw0, jtu0, u0, buf, buf), jnp.arange(n_steps))
    grads = jax.vmap(lambda ga: inj_vjp(ga)[0])(jas)
    return AdjointResult(grads, ws, uvec, res)


@functools.partial(compile_options.jit, static_argnames=("n_steps", "transpose"))
def _adjoint_jit(dyn, x, y, beta, tol, *, n_steps, transpose):
    return _adjoint_run(dyn, x, y, n_steps=n_steps, beta=beta, tol=tol, transpose=transpose)


def simultaneous_adjoint(
    dyn: Dynamics,
    x: jax.Array,
    y: jax.Array,
    *,
    steps: int | None = None,
    beta: float = 1.0,
    tol: float | None = None,
    transpose: bool = True,
) -> AdjointResult:
    """Simultaneous adjoint (paper eqs. 9-11) along a Broyden solve of z = f(z, a(x)).

    The forward is Broyden on g(z) = f(z) - z from z_0 = init(x) with B_0 = -I, unit step, rank-1
    inverse-Jacobian updates kept for all steps (no restart) and per-example freezing once the
    relative residual is below tol: the iterates are the engine's (`solvers.solve(method=
    "broyden", memory=N)`). Alongside, from u_0 = 0, with L = CE(readout(z_n), y):
    v_n = J_f(z_n)^T u_n + dL/dz(z_n) - u_n, u_{n+1} = u_n - beta B_n' v_n, where B_n' is
    B_n^T (transpose=True: the Newton-like step of the adjoint system, whose Jacobian is
    J_g^T) or B_n as eq. 10 is printed (transpose=False). Frozen examples keep iterating u.
    At the fixed point with u converged, grads equal the implicit (IFT) input gradient.

    Args:
        dyn: the model's Dynamics.
        x: [B, H, W, C] images in [0, 1]; y: [B] int labels.
        steps: N (None: dyn.num_states).
        beta: adjoint step size (> 0).
        tol: relative-residual stop of the forward (None: dyn.tol).
        transpose: apply B_n^T (default) or B_n to the adjoint residual.

    Returns:
        AdjointResult with grads [N, B, H, W, C].
    """
    dyn, x, y = _check(dyn, x, y, 1, 1.0, "simultaneous_adjoint")
    n = dyn.num_states if steps is None else int(steps)
    if n < 1 or not beta > 0:
        raise ValueError(f"simultaneous_adjoint: needs steps >= 1 and beta > 0, got {n}, {beta}")
    tol = dyn.tol if tol is None else float(tol)
    dt = jnp.asarray(x).dtype
    return _adjoint_jit(
        dyn, x, y, jnp.asarray(beta, dt), jnp.asarray(tol, dt), n_steps=n, transpose=transpose
    )


@functools.partial(
    compile_options.jit, static_argnames=("n_steps", "transpose", "steps", "random_start")
)
def _adjoint_pgd(
    dyn,
    predict,
    x,
    y,
    key,
    weights,
    beta,
    tol,
    eps,
    ss,
    active,
    *,
    n_steps,
    transpose,
    steps,
    random_start,
):

    def grad_fn(xa):
        r = _adjoint_run(dyn, xa, y, n_steps=n_steps, beta=beta, tol=tol, transpose=transpose)
        return jnp.tensordot(weights, r.grads, axes=1)

    xa, fooled, it = _pgd_loop(
        grad_fn, predict, x, y, key, eps, ss, active, steps=steps, random_start=random_start
    )
    return C.AttackResult(C.where_b(active, xa, x), fooled, it)


def adjoint_pgd(
    dyn: Dynamics,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    eps: float,
    state: int | None = None,
    solver_steps: int | None = None,
    beta: float = 1.0,
    tol: float | None = None,
    transpose: bool = True,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    predict_fn: C.LogitsFn | None = None,
    active: jax.Array | None = None,
) -> C.AttackResult:
    """PGD-Linf on the simultaneous-adjoint gradient of step n (eq. 11) or their sum (eq. 17).

    The adjoint runs alongside the Broyden forward of the current x' at every PGD step.

    Args:
        dyn, x, y, key, eps, steps, step_size, random_start, predict_fn, active: as
            `unrolled_intermediate_pgd` (success judged on predict_fn).
        state: n in 1..N: attack with [dL/dx]_n; None: the ensemble sum over n (eq. 17).
        solver_steps: N (None: dyn.num_states); beta, tol, transpose: as `simultaneous_adjoint`.

    Returns:
        AttackResult.
    """
    dyn, x, y = _check(dyn, x, y, 1, 1.0, "adjoint_pgd")
    n = dyn.num_states if solver_steps is None else int(solver_steps)
    if n < 1 or not beta > 0:
        raise ValueError(f"adjoint_pgd: needs solver_steps >= 1 and beta > 0, got {n}, {beta}")
    w = jnp.ones((n,), x.dtype)
    if state is not None:
        (s,) = _states(int(state), n, "adjoint_pgd")
        w = jnp.zeros((n,), x.dtype).at[s - 1].set(1.0)
    eps_a, ss = _pgd_setup(eps, steps, step_size, "adjoint_pgd", x.dtype)
    tol = dyn.tol if tol is None else float(tol)
    return _adjoint_pgd(
        dyn,
        _predict(dyn, predict_fn, "adjoint_pgd"),
        x,
        y,
        key,
        w,
        jnp.asarray(beta, x.dtype),
        jnp.asarray(tol, x.dtype),
        eps_a,
        ss,
        C.active_mask(active, x.shape[0]),
        n_steps=n,
        transpose=bool(transpose),
        steps=steps,
        random_start=bool(random_start),
    )
