"""Fixed-point engine: Picard/Anderson/Broyden, per-example convergence, three gradient modes."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax

PyTree = Any

# Added to ||f(z)|| in the relative residual so that a zero fixed point can still converge.
_EPS = 1e-9

_METHODS = ("picard", "anderson", "broyden")
_GRADS = ("implicit", "unrolled", "phantom", "none")
_STOPS = ("converged", "never")
_LOWEST = ("example", "batch", "last")
_METHOD_OPTIONS = {
    "picard": {},
    "anderson": {"memory": 5, "lam": 1e-4, "beta": 1.0},
    "broyden": {"memory": None},
}
_GRAD_OPTIONS = {
    "implicit": {
        "backward_method": None,
        "backward_tol": None,
        "backward_max_steps": None,
        "backward_options": None,
        "backward_throw": False,
    },
    "phantom": {"grad_steps": 5, "grad_damping": 0.5},
    "unrolled": {"remat": False},
    "none": {},
}


class Trajectory(NamedTuple):
    """The first N iterates of a solve.

    Attributes:
        z: pytree like the state, each leaf ``[N, B, ...]``; ``z[i]`` is the iterate after ``i + 1``
            solver steps (examples that already stopped repeat their final iterate).
        residual: ``[N, B]`` relative residual of each recorded iterate.
    """

    z: PyTree
    residual: jax.Array


class Status(enum.IntEnum):
    """Per-example outcome of a solve (``Solution.status``, int8), like optimistix's RESULTS."""

    SUCCESS = 0  # relative residual below tol
    MAX_STEPS = 1  # not converged within max_steps
    NONFINITE = 2  # an iterate or its residual became NaN/inf; frozen at the last finite iterate


class SolverState(NamedTuple):
    """Where a solve stopped, to continue it (``solve(..., init_state=sol.state)``).

    Opaque except for ``step``; it is tied to the method, its ``memory``, ``z0``'s structure and
    the batch size.

    Attributes:
        step: scalar int32, loop iterations done so far (over all continued calls).
        z: the current (last accepted) iterate per example, in the method's working form (the
            state pytree for Picard, per-example vectors ``[B, D]`` for Anderson/Broyden).
        fz: ``F(z)``, so that a continuation costs no extra f-evaluation.
        buffers: the method's buffers: ``()`` for Picard; Anderson ``(xs, fs)`` ``[B, m, D]``
            history of iterates and their images; Broyden ``(U, V, B g)``: the rank-1 update
            buffers ``[B, m, D]`` of the inverse Jacobian estimate and ``B g`` at ``z``.
    """

    step: jax.Array
    z: PyTree
    fz: PyTree
    buffers: Any


class Solution(NamedTuple):
    """Result of :func:`solve`.

    Attributes:
        z: pytree like ``z0`` (leaves ``[B, ...]``): the returned fixed-point estimate (the last
            iterate for Picard, the lowest-residual iterate for Anderson/Broyden by default).
        steps: ``[B]`` int32, solver steps applied to each example (f-evaluations are steps + 1).
        residual: ``[B]`` relative residual ``||f(z)-z|| / (||f(z)|| + eps)`` of the returned ``z``.
        converged: ``[B]`` bool, ``residual < tol`` and every iterate finite
            (``status == Status.SUCCESS``).
        trajectory: :class:`Trajectory` when ``record > 0``, else ``None``.
        status: ``[B]`` int8 :class:`Status` code per example.
        state: :class:`SolverState` to continue the solve, when ``return_state=True``.
    """

    z: PyTree
    steps: jax.Array
    residual: jax.Array
    converged: jax.Array
    trajectory: Trajectory | None
    status: jax.Array | None = None
    state: SolverState | None = None


class ConvergenceError(RuntimeError):
    """Raised by :func:`check_converged` when examples did not reach the tolerance."""


# ----------------------------------------------------------------------------- pytree helpers


def _batch_size(z: PyTree) -> int:
    leaves = jax.tree.leaves(z)
    if not leaves:
        raise ValueError("solve: z0 must be a pytree with at least one array leaf.")
    sizes = set()
    for leaf in leaves:
        if jnp.ndim(leaf) < 1:
            raise ValueError(
                "solve: every leaf of z0 needs a leading batch axis [B, ...]; got a scalar leaf. "
                "Add a batch axis (z[None]) for a single example."
            )
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(
                f"solve: z0 leaves must be floating point, got dtype {jnp.result_type(leaf)}."
            )
        sizes.add(jnp.shape(leaf)[0])
    if len(sizes) != 1:
        raise ValueError(
            f"solve: all leaves of z0 must share the batch size B; got {sorted(sizes)}."
        )
    return sizes.pop()


def _bmask(mask: jax.Array, x: jax.Array) -> jax.Array:
    """Reshape a [B] mask to broadcast against x [B, ...]."""
    return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


def _select(mask: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """Per example: ``new`` where mask else ``old`` (old kept bitwise)."""
    return jax.tree.map(lambda a, b: jnp.where(_bmask(mask, a), a, b), new, old)


def _sqnorm(z: PyTree) -> jax.Array:
    """Per-example squared norm [B] of a pytree with leaves [B, ...]."""
    leaves = jax.tree.leaves(z)
    return sum(jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1) for x in leaves)


def _rel_residual(fz: PyTree, z: PyTree) -> jax.Array:
    """Per-example ``||f(z) - z|| / (||f(z)|| + eps)`` [B]."""
    diff = jax.tree.map(jnp.subtract, fz, z)
    return jnp.sqrt(_sqnorm(diff)) / (jnp.sqrt(_sqnorm(fz)) + _EPS)


def _batch_rel_residual(fz: PyTree, z: PyTree) -> jax.Array:
    """Batch-global ``||F(Z) - Z|| / (||F(Z)|| + eps)`` (the DEQ reference's norm), scalar."""
    diff = jax.tree.map(jnp.subtract, fz, z)
    return jnp.sqrt(jnp.sum(_sqnorm(diff))) / (jnp.sqrt(jnp.sum(_sqnorm(fz))) + _EPS)


class _Flat(NamedTuple):
    """How to map a state pytree to per-example vectors [B, D] and back."""

    treedef: Any
    shapes: tuple  # per-leaf shape without the batch axis
    dtypes: tuple
    dtype: Any

    @classmethod
    def of(cls, z: PyTree) -> _Flat:
        leaves, treedef = jax.tree.flatten(z)
        return cls(
            treedef,
            tuple(tuple(x.shape[1:]) for x in leaves),
            tuple(x.dtype for x in leaves),
            jnp.result_type(*leaves),
        )

    def flatten(self, z: PyTree) -> jax.Array:
        leaves = jax.tree.leaves(z)
        b = leaves[0].shape[0]
        return jnp.concatenate([x.reshape(b, -1).astype(self.dtype) for x in leaves], axis=1)

    def unflatten(self, w: jax.Array) -> PyTree:
        """w: [..., D] -> pytree with leaves [..., *shape]."""
        lead = w.shape[:-1]
        sizes = [math.prod(s) for s in self.shapes]
        cuts = [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]
        parts = jnp.split(w, cuts, axis=-1)
        leaves = [
            p.reshape(lead + s).astype(d)
            for p, s, d in zip(parts, self.shapes, self.dtypes, strict=True)
        ]
        return jax.tree.unflatten(self.treedef, leaves)


# ----------------------------------------------------------------------------- method steps
# Each method works on a "working state" w (the pytree itself for Picard, per-example vectors
# [B, D] for Anderson/Broyden) and carries (w, F(w)) plus its own buffers, all with leading axis B
# so that frozen examples can be masked uniformly.


def _picard_init(w0, fw0, opts):
    del w0, fw0, opts
    return ()


def _picard_step(F, w, fw, mstate, i, active, opts):
    del i, active
    d = opts["damping"]
    if d == 0.0:
        w_new = fw  # exactly f(z): the EP free phase, bitwise equal to a plain loop
    else:
        w_new = jax.tree.map(lambda a, b: (1.0 - d) * a + d * b, fw, w)
    return w_new, F(w_new), mstate


def _write_slot(buf: jax.Array, slot: jax.Array, val: jax.Array, active: jax.Array) -> jax.Array:
    """buf[:, slot] = val for active examples; frozen examples keep their buffers bitwise.

    Masking only the written slot keeps the per-step cost O(B D), not O(B m D).
    """
    old = lax.dynamic_index_in_dim(buf, slot, 1, keepdims=False)
    return lax.dynamic_update_index_in_dim(buf, jnp.where(active[:, None], val, old), slot, 1)


def _anderson_init(w0, fw0, opts):
    m = opts["memory"]
    b, dim = w0.shape
    xs = jnp.zeros((b, m, dim), w0.dtype).at[:, 0].set(w0)
    fs = jnp.zeros((b, m, dim), w0.dtype).at[:, 0].set(fw0)
    return (xs, fs)


def _anderson_step(F, w, fw, mstate, i, active, opts):
    """Anderson acceleration (type II) over the last min(i+1, m) iterates, per example."""
    del w, fw
    xs, fs = mstate
    m, lam, beta = opts["memory"], opts["lam"], opts["beta"]
    dtype = xs.dtype
    valid = jnp.arange(m) < jnp.minimum(i + 1, m)  # [m] slots holding past iterates
    vf = valid.astype(dtype)
    g = fs - xs  # [B, m, D]
    # Broadcast-and-reduce instead of batched dots: same work for small m, faster to compile.
    gg = jnp.sum(g[:, :, None] * g[:, None], axis=3) * (vf[:, None] * vf[None, :])
    # Regularise relative to the residual scale, so lam means the same near and far from z*.
    scale = jnp.trace(gg, axis1=1, axis2=2) / jnp.sum(vf)  # [B]
    reg = lam * scale + jnp.sqrt(jnp.finfo(dtype).tiny)
    eye = jnp.eye(m, dtype=dtype)
    # min ||sum_j a_j g_j||^2 + reg ||a||^2 s.t. sum_j a_j = 1: a = y / sum(y), (GG + reg I) y = 1.
    # The matrix is SPD (unused slots: identity rows, right-hand side 0), so Cholesky suffices.
    gram = gg + reg[:, None, None] * eye * vf + eye * (1.0 - vf)
    chol = jnp.linalg.cholesky(gram)
    y = jax.scipy.linalg.cho_solve((chol, True), jnp.broadcast_to(vf, gram.shape[:2])[..., None])
    alpha = y[..., 0] / jnp.sum(y[..., 0], axis=1, keepdims=True)  # [B, m], sums to 1
    w_new = beta * jnp.sum(alpha[..., None] * fs, axis=1)
    if beta != 1.0:
        w_new = w_new + (1.0 - beta) * jnp.sum(alpha[..., None] * xs, axis=1)
    fw_new = F(w_new)
    slot = (i + 1) % m
    xs = _write_slot(xs, slot, w_new, active)
    fs = _write_slot(fs, slot, fw_new, active)
    return w_new, fw_new, (xs, fs)


def _broyden_init(w0, fw0, opts):
    m = opts["memory"]
    b, dim = w0.shape
    # Inverse Jacobian estimate of g(z) = f(z) - z:  B = -I + sum_j u_j v_j^T  (zero slots add 0).
    # Also carried: B g at the current iterate (-g for B = -I), updated by rank-1 corrections.
    zeros = jnp.zeros((b, m, dim), w0.dtype)
    return (zeros, zeros, w0 - fw0)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """num / den with 0 where den is ~0 or not finite (double where: no NaN in gradients)."""
    ok = jnp.isfinite(den) & (jnp.abs(den) > jnp.finfo(den.dtype).tiny)
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def _broyden_step(F, w, fw, mstate, i, active, opts):
    """Good Broyden on g(z) = f(z) - z with rank-1 inverse-Jacobian updates (DEQ reference).

    Step: dz = -B g; then B += u v^T with v^T = dz^T B, u = (dz - B dg) / (v^T dg). Carrying B g
    and using B dg = B g_new - B g, each step reads the [B, m, D] buffers twice (not three times).
    """
    us, vs, bg_in = mstate  # [B, m, D], [B, m, D], [B, D]
    m = opts["memory"]
    slot = i % m
    g = fw - w
    # Restarted Broyden: once the m slots are used, start again from B = -I (dropping only the
    # oldest update instead stagnated in our tests). Slots written before the restart are masked
    # out, which is cheaper than clearing the buffers.
    keep = (jnp.arange(m) < slot).astype(us.dtype)[None, :, None]
    bg = jnp.where(slot == 0, -g, bg_in)
    dx = -bg  # the first step (B = -I) is the Picard step z + g = f(z)
    w_new = w + dx
    fw_new = F(w_new)
    g_new = fw_new - w_new
    # Batched mat-vecs (HIGHEST: no reduced-precision dots on accelerators).
    mv = lambda spec, a, b: jnp.einsum(spec, a, b, precision=lax.Precision.HIGHEST)
    keep = keep[..., 0]
    c_dx = keep * mv("bmd,bd->bm", us, dx)  # U^T dz  [B, m]
    c_g = keep * mv("bmd,bd->bm", vs, g_new)  # V^T g_new
    vt = -dx + mv("bmd,bm->bd", vs, c_dx)  # dz^T B
    bg_new = -g_new + mv("bmd,bm->bd", us, c_g)  # B g_new, before this step's update
    den = jnp.sum(vt * (g_new - g), axis=1, keepdims=True)
    u = _safe_div(dx - (bg_new - bg), den)
    # V is updated in place below, which must wait for V's last read (c_g). No data dependency
    # ordered them, so XLA copied the whole [B, m, D] V buffer twice per step (most of Broyden's
    # extra cost over Anderson, see BUILD_NOTES); adding 0 * c_g makes the order explicit.
    vt = vt + 0.0 * c_g[:, :1]
    vt = jnp.where(jnp.isfinite(vt), vt, 0.0)
    bg_new = bg_new + u * jnp.sum(vt * g_new, axis=1, keepdims=True)  # B_new g_new
    us = _write_slot(us, slot, u, active)
    vs = _write_slot(vs, slot, vt, active)
    bg_new = jnp.where(active[:, None], bg_new, bg_in)
    return w_new, fw_new, (us, vs, bg_new)


_STEPS = {
    "picard": (_picard_init, _picard_step),
    "anderson": (_anderson_init, _anderson_step),
    "broyden": (_broyden_init, _broyden_step),
}


# ----------------------------------------------------------------------------- the loop


class _Carry(NamedTuple):
    i: jax.Array  # scalar int32, iterations done
    w: PyTree  # current iterate
    fw: PyTree  # F(current iterate)
    res: jax.Array  # [B] residual of the current iterate
    steps: jax.Array  # [B]
    done: jax.Array  # [B] converged or failed: not updated any more (stop="converged")
    bad: jax.Array  # [B] an iterate became non-finite; frozen at the last finite one
    best_w: PyTree  # lowest-residual iterate (None for lowest="last")
    best_res: jax.Array | None
    best_batch: jax.Array | None  # scalar, lowest batch-global residual (lowest="batch")
    traj_w: PyTree
    traj_res: jax.Array | None
    mstate: Any


def _write(buf: jax.Array, idx: jax.Array, val: jax.Array) -> jax.Array:
    """buf[idx] = val if idx < len(buf) else unchanged."""
    n = buf.shape[0]
    j = jnp.minimum(idx, n - 1)
    val = jnp.where(idx < n, val, lax.dynamic_index_in_dim(buf, j, 0, keepdims=False))
    return lax.dynamic_update_index_in_dim(buf, val, j, 0)


def _run(F, w0, *, method, max_steps, tol, record, stop, lowest, opts, unrolled, init=None):
    """Iterate ``F`` from ``w0`` (or from the :class:`SolverState` ``init``).

    Returns (w, steps, residual, bad, traj_w, traj_res, state).
    """
    init_m, step_m = _STEPS[method]
    if unrolled and opts.get("remat"):
        # BPTT saves only F's input per step and recomputes F's intermediates (conv patches,
        # pool masks, ...) in the backward pass; prevent_cse is unnecessary inside scan.
        F = jax.checkpoint(F, prevent_cse=False)
    if init is None:
        i0 = jnp.zeros((), jnp.int32)
        fw0 = F(w0)
        mstate0 = init_m(w0, fw0, opts)
    else:
        i0, w0, fw0, mstate0 = init
    res0 = _rel_residual(fw0, w0)
    b = res0.shape[0]
    track = lowest != "last"
    bad0 = ~jnp.isfinite(res0)
    carry = _Carry(
        i=i0,
        w=w0,
        fw=fw0,
        res=res0,
        steps=jnp.zeros((b,), jnp.int32),
        done=(res0 < tol) | bad0,
        bad=bad0,
        best_w=w0 if track else None,
        best_res=jnp.where(bad0, jnp.inf, res0) if track else None,
        best_batch=_batch_rel_residual(fw0, w0) if lowest == "batch" else None,
        traj_w=jax.tree.map(lambda x: jnp.zeros((record,) + x.shape, x.dtype), w0)
        if record
        else None,
        traj_res=jnp.zeros((record, b), res0.dtype) if record else None,
        mstate=mstate0,
    )

    def step(c: _Carry) -> _Carry:
        active = ~c.done if stop == "converged" else ~c.bad
        w_new, fw_new, mstate = step_m(F, c.w, c.fw, c.mstate, c.i, active, opts)
        res_new = _rel_residual(fw_new, w_new)
        # A NaN/inf anywhere in w or f(w) makes the residual non-finite (also when a norm
        # overflows): such an example keeps its last finite iterate and stops for good.
        # (Its method buffers may hold the failed step; they are never used again.)
        fail = active & ~jnp.isfinite(res_new)
        accept = active & ~fail
        w, fw, res = _select(accept, (w_new, fw_new, res_new), (c.w, c.fw, c.res))
        bad = c.bad | fail
        best_w, best_res, best_batch = c.best_w, c.best_res, c.best_batch
        if lowest == "example":
            better = res < best_res
            best_w, best_res = _select(better, (w, res), (best_w, best_res))
        elif lowest == "batch":
            r = _batch_rel_residual(fw, w)
            better = jnp.broadcast_to(r < best_batch, res.shape)
            best_w, best_res = _select(better, (w, res), (best_w, best_res))
            best_batch = jnp.minimum(r, best_batch)
        traj_w, traj_res = c.traj_w, c.traj_res
        if record:
            traj_w = jax.tree.map(lambda buf, x: _write(buf, c.i - i0, x), traj_w, w)
            traj_res = _write(traj_res, c.i - i0, res)
        return _Carry(
            i=c.i + 1,
            w=w,
            fw=fw,
            res=res,
            steps=c.steps + accept.astype(jnp.int32),
            done=(res < tol) | bad,
            bad=bad,
            best_w=best_w,
            best_res=best_res,
            best_batch=best_batch,
            traj_w=traj_w,
            traj_res=traj_res,
            mstate=mstate,
        )

    def keep_going(c: _Carry) -> jax.Array:
        more = c.i < i0 + max_steps
        if stop == "converged":
            more = more & ~jnp.all(c.done)
        return more

    if unrolled:
        # lax.while_loop is not reverse-differentiable: scan over max_steps, skipping the work
        # once every example has stopped (cond is differentiable; masked examples pass through).
        def body(c, _):
            if stop == "never":  # every one of the max_steps steps runs: no cond to linearise
                return step(c), None
            return lax.cond(keep_going(c), step, lambda c: c, c), None

        carry, _ = lax.scan(body, carry, None, length=max_steps)
    else:
        carry = lax.while_loop(keep_going, step, carry)

    w, res = (carry.best_w, carry.best_res) if track else (carry.w, carry.res)
    traj_w, traj_res = carry.traj_w, carry.traj_res
    if record:
        # Slots after the loop ended hold the (frozen) final iterate.
        filled = jnp.arange(record) < carry.i - i0
        traj_w = jax.tree.map(
            lambda buf, x: jnp.where(_bmask(filled, buf), buf, x[None]), traj_w, carry.w
        )
        traj_res = jnp.where(filled[:, None], traj_res, carry.res[None])
    state = SolverState(carry.i, carry.w, carry.fw, carry.mstate)
    return w, carry.steps, res, carry.bad, traj_w, traj_res, state


def _solve_nodiff(
    f,
    z0,
    args,
    *,
    method,
    max_steps,
    tol,
    damping,
    record,
    stop,
    lowest,
    opts,
    unrolled,
    init=None,
):
    """Run the engine on pytree z0 (vectorising per example for Anderson/Broyden).

    Returns (z, steps, residual, bad, trajectory z, trajectory residual, SolverState).
    """
    opts = dict(opts, damping=damping)
    kw = dict(
        method=method,
        max_steps=max_steps,
        tol=tol,
        record=record,
        stop=stop,
        lowest=lowest,
        opts=opts,
        unrolled=unrolled,
    )
    if method == "picard":
        F = lambda w: f(w, args)
        _check_init(init, z0, z0, (), method)
        return _run(F, z0, init=init, **kw)
    flat = _Flat.of(z0)
    F = lambda w: flat.flatten(f(flat.unflatten(w), args))
    w0 = flat.flatten(z0)
    if init is not None:
        _check_init(
            init, w0, w0, jax.eval_shape(lambda w: _STEPS[method][0](w, w, opts), w0), method
        )
    w, steps, res, bad, traj_w, traj_res, state = _run(F, w0, init=init, **kw)
    traj = flat.unflatten(traj_w) if record else None
    return flat.unflatten(w), steps, res, bad, traj, traj_res, state


def iterate(
    f: Callable,
    z0: PyTree,
    args: Any,
    *,
    method: str = "broyden",
    max_steps: int,
    tol: float,
    memory: int | None = None,
    init: SolverState | None = None,
    record: int = 0,
) -> tuple[PyTree, PyTree | None, SolverState]:
    """Differentiable solver loop: backpropagation through every step (``F`` rematerialised),
    continuing from ``init`` (a carried SolverState, e.g. a warm solve with a changed input)
    whose gradient is kept, unlike ``solve`` which detaches its init state.

    Returns (last iterate, recorded iterates [record, ...] or None, SolverState).
    """
    opts = {"remat": True} if memory is None else {"memory": memory, "remat": True}
    z, _, _, _, traj, _, state = _solve_nodiff(
        f,
        z0,
        args,
        method=method,
        max_steps=max_steps,
        tol=tol,
        damping=0.0,
        record=record,
        stop="converged",
        lowest="last",
        opts=opts,
        unrolled=True,
        init=init,
    )
    return z, traj, state


def _check_init(init, w0, fw0, buffers, method) -> None:
    """Raise unless ``init`` (a SolverState or None) fits this solve's working state."""
    if init is None:
        return
    if not isinstance(init, SolverState):
        raise ValueError(
            f"solve: init_state must be the SolverState of a previous solve (sol.state with "
            f"return_state=True), got {type(init).__name__}."
        )
    want = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), (w0, fw0, buffers))
    got = jax.tree.map(
        lambda x: (jnp.shape(x), jnp.result_type(x)), (init.z, init.fz, init.buffers)
    )
    if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
        raise ValueError(
            f"solve: init_state does not fit this {method} solve (batch size, state shapes, "
            "dtype or method memory differ); continue with the same z0 shapes, method and "
            "memory as the solve that produced it."
        )


# ----------------------------------------------------------------------------- public API


def _check_options(method: str, grad: str, options: dict, max_steps: int) -> tuple[dict, dict]:
    allowed_m, allowed_g = _METHOD_OPTIONS[method], _GRAD_OPTIONS[grad]
    unknown = set(options) - set(allowed_m) - set(allowed_g)
    if unknown:
        raise ValueError(
            f"solve: unknown option(s) {sorted(unknown)} for method={method!r}, grad={grad!r}; "
            f"allowed: {sorted(set(allowed_m) | set(allowed_g))}."
        )
    mopts = {k: options.get(k, v) for k, v in allowed_m.items()}
    gopts = {k: options.get(k, v) for k, v in allowed_g.items()}
    if method == "anderson":
        if not (isinstance(mopts["memory"], int) and mopts["memory"] >= 1):
            raise ValueError(
                f"solve: anderson memory must be an int >= 1, got {mopts['memory']!r}."
            )
        if mopts["lam"] < 0 or not 0 < mopts["beta"] <= 1:
            raise ValueError("solve: anderson needs lam >= 0 and 0 < beta <= 1.")
    if method == "broyden":
        mem = mopts["memory"]
        mopts["memory"] = min(max_steps, 16) if mem is None else mem
        if not (isinstance(mopts["memory"], int) and mopts["memory"] >= 1):
            raise ValueError(f"solve: broyden memory must be an int >= 1, got {mem!r}.")
    if grad == "phantom":
        k, lam = gopts["grad_steps"], gopts["grad_damping"]
        if not (isinstance(k, int) and k >= 1) or not 0 < lam <= 1:
            raise ValueError(
                f"solve: phantom needs grad_steps int >= 1 and 0 < grad_damping <= 1; got {k!r}, "
                f"{lam!r}."
            )
    return mopts, gopts


def solve(
    f: Callable[[PyTree, PyTree], PyTree],
    z0: PyTree,
    args: PyTree,
    *,
    method: str = "picard",
    max_steps: int = 50,
    tol: float = 1e-4,
    damping: float = 0.0,
    record: int = 0,
    grad: str = "implicit",
    stop: str = "converged",
    lowest: str | None = None,
    init_state: SolverState | None = None,
    return_state: bool = False,
    **method_options: Any,
) -> Solution:
    """Find ``z* = f(z*, args)`` per example, as one compiled loop.

    Each example stops changing (bitwise) once its relative residual
    ``||f(z)-z|| / (||f(z)|| + 1e-9)`` is below ``tol``; the loop ends when all examples have
    converged or after ``max_steps`` steps. ``f`` must act on each example independently (no
    coupling across the batch axis, e.g. no batch statistics), since examples are frozen and their
    backward problems solved independently.

    Args:
        f: ``f(z, args) -> z`` with the same pytree structure, shapes and dtypes as ``z``.
        z0: initial state, pytree of floating arrays with leading batch axis ``[B, ...]``.
        args: pytree of parameters/inputs; gradients of ``sol.z`` flow to it (never to ``z0``
            except for ``grad="unrolled"``). Values ``f`` closes over are differentiated too
            (hoisted into the arguments with ``jax.closure_convert``).
        method: ``"picard"`` (``z <- (1-damping) f(z) + damping z``), ``"anderson"`` (options
            ``memory=5``, ``lam=1e-4`` (relative to the mean squared residual), ``beta=1.0``) or
            ``"broyden"`` (option ``memory``: rank-1 updates kept, default
            ``min(max_steps, 16)``; when the buffer is full Broyden restarts from ``B = -I``;
            with ``memory >= max_steps``, as in the DEQ reference, it never does).
        max_steps: maximum solver steps (f-evaluations are at most ``max_steps + 1``).
        tol: relative-residual tolerance.
        damping: Picard damping in ``[0, 1)``; only for ``method="picard"``.
        record: keep the first ``record`` iterates in ``sol.trajectory`` (fixed-size buffer).
        grad: ``"implicit"`` (IFT via custom_vjp; options ``backward_method``, ``backward_tol``,
            ``backward_max_steps``, ``backward_options`` default to the forward ones; a backward
            solve that misses its tol logs a warning with its residual and steps, or raises with
            ``backward_throw=True``), ``"unrolled"`` (BPTT through exactly the steps taken;
            ``remat=True`` recomputes each step's f-intermediates in the backward pass instead of
            storing them, for long solves), ``"phantom"`` (``grad_steps=5``
            damped steps ``z <- (1-lam) z + lam f(z)`` from the detached ``z*`` with
            ``grad_damping=lam=0.5``; the forward value stays ``z*``) or ``"none"``.
        stop: ``"converged"`` (per-example stopping) or ``"never"`` (exactly ``max_steps`` steps
            for every example, the papers' fixed T).
        lowest: which iterate is returned: ``"last"`` (default for Picard), ``"example"`` (lowest
            residual per example; default for Anderson/Broyden) or ``"batch"`` (the iterate with the
            lowest batch-global residual, as in the DEQ reference code).
        init_state: ``sol.state`` of a previous solve (same ``f`` structure, method, memory and
            batch) to continue it for ``max_steps`` more steps: the iterates are those of one
            longer solve (with ``memory >= total steps`` for Broyden, or the same restart points).
            ``z0`` then only fixes the structure; the iterate comes from the state. ``sol.steps``
            counts the steps of this call; Broyden's default memory is ``min(max_steps, 16)`` of
            *this* call, so pass ``memory`` explicitly when continuing.
        return_state: return ``sol.state`` (:class:`SolverState`, no gradient) to continue from.
        **method_options: the method and gradient options named above.

    Returns:
        :class:`Solution`. ``steps``/``residual``/``converged``/``status`` carry no gradient; the
        trajectory is differentiable only for ``grad="unrolled"``. An example whose iterate or
        residual becomes NaN/inf stops at its last finite iterate with ``Status.NONFINITE``.

    Raises:
        ValueError: for unknown names or options, or a malformed ``z0``.
    """
    if method not in _METHODS:
        raise ValueError(f"solve: unknown method {method!r}; expected one of {_METHODS}.")
    if grad not in _GRADS:
        raise ValueError(f"solve: unknown grad {grad!r}; expected one of {_GRADS}.")
    if stop not in _STOPS:
        raise ValueError(f"solve: unknown stop {stop!r}; expected one of {_STOPS}.")
    if lowest is None:
        lowest = "last" if method == "picard" else "example"
    if lowest not in _LOWEST:
        raise ValueError(f"solve: unknown lowest {lowest!r}; expected one of {_LOWEST}.")
    if not (isinstance(max_steps, int) and max_steps >= 1):
        raise ValueError(f"solve: max_steps must be an int >= 1, got {max_steps!r}.")
    if not (isinstance(record, int) and record >= 0):
        raise ValueError(f"solve: record must be an int >= 0, got {record!r}.")
    if not tol > 0:
        raise ValueError(f"solve: tol must be > 0, got {tol!r}.")
    if not 0.0 <= damping < 1.0:
        raise ValueError(f"solve: damping must be in [0, 1), got {damping!r}.")
    if damping != 0.0 and method != "picard":
        raise ValueError(
            f"solve: damping applies to method='picard' only; {method!r} uses its own options "
            "(anderson: beta)."
        )
    _batch_size(z0)
    mopts, gopts = _check_options(method, grad, method_options, max_steps)

    common = dict(
        method=method,
        max_steps=max_steps,
        tol=tol,
        damping=damping,
        record=record,
        stop=stop,
        lowest=lowest,
        opts=mopts,
    )
    if init_state is not None:
        init_state = lax.stop_gradient(init_state)
    if grad == "unrolled":
        common["opts"] = dict(mopts, remat=bool(gopts["remat"]))
        z, steps, res, bad, traj_z, traj_res, state = _solve_nodiff(
            f, z0, args, unrolled=True, init=init_state, **common
        )
    else:
        # Values f closes over that are being differentiated become explicit arguments, so the
        # forward loop carries no derivatives and the implicit gradient reaches them too.
        f_closed, consts = jax.closure_convert(f, z0, args)
        if consts:
            f = lambda z, a: f_closed(z, a[0], *a[1])
            args = (args, consts)
        z_sg, args_sg = lax.stop_gradient((z0, args))
        z, steps, res, bad, traj_z, traj_res, state = _solve_nodiff(
            f, z_sg, args_sg, unrolled=False, init=init_state, **common
        )
        z = lax.stop_gradient(z)
        traj_z = lax.stop_gradient(traj_z)
        if grad == "phantom":
            z = _phantom(f, z, args, gopts["grad_steps"], gopts["grad_damping"])
        elif grad == "implicit":
            bwd = dict(
                method=gopts["backward_method"] or method,
                tol=gopts["backward_tol"] or tol,
                max_steps=gopts["backward_max_steps"] or max_steps,
                options=gopts["backward_options"] or {},
                throw=bool(gopts["backward_throw"]),
            )
            if bwd["method"] not in _METHODS:
                raise ValueError(f"solve: unknown backward_method {bwd['method']!r}.")
            bm, _ = _check_options(bwd["method"], "none", bwd["options"], bwd["max_steps"])
            bwd["options"] = bm
            z = _attach_implicit(f, z, args, bwd)
    steps, res, bad = lax.stop_gradient((steps, res, bad))
    traj = Trajectory(traj_z, lax.stop_gradient(traj_res)) if record else None
    state = lax.stop_gradient(state) if return_state else None
    return _solution(z, steps, res, bad, tol, traj, state)


def _solution(z, steps, res, bad, tol, traj=None, state=None) -> Solution:
    conv = (res < tol) & ~bad
    status = jnp.where(bad, Status.NONFINITE, jnp.where(conv, Status.SUCCESS, Status.MAX_STEPS))
    return Solution(z, steps, res, conv, traj, status.astype(jnp.int8), state)


def solution_of(z: PyTree, fz: PyTree, steps: int, tol: float) -> Solution:
    """The :class:`Solution` of an iterate ``z`` reached outside :func:`solve` after ``steps``
    steps (e.g. a fixed number of Picard steps as a plain loop), ``fz = f(z)`` giving its
    residual as :func:`solve` defines it. Under jit, XLA drops ``fz`` when nothing reads the
    residual. Such a loop has no per-example non-finite freezing: a non-finite example is
    reported NONFINITE but its ``z`` is not its last finite iterate."""
    res = lax.stop_gradient(_rel_residual(fz, z))
    bad = ~jnp.isfinite(res)
    return _solution(z, jnp.full(res.shape, steps, jnp.int32), res, bad, tol)


def _phantom(f, z_star, args, k, lam):
    """Forward value z*, gradient of k damped steps from stop_gradient(z*)."""

    def body(z, _):
        return jax.tree.map(lambda a, b: (1.0 - lam) * a + lam * b, z, f(z, args)), None

    z, _ = lax.scan(body, z_star, None, length=k)
    # Straight-through: exactly z* forward (z - sg(z) == 0), phantom derivative backward.
    return jax.tree.map(lambda s, p: s + (p - lax.stop_gradient(p)), z_star, z)


def _attach_implicit(f, z_star, args, bwd):
    """Identity on z* whose VJP w.r.t. args is the implicit-function-theorem gradient."""

    @jax.custom_vjp
    def attach(z, a):
        return z

    def fwd(z, a):
        return z, (z, a)

    def backward(resid, g):
        z, a = resid
        _, vjp_z = jax.vjp(lambda zz: f(zz, a), z)
        # u = g + (df/dz)^T u, a linear fixed point per example, solved by the same engine.
        h = lambda u, gg: jax.tree.map(jnp.add, gg, vjp_z(u)[0])
        u, steps, res, bad, *_ = _solve_nodiff(
            h,
            g,
            g,
            method=bwd["method"],
            max_steps=bwd["max_steps"],
            tol=bwd["tol"],
            damping=0.0,
            record=0,
            stop="converged",
            lowest="last" if bwd["method"] == "picard" else "example",
            opts=bwd["options"],
            unrolled=False,
        )
        _report_backward(steps, res, bad, bwd)
        _, vjp_a = jax.vjp(lambda aa: f(z, aa), a)
        (ga,) = vjp_a(u)
        return jax.tree.map(jnp.zeros_like, z), ga

    attach.defvjp(fwd, backward)
    return attach(z_star, args)


def _report_backward(steps: jax.Array, res: jax.Array, bad: jax.Array, bwd: dict) -> None:
    """Warn (or raise, ``backward_throw``) from inside the compiled backward pass on failure.

    ``jax.debug.callback`` works unchanged under jit, vmap (one call per mapped example) and
    grad, and is never dead-code eliminated; ``checkify`` would instead make every caller
    wrap its function and unpack an error value. A raise inside the callback reaches the caller
    as a runtime error whose message contains the :class:`ConvergenceError` text.
    """
    failed = jnp.any((res >= bwd["tol"]) | bad)
    summary = (failed, jnp.max(res), jnp.max(steps), jnp.sum(bad), res.size)

    def callback(failed, worst, steps, nonfinite, n):
        if not failed:
            return
        msg = (
            f"implicit gradient: the backward linear solve ({bwd['method']}) did not reach tol "
            f"{bwd['tol']:g}: worst relative residual {float(worst):.3e} after {int(steps)} of "
            f"{bwd['max_steps']} steps ({int(nonfinite)} of {int(n)} examples non-finite); the "
            "gradient is inexact. Raise backward_max_steps, use backward_method='broyden', or "
            "check that f is contractive at z*."
        )
        if bwd["throw"]:
            raise ConvergenceError(msg)
        logging.warning(msg)

    # The cond skips the host call when nothing failed (vmap turns it into a select, and the
    # callback then checks the flag itself).
    lax.cond(failed, lambda s: jax.debug.callback(callback, *s), lambda s: None, summary)


def check_converged(sol: Solution, *, raise_error: bool = False) -> bool:
    """Report unconverged examples of a (concrete, not traced) :class:`Solution`.

    Args:
        sol: result of :func:`solve`.
        raise_error: raise :class:`ConvergenceError` instead of logging a warning.

    Returns:
        True when every example converged. The message counts examples per :class:`Status`.
    """
    conv, res, steps, status = jax.device_get((sol.converged, sol.residual, sol.steps, sol.status))
    if conv.all():
        return True
    frac = 1.0 - float(conv.mean())
    counts = ""
    if status is not None:
        counts = " (" + ", ".join(f"{s.name}: {int((status == s).sum())}" for s in Status) + ")"
    msg = (
        f"fixed-point solve: {frac:.1%} of {conv.size} examples unconverged{counts}; worst "
        f"relative residual {float(res.max()):.3e} after up to {int(steps.max())} steps. "
        "Increase max_steps, use method='anderson'/'broyden', or check that f is contractive "
        "(NONFINITE: f produced NaN/inf; check its inputs and scale)."
    )
    if raise_error:
        raise ConvergenceError(msg)
    logging.warning(msg)
    return False
