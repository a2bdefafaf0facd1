"""Input entropy reduction along the DEQ dynamics (Yang et al. 2023, Sec. 3.2, Algorithm 1)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from eqrobust import solvers
from eqrobust.classifier import Classifier, GradientPath
from eqrobust.defenses.states import merged_eval, readout_all
from eqrobust.models.deq import deq_compiler_options

# How the input gradient of the defended prediction is formed (the forward value is the same):
#   "none": no gradient (the solves carry none; the purified input is a constant).
#   "full": autodiff of the whole interleaved loop: BPTT through every Broyden step (remat) and
#       through the projections of every purification step; sign() contributes exactly zero.
#   "bpda": as "full", but each purification x' = x + delta(x) is the identity backward.
#   "phantom": BPDA for the purification, and the model's own phantom gradient at the defended
#       solution: damped steps from the detached last iterate with the injected x'.
MODES = ("none", "full", "bpda", "phantom")


@dataclasses.dataclass(frozen=True)
class EntropyReduction:
    """Settings of Algorithm 1.

    Attributes:
        eps: Linf radius of the purification around the given input (8/255 on CIFAR).
        alpha: sign-step size (2/255 on CIFAR).
        t_f: intervene after every t_f solver steps (paper: 2; ablation {1, 2, 4, 8}).
        r: sign steps per intervention (paper code: 10; main paper runs: 20; ablation
            {1, 5, 10, 20}); 0 leaves the input unchanged.
        patch: after re-injecting x', patch Broyden's last rank-1 update as the reference code
            does (delta_g += g_new(z) - g(z), then recompute u); False continues warm with the
            refreshed g and unchanged rank-1 buffers.
    """

    eps: float = 8 / 255
    alpha: float = 2 / 255
    t_f: int = 2
    r: int = 10
    patch: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.t_f, int) and self.t_f >= 1):
            raise ValueError(f"EntropyReduction: t_f must be an int >= 1, got {self.t_f!r}")
        if not (isinstance(self.r, int) and self.r >= 0):
            raise ValueError(f"EntropyReduction: r must be an int >= 0, got {self.r!r}")
        if self.eps < 0 or self.alpha < 0:
            raise ValueError(f"EntropyReduction: eps, alpha must be >= 0, got {self}")


class EntropyReductionOutput(NamedTuple):
    """What `entropy_reduction_forward` returns.

    Attributes:
        logits: [B, K] the defended prediction: readout of f(z_N; x') and the model's damped
            unroll (phantom mode) or f(z_N; x') alone (exact mode), as the model's own forward.
        x_purified: [B, H, W, C] the final input x'.
        z: list of branch states [B, ...], the state read out.
        residual: [B] relative residual of the last solver iterate under the final x'.
        entropy_before: [I, B] H(readout(f(z; x_t))) at each intervention before the R steps
            (I = N // t_f interventions).
        entropy_after: [I, B] the same after the R steps.
        trajectory: list of [N, B, ...] solver iterates z_1..z_N (record=True), else None.
    """

    logits: jax.Array
    x_purified: jax.Array
    z: list
    residual: jax.Array
    entropy_before: jax.Array
    entropy_after: jax.Array
    trajectory: list | None


def prediction_entropy(logits: jax.Array) -> jax.Array:
    """Per-example entropy -sum p log p of softmax(logits): [B, K] -> [B]."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def _flat(z: list) -> jax.Array:
    b = z[0].shape[0]
    return jnp.concatenate([a.reshape(b, -1) for a in z], axis=1)


def _unflat(w: jax.Array, like: list) -> list:
    out, i = [], 0
    for a in like:
        n = a[0].size
        out.append(w[:, i : i + n].reshape(a.shape).astype(a.dtype))
        i += n
    return out


def _mv(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, precision=lax.Precision.HIGHEST)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    ok = jnp.isfinite(den) & (jnp.abs(den) > jnp.finfo(den.dtype).tiny)
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def reinject(
    prev: solvers.SolverState, cur: solvers.SolverState, fz_new: jax.Array, patch: bool
) -> solvers.SolverState:
    """The Broyden state `cur` continued with a new input, whose f(z_cur) is `fz_new`.

    The inverse-Jacobian estimate is B = -I + U V^T (buffers [B, m, D], memory m >= all steps,
    so slot j holds the update of global step j). `prev` is the state one `solve` call of one
    step before `cur`. With patch, the last update's u is recomputed with
    delta_g = g_new(z_cur) - g(z_prev) (v^T = dz^T B_prev does not depend on delta_g), as the
    reference; then B g is recomputed for the new g. Examples frozen in that step have dz = 0 and
    an empty slot, which stays empty.

    Args:
        prev: SolverState before the last step.
        cur: SolverState after it.
        fz_new: [B, D] f(z_cur) under the new input (flattened like the state).
        patch: whether to patch the last rank-1 update.

    Returns:
        SolverState to pass as `init_state` to the next solve with the new input.
    """
    us, vs, _ = cur.buffers
    m = us.shape[1]
    w = cur.z
    g_new = fz_new - w
    if patch:
        s = jnp.maximum(cur.step - 1, 0)
        dx = w - prev.z
        dg = g_new - (prev.fz - prev.z)
        before = (jnp.arange(m) < s).astype(us.dtype)[None, :]
        bdg = -dg + _mv("bmd,bm->bd", us, before * _mv("bmd,bd->bm", vs, dg))  # B_prev dg
        vt = lax.dynamic_index_in_dim(vs, s, 1, keepdims=False)
        u = _safe_div(dx - bdg, jnp.sum(vt * dg, axis=1, keepdims=True))
        patched = lax.dynamic_update_index_in_dim(us, u, s, 1)
        us = jnp.where(cur.step > prev.step, patched, us)
    keep = (jnp.arange(m) < cur.step).astype(us.dtype)[None, :]
    bg = -g_new + _mv("bmd,bm->bd", us, keep * _mv("bmd,bd->bm", vs, g_new))
    return solvers.SolverState(cur.step, w, fz_new, (us, vs, bg))


class _Ctx(NamedTuple):
    """The pieces of one forward: the model, its cell, the given input and the settings."""

    m: Any
    f: Any
    cstate: Any
    x: jax.Array
    z0: list
    cfg: EntropyReduction
    mode: str
    record: bool

    def args(self, xc: jax.Array) -> tuple:
        return (self.cstate, self.m.inject(xc), None)

    def entropy(self, z: list, xc: jax.Array) -> jax.Array:
        """[B] H(readout(f(z; xc))), the paper's Eq. (8) objective per example."""
        return prediction_entropy(self.m.readout(self.f(z, self.args(xc))))


def _continue(
    ctx: _Ctx, st: solvers.SolverState, xc: jax.Array, steps: int
) -> tuple[solvers.SolverState, list | None]:
    """`steps` more Broyden steps from `st` with input xc: (state, recorded iterates or None)."""
    sp = ctx.m.solver
    rec = steps if ctx.record else 0
    if ctx.mode in ("full", "bpda"):
        # solve() detaches init_state; the differentiable modes need the carried state's
        # gradient, so they use the differentiable loop (BPTT, F rematerialised).
        _, traj, state = solvers.iterate(
            ctx.f,
            ctx.z0,
            ctx.args(xc),
            max_steps=steps,
            tol=sp.f_tol,
            memory=sp.f_max_iter,
            init=st,
            record=rec,
        )
        return state, traj
    sol = solvers.solve(
        ctx.f,
        ctx.z0,
        ctx.args(xc),
        method="broyden",
        max_steps=steps,
        tol=sp.f_tol,
        record=rec,
        grad="none",
        lowest="last",
        init_state=st,
        return_state=True,
        memory=sp.f_max_iter,
    )
    return sol.state, (sol.trajectory.z if ctx.record else None)


def _purify(ctx: _Ctx, z: list, xc: jax.Array) -> jax.Array:
    """R steps x' <- clip01(clip_{x +- eps}(x' - alpha sign(dH/dx'))), H = H(readout(f(z; x'))).

    The sign direction has zero derivative, so it is computed on detached inputs (the same
    gradient as differentiating it, without a second-order pass); the projections stay
    differentiable, each step under jax.checkpoint (only x' is stored per step).
    """
    cfg, x = ctx.cfg, ctx.x
    zs = lax.stop_gradient(z)
    grad_h = jax.grad(lambda xp: jnp.sum(ctx.entropy(zs, xp)))

    @jax.checkpoint
    def step(xp: jax.Array, _: Any) -> tuple[jax.Array, None]:
        d = lax.stop_gradient(jnp.sign(grad_h(lax.stop_gradient(xp))))
        xn = jnp.clip(xp - cfg.alpha * d, x - cfg.eps, x + cfg.eps)
        return jnp.clip(xn, 0.0, 1.0), None

    xn, _ = lax.scan(step, xc, None, length=cfg.r)
    if ctx.mode in ("bpda", "phantom"):
        xn = xc + lax.stop_gradient(xn - xc)  # straight-through: the purification is identity
    return xn


def _initial_state(ctx: _Ctx) -> solvers.SolverState:
    """Broyden at step 0 from z0 = 0 with B = -I (the engine's layout: U, V, B g)."""
    w0 = _flat(ctx.z0)
    fw0 = _flat(ctx.f(ctx.z0, ctx.args(ctx.x)))
    b, d = w0.shape
    zeros = jnp.zeros((b, ctx.m.solver.f_max_iter, d), w0.dtype)
    return solvers.SolverState(jnp.zeros((), jnp.int32), w0, fw0, (zeros, zeros, w0 - fw0))


def _interleaved(ctx: _Ctx) -> tuple:
    """Algorithm 1's loop: (last state, final x', entropies before/after, trajectory)."""
    cfg, n = ctx.cfg, ctx.m.solver.f_max_iter
    n_int = n // cfg.t_f

    def chunk(carry: tuple, _: Any) -> tuple:
        st, xc = carry
        prev, t1 = _continue(ctx, st, xc, cfg.t_f - 1) if cfg.t_f > 1 else (st, None)
        cur, t2 = _continue(ctx, prev, xc, 1)
        z = _unflat(cur.z, ctx.z0)
        xn = _purify(ctx, z, xc)
        h0 = lax.stop_gradient(ctx.entropy(z, xc))
        h1 = lax.stop_gradient(ctx.entropy(z, xn))
        st = reinject(prev, cur, _flat(ctx.f(z, ctx.args(xn))), cfg.patch)
        traj = None
        if ctx.record:
            traj = t2 if t1 is None else [jnp.concatenate(ab) for ab in zip(t1, t2)]
        return (st, xn), (h0, h1, traj)

    st = _initial_state(ctx)
    (st, xc), (h0, h1, traj) = lax.scan(chunk, (st, ctx.x), None, length=n_int)
    if ctx.record:
        traj = [a.reshape(n_int * cfg.t_f, *a.shape[2:]) for a in traj] if n_int else None
    rem = n - n_int * cfg.t_f
    if rem:
        st, t3 = _continue(ctx, st, xc, rem)
        if ctx.record:
            traj = t3 if traj is None else [jnp.concatenate(ab) for ab in zip(traj, t3)]
    return st, xc, h0, h1, traj


def entropy_reduction_forward(
    m: Any,
    x: jax.Array,
    cfg: EntropyReduction = EntropyReduction(),
    *,
    mode: str = "none",
    record: bool = False,
) -> EntropyReductionOutput:
    """The entropy-reduced DEQ forward (a pure function of the model and x; jit it).

    Broyden from z0 = 0 runs N = f_max_iter steps in total; after every t_f steps the input is
    purified by R sign steps on H(readout(f(z_t; x'))) (z_t the current iterate, fixed), x' is
    re-injected and the solver continues warm (`reinject`). After the last step the prediction is
    the model's own forward from the last iterate with the final x': f once, then (phantom
    models) the damped unroll. Examples are independent (the batch-mean H has the per-example
    gradient sign), so this equals a vmap over examples.

    Args:
        m: a DEQNet in eval mode (Broyden forward solver).
        x: [B, H, W, C] images in [0, 1].
        cfg: EntropyReduction settings.
        mode: the input-gradient construction, one of `MODES` (the value is the same).
        record: also return the iterates z_1..z_N.

    Returns:
        EntropyReductionOutput.
    """
    if mode not in MODES:
        raise ValueError(f"entropy_reduction_forward: mode must be one of {MODES}, got {mode!r}")
    sp = m.solver
    if sp.f_solver != "broyden":
        raise ValueError(
            f"entropy reduction continues a Broyden solve; the model uses {sp.f_solver!r}. Set "
            "DEQSolver(f_solver='broyden')."
        )
    f, cstate = m.cell_fn()
    z0 = m.zeros(x.shape[0], x.dtype)
    ctx = _Ctx(m, f, cstate, x, z0, cfg, mode, record)
    st, xc, h0, h1, traj = _interleaved(ctx)
    z_last = _unflat(st.z, z0)
    xin = xc
    if mode == "phantom":
        z_last, xin = lax.stop_gradient(z_last), x + lax.stop_gradient(xc - x)
    elif mode == "none":
        z_last, xin = lax.stop_gradient((z_last, xc))
    a = ctx.args(xin)
    z = f(z_last, a)
    if not sp.ift:
        for _ in range(sp.grad):
            z = [(1.0 - sp.tau) * u + sp.tau * v for u, v in zip(z, f(z, a))]
    res = jnp.linalg.norm(st.fz - st.z, axis=1) / (jnp.linalg.norm(st.fz, axis=1) + 1e-9)
    return EntropyReductionOutput(m.readout(z), xc, z, lax.stop_gradient(res), h0, h1, traj)


@functools.lru_cache(maxsize=64)
def _program(graphdef: nnx.GraphDef, cfg: EntropyReduction, mode: str, what: str):
    def apply(state: nnx.State, x: jax.Array) -> jax.Array:
        m = merged_eval(graphdef, state)
        out = entropy_reduction_forward(m, x, cfg, mode=mode, record=what == "trajectory")
        if what == "trajectory":
            return readout_all(m, out.trajectory)
        return out.logits

    return apply


def entropy_reduction_logits_fn(
    model: Any, cfg: EntropyReduction = EntropyReduction(), *, mode: str = "none"
) -> jax.tree_util.Partial:
    """x [B, H, W, C] -> defended logits [B, K], with the input gradient of `mode`."""
    graphdef, state = nnx.split(model)
    return jax.tree_util.Partial(_program(graphdef, cfg, mode, "logits"), state)


def entropy_reduction(
    model: Any,
    cfg: EntropyReduction = EntropyReduction(),
    *,
    mode: str = "phantom",
    name: str | None = None,
) -> Classifier:
    """The entropy-reduction defence of a DEQNet as a Classifier.

    Args:
        model: a DEQNet (Broyden forward solver).
        cfg: EntropyReduction settings.
        mode: the gradient the Classifier's logits_fn carries (default "phantom": BPDA through
            the purification and the model's phantom/one-step gradient at the defended state).
            Use `attack_entropy_reduction` for the full/BPDA/transfer comparison.
        name: display name.

    Returns:
        Classifier with test_time_optimization=True, prediction_depth N, trajectory_fn the
        readouts [N, B, K] of the interleaved iterates, and the declared gradient path.
    """
    graphdef, state = nnx.split(model)
    sp = model.solver
    if mode in ("full", "bpda"):
        grad = GradientPath("unrolled", sp.f_max_iter)
    else:
        grad = GradientPath("phantom", 1 if sp.ift else sp.grad)
    return Classifier(
        logits_fn=jax.tree_util.Partial(_program(graphdef, cfg, mode, "logits"), state),
        name=name or f"DEQ+ER(T_f={cfg.t_f},R={cfg.r})",
        trajectory_fn=jax.tree_util.Partial(_program(graphdef, cfg, "none", "trajectory"), state),
        prediction_depth=sp.f_max_iter,
        gradient=grad,
        test_time_optimization=True,
        compiler_options=deq_compiler_options(),
    )
