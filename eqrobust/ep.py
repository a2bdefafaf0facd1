"""EP-CNN: init, free phase on the fixed-point engine, nudged phases, EP gradients, classifiers."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from eqrobust import energy, ops, solvers
from eqrobust.classifier import Classifier, Dynamics, GradientPath
from eqrobust.energy import EnergyConfig, Layer, Params, States

Array = jax.Array

ESTIMATORS = ("symmetric", "one_sided")


@dataclasses.dataclass(frozen=True)
class EPConfig:
    """Everything the EP model needs besides its parameters (static, hashable).

    Attributes:
      energy: the architecture (`EnergyConfig`).
      t1: free-phase steps (the prediction depth; papers: 250).
      t2: steps of each nudged phase (papers: 30).
      beta: nudging strength.
      random_sign: draw the sign of beta per batch (one-sided estimator's bias cancels on average).
      estimator: "symmetric" (+beta and -beta phases, Laborieux et al. 2021) or "one_sided".
      free_method: fixed-point method of the free phase ("picard" = the papers; "anderson",
        "broyden" reach the same fixed point in fewer energy-gradient evaluations).
      free_stop: "never" runs exactly t1 steps (the papers); "converged" stops each example at
        `free_tol` (at most t1 steps).
      free_tol: relative-residual tolerance for `free_stop="converged"` and the solvers.
      solver_options: extra keyword options for `solvers.solve` (e.g. (("memory", 5),)).
      implicit_options: extra options for the implicit-gradient backward solve.
      update: "sync" (all layers at once from the previous states: the papers) or "async"
        (even layers, then odd layers: `energy.step_async`, Scellier et al. 2023; same fixed
        points, fewer steps; in plain Picard phases each sweep costs about one synchronous
        step, `energy.run_async`). Applies to every phase.
    """

    energy: EnergyConfig = EnergyConfig()
    t1: int = 250
    t2: int = 30
    beta: float = 0.5
    random_sign: bool = False
    estimator: str = "symmetric"
    free_method: str = "picard"
    free_stop: str = "never"
    free_tol: float = 1e-4
    solver_options: tuple[tuple[str, Any], ...] = ()
    implicit_options: tuple[tuple[str, Any], ...] = ()
    update: str = "sync"

    def __post_init__(self):
        object.__setattr__(self, "solver_options", tuple(map(tuple, self.solver_options)))
        object.__setattr__(self, "implicit_options", tuple(map(tuple, self.implicit_options)))
        if self.t1 < 1 or self.t2 < 1:
            raise ValueError(f"t1 and t2 must be >= 1; got t1={self.t1}, t2={self.t2}.")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}; got {self.estimator!r}.")
        if self.free_stop not in ("never", "converged"):
            raise ValueError(f"free_stop must be 'never' or 'converged'; got {self.free_stop!r}.")
        if self.update not in energy.UPDATES:
            raise ValueError(
                f"update must be one of {sorted(energy.UPDATES)}; got {self.update!r}."
            )
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0 (the sign is set by the phase); got {self.beta}.")


def config_from_dict(model: Any) -> EPConfig:
    """Builds an `EPConfig` from a mapping / ConfigDict with the fields of `EnergyConfig` and
    `EPConfig` side by side (e.g. `config.model` of eqrobust/configs/ep_cnn.py)."""
    d = dict(model)
    e_fields = {f.name for f in dataclasses.fields(EnergyConfig)}
    p_fields = {f.name for f in dataclasses.fields(EPConfig)} - {"energy"}
    unknown = set(d) - e_fields - p_fields
    if unknown:
        raise ValueError(f"Unknown EP model fields {sorted(unknown)}.")
    e = EnergyConfig(**{k: v for k, v in d.items() if k in e_fields})
    opts = {k: tuple(dict(d[k]).items()) for k in ("solver_options", "implicit_options") if k in d}
    rest = {k: v for k, v in d.items() if k in p_fields and k not in opts}
    return EPConfig(energy=e, **rest, **opts)


# --------------------------------------------------------------------------- parameters


def init(
    key: jax.Array, config: EnergyConfig | EPConfig, *, scale: float = 1.0, dtype=jnp.float32
) -> Params:
    """PyTorch-default init: w, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform(a=sqrt 5)).

    Args:
      key: PRNG key.
      config: the architecture (or an `EPConfig`).
      scale: multiplies every weight (the reference's optional per-layer init scaling).
      dtype: parameter dtype.

    Returns:
      `Params`: conv layers (w [k, k, C_in, C_out]), fc layers, then the readout / output layer.
    """
    if isinstance(config, EPConfig):
        config = config.energy
    layers = []
    shapes = config.param_shapes
    for k, (ws, bs) in zip(jax.random.split(key, len(shapes)), shapes, strict=True):
        fan_in = math.prod(ws[:-1])
        bound = 1.0 / math.sqrt(fan_in)
        kw, kb = jax.random.split(k)
        w = jax.random.uniform(kw, ws, dtype, -bound, bound) * scale
        b = jax.random.uniform(kb, bs, dtype, -bound, bound)
        layers.append(Layer(w, b))
    return tuple(layers)


# --------------------------------------------------------------------------- phases


def _free_map(cfg: EnergyConfig, update: str = "sync"):
    """The free update map for `solvers.solve` (a closure over the static config)."""
    step = energy.UPDATES[update]

    def free(z: States, args) -> States:
        params, x = args
        return step(params, x, z, config=cfg)

    return free


def free_phase(
    params: Params,
    x: ArrayLike,
    config: EPConfig,
    *,
    steps: int | None = None,
    s0: States | None = None,
    record: int = 0,
    grad: str = "none",
    method: str | None = None,
    stop: str | None = None,
    **grad_options: Any,
) -> solvers.Solution:
    """Free phase (beta = 0): s <- sigma(dPhi/ds) from zeros, on the fixed-point engine, or, for
    exactly `steps` Picard steps without a trajectory (the default), as a plain loop with the
    engine's results (`_plain_phase`).

    Args:
      params: `Params`.
      x: [B, H, W, C] images in [0, 1].
      config: `EPConfig`; by default Picard, `stop="never"`, exactly `config.t1` steps.
      steps: max steps (default `config.t1`).
      s0: initial states (default zeros).
      record: keep the first `record` iterates in `Solution.trajectory`.
      grad: how the result is differentiated w.r.t. params and x: "none" (default; not
        differentiable, plain while loop), "unrolled" (BPTT through the steps), "implicit" (IFT),
        "phantom".
      method, stop: override `config.free_method` / `config.free_stop`.
      **grad_options: forwarded to `solvers.solve` (e.g. grad_steps, backward solver options).

    Returns:
      `solvers.Solution` with `z` the free states s*.
    """
    x = jnp.asarray(x)
    energy.check_inputs(x, config.energy)
    dtype = params[0].w.dtype
    zero = s0 is None
    if zero:
        s0 = energy.zero_states(config.energy, x.shape[0], dtype)
    free = _free_map(config.energy, config.update)
    options = dict(config.solver_options)
    if grad == "implicit":
        options.update(dict(config.implicit_options))
    options.update(grad_options)
    method, stop = method or config.free_method, stop or config.free_stop
    steps = config.t1 if steps is None else steps
    if _plain(method, stop, record, grad, options):
        return _plain_phase(params, x.astype(dtype), s0, config, steps, grad=grad, zero=zero)
    return solvers.solve(
        free,
        s0,
        (params, x.astype(dtype)),
        method=method,
        max_steps=steps,
        tol=config.free_tol,
        record=record,
        grad=grad,
        stop=stop,
        **options,
    )


def _plain(method: str, stop: str, record: int, grad: str, options: dict) -> bool:
    """Whether a phase is exactly `steps` undamped updates, without trajectory or solver
    options: then it runs as a plain loop (`_plain_phase`) instead of the engine's."""
    return (
        method == "picard"
        and stop == "never"
        and not record
        and not options
        and (grad in ("none", "unrolled"))
    )


def _plain_phase(
    params, x, s0, config: EPConfig, steps: int, *, grad, beta=0.0, y=None, zero=False
) -> solvers.Solution:
    """`steps` updates of `config.update` from s0 as one plain loop: the engine's Picard
    iterates (its `stop="never"` loop also checks finiteness and residuals at every step and
    evaluates the update once more; EP states stay finite, since every activation is bounded
    and inputs are checked), with `update="async"` each sweep at about one synchronous step's
    cost (`energy.run_async`). `zero`: s0 is all zero, and the first update skips the convs
    of zeros (`energy.from_zero`, bitwise the same). Returns the engine's `Solution`: the
    residual of the last state costs one more update, which XLA drops when nothing reads it."""
    if grad == "none":
        params, x, s0 = jax.lax.stop_gradient((params, x, s0))
    e = config.energy
    if config.update == "async":
        z = energy.run_async(params, x, None if zero else s0, steps, config=e, beta=beta, y=y)
    elif grad == "unrolled" and y is None:  # BPTT through the free phase
        z = energy.run_sync(params, x, None if zero else s0, steps, config=e)
    else:
        body = lambda _, s: energy.step(params, x, s, config=e, beta=beta, y=y)  # noqa: E731
        if zero:
            z = jax.lax.fori_loop(1, steps, body, energy.from_zero(params, x, e))
        else:
            z = jax.lax.fori_loop(0, steps, body, s0)
    p, xx, zz = jax.lax.stop_gradient((params, x, z))
    if config.update == "async":  # one more sweep, at one sweep's cost
        fz = energy.run_async(p, xx, zz, 1, config=e, beta=beta, y=y)
    else:
        fz = energy.step(p, xx, zz, config=e, beta=beta, y=y)
    return solvers.solution_of(z, fz, steps, config.free_tol)


def nudged_phase(
    params: Params,
    x: ArrayLike,
    y: ArrayLike,
    s_init: States,
    beta: ArrayLike,
    config: EPConfig,
    *,
    steps: int | None = None,
) -> States:
    """Nudged phase: `steps` (default t2) Picard steps s <- sigma(d(Phi - beta L)/ds) from s_init.

    Args:
      params: `Params`.
      x: [B, H, W, C] images.
      y: [B] int labels.
      s_init: states to start from (the free fixed point s*).
      beta: signed nudging strength (scalar, may be traced).
      config: `EPConfig`.
      steps: number of steps (default `config.t2`).

    Returns:
      The nudged states s^beta (not differentiable; EP never differentiates through phases).
    """
    return _nudged(params, x, y, s_init, beta, config, steps).z


def _nudged(params, x, y, s_init, beta, config, steps) -> solvers.Solution:
    """The nudged phase's solution (states detached; `.residual` [B] says whether it settled)."""
    dtype = params[0].w.dtype
    args = (params, jnp.asarray(x, dtype), jnp.asarray(y), jnp.asarray(beta, dtype))
    steps = config.t2 if steps is None else steps
    p, xx, yy, b = jax.lax.stop_gradient(args)
    sol = _plain_phase(p, xx, s_init, config, steps, grad="none", beta=b, y=yy)
    return sol._replace(z=jax.lax.stop_gradient(sol.z))


class EPAux(NamedTuple):
    """Diagnostics of one EP gradient computation (all [B] or scalar)."""

    loss: Array  # [B] loss at the free fixed point
    correct: Array  # [B] prediction correct at the free fixed point
    residual: Array  # [B] free-phase relative residual
    beta: Array  # scalar, the signed beta of the first nudged phase
    # [B] relative residual at the end of the nudged phase(s) (the larger of the two for the
    # symmetric estimator): EP's gradient formula assumes the nudged phases settled too.
    nudged_residual: Array | None = None


def ep_gradient(
    params: Params,
    x: ArrayLike,
    y: ArrayLike,
    config: EPConfig,
    *,
    key: jax.Array | None = None,
    estimator: str | None = None,
    beta: ArrayLike | None = None,
) -> tuple[Params, EPAux]:
    """EP estimate of d(mean loss at s*)/d(params).

    Symmetric: -(dPhi/dtheta(s^{+b}, +b) - dPhi/dtheta(s^{-b}, -b)) / (2 b);
    one-sided: -(dPhi/dtheta(s^{b}, b) - dPhi/dtheta(s*, 0)) / b. Phi is batch-averaged, so the
    result has the scale of the gradient of the batch-mean loss (what the optimizer expects).

    Args:
      params: `Params`.
      x: [B, H, W, C] images in [0, 1].
      y: [B] int labels.
      config: `EPConfig`.
      key: PRNG key; required when `config.random_sign`.
      estimator: override `config.estimator`.
      beta: override `config.beta` (positive; may be traced).

    Returns:
      (gradient pytree like params, `EPAux`).
    """
    estimator = estimator or config.estimator
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}; got {estimator!r}.")
    x = jnp.asarray(x, params[0].w.dtype)
    cfg = config.energy
    y = ops.check_labels(y, x.shape[0], cfg.num_classes, who="ep_gradient")
    sol = free_phase(jax.lax.stop_gradient(params), x, config)
    s_star = jax.lax.stop_gradient(sol.z)
    beta = jnp.asarray(config.beta if beta is None else beta, x.dtype)
    if config.random_sign:
        if key is None:
            raise ValueError("ep_gradient: random_sign=True needs a PRNG key.")
        beta = jnp.where(jax.random.bernoulli(key), beta, -beta)
    sol_a = _nudged(params, x, y, s_star, beta, config, None)
    s_a, nudged_res = sol_a.z, sol_a.residual
    if estimator == "symmetric":
        sol_b = _nudged(params, x, y, s_star, -beta, config, None)
        s_b, beta_b, denom = sol_b.z, -beta, 2.0 * beta
        nudged_res = jnp.maximum(nudged_res, sol_b.residual)
    else:
        s_b, beta_b, denom = s_star, jnp.zeros_like(beta), beta

    def contrast(p: Params) -> Array:
        phi_a = energy.Phi(p, x, s_a, config=cfg, beta=beta, y=y)
        phi_b = energy.Phi(p, x, s_b, config=cfg, beta=beta_b, y=y)
        return (jnp.mean(phi_b) - jnp.mean(phi_a)) / denom

    grads = jax.grad(contrast)(params)
    logits = energy.readout(params, s_star, cfg)
    aux = EPAux(
        loss=energy.loss(params, s_star, y, cfg),
        correct=jnp.argmax(logits, -1) == y,
        residual=sol.residual,
        beta=beta,
        nudged_residual=nudged_res,
    )
    return grads, aux


# --------------------------------------------------------------------------- prediction


def predict(params: Params, x: ArrayLike, config: EPConfig, *, steps: int | None = None) -> Array:
    """Class scores [B, K] after the free phase (t1 steps by default); not differentiable (use
    `classifier` for attack gradients)."""
    sol = free_phase(params, x, config, steps=steps)
    return energy.readout(params, sol.z, config.energy)


def logits_fn(params: Params, x: ArrayLike, config: EPConfig) -> Array:
    """Alias of `predict` with the configured free phase."""
    return predict(params, x, config)


def trajectory(
    params: Params, x: ArrayLike, config: EPConfig, *, steps: int | None = None
) -> Array:
    """Readout at every free-phase step: [T, B, K], entry t = after t+1 steps (T = t1 default).

    Memory grows with T x B x (state size); call it on modest batches.
    """
    t = config.t1 if steps is None else steps
    sol = free_phase(params, x, config, steps=t, record=t, stop="never")
    return jax.vmap(lambda z: energy.readout(params, z, config.energy))(sol.trajectory.z)


def loss_at_fixed_point(
    params: Params, x: ArrayLike, y: ArrayLike, config: EPConfig, *, grad: str = "implicit"
) -> Array:
    """Mean loss at the free fixed point, differentiable by the engine's `grad` mode (the quantity
    the EP gradient estimates)."""
    sol = free_phase(params, x, config, grad=grad)
    return jnp.mean(energy.loss(params, sol.z, jnp.asarray(y), config.energy))


@functools.lru_cache(maxsize=64)
def _logits_program(cfg: EPConfig, path: GradientPath):
    """(params, x) -> logits for one gradient path; one function object per (config, path), so
    classifiers differing only in their parameters share compiled attacks."""
    if path.kind == "implicit" or (path.kind == "unrolled" and path.depth == cfg.t1):
        # The gradient of the prediction itself: BPTT through its t1 steps, or the IFT.

        def logits(params: Params, x: Array) -> Array:
            sol = free_phase(params, x, cfg, grad=path.kind)
            return energy.readout(params, sol.z, cfg.energy)

        return logits

    def logits_surrogate(params: Params, x: Array) -> Array:
        # Forward value: the t1-step prediction; gradient: `path` (e.g. BPTT through fewer steps
        # from zero state, the AdvEP attack), as value + (surrogate - stop_gradient(surrogate)).
        value = jax.lax.stop_gradient(predict(params, x, cfg))
        if path.kind == "unrolled":
            sol = free_phase(params, x, cfg, steps=path.depth, stop="never", grad="unrolled")
        else:  # phantom: damped steps from the detached fixed point
            sol = free_phase(params, x, cfg, grad="phantom", grad_steps=path.depth)
        lt = energy.readout(params, sol.z, cfg.energy)
        return value + (lt - jax.lax.stop_gradient(lt))

    return logits_surrogate


@functools.lru_cache(maxsize=64)
def _trajectory_program(cfg: EPConfig):
    return lambda params, x: trajectory(params, x, cfg)


def residual(params: Params, x: ArrayLike, config: EPConfig) -> Array:
    """[B] relative residual ||F(s) - s|| / ||F(s)|| of the free-phase state s that `predict`
    reads out, F the free update map (how far the prediction is from a fixed point)."""
    sol = free_phase(params, x, config)
    free = _free_map(config.energy, config.update)
    fs = free(sol.z, (params, jnp.asarray(x).astype(params[0].w.dtype)))
    num = sum(jnp.sum(jnp.square(a - b).reshape(a.shape[0], -1), 1) for a, b in zip(fs, sol.z))
    den = sum(jnp.sum(jnp.square(a).reshape(a.shape[0], -1), 1) for a in fs)
    return jnp.sqrt(num) / (jnp.sqrt(den) + 1e-12)


@functools.lru_cache(maxsize=64)
def _residual_program(cfg: EPConfig):
    return lambda params, x: residual(params, x, cfg)


def classifier(
    params: Params,
    ep_config: EPConfig,
    *,
    gradient: GradientPath | None = None,
    name: str = "ep_cnn",
) -> Classifier:
    """An `eqrobust.classifier.Classifier` for attacks and evaluation.

    The forward value is always the t1-step prediction. The input gradient comes from `gradient`:
      GradientPath("unrolled", t1) (default): autodiff (BPTT) through the same t1 steps that make
          the prediction, i.e. the exact gradient;
      GradientPath("unrolled", t), t != t1: t steps from zero state (the AdvEP attack), flagged as
          a depth mismatch;
      GradientPath("implicit"): implicit function theorem at the t1-step state;
      GradientPath("phantom", k): k damped steps from the detached t1-step state.

    Args:
      params: `Params`.
      ep_config: `EPConfig` (t1 = prediction depth).
      gradient: the attack-gradient path (default: exact BPTT through t1 steps).
      name: classifier name.

    Returns:
      `Classifier` with logits_fn, trajectory_fn and the depth/gradient metadata.
    """
    cfg = ep_config
    path = GradientPath("unrolled", cfg.t1) if gradient is None else gradient
    if not isinstance(path, GradientPath):
        raise ValueError(
            f"gradient must be an eqrobust.classifier.GradientPath, got {gradient!r}; e.g. "
            "GradientPath('unrolled', 29) for AdvEP's 29-step attack gradient"
        )
    fn = _logits_program(cfg, path)
    return Classifier(
        logits_fn=jax.tree_util.Partial(fn, params),  # params traced in the attacks' programs
        name=f"{name}[T={cfg.t1},grad={path}]",
        trajectory_fn=jax.tree_util.Partial(_trajectory_program(cfg), params),
        prediction_depth=cfg.t1,
        gradient=path,
        residual_fn=jax.tree_util.Partial(_residual_program(cfg), params),
    )


@functools.lru_cache(maxsize=32)
def _ep_fns(cfg: EPConfig):
    step = energy.UPDATES[cfg.update]

    def inject(params, x):  # EP's input enters the first layer's energy term directly
        return x

    def f(params, z, a):
        return step(params, a, z, config=cfg.energy)

    def readout(params, z):
        return energy.readout(params, z, cfg.energy)

    def trajectory(params, x):
        sol = free_phase(params, x, cfg, record=cfg.t1, stop="never")
        return jax.lax.stop_gradient(sol.trajectory.z)

    def init(params, x):
        return energy.zero_states(cfg.energy, x.shape[0], params[0].w.dtype)

    def predict_trajectory(params, x):  # one free phase: the t1-step logits and z_1..z_t1
        sol = free_phase(params, x, cfg, record=cfg.t1, stop="never")
        logits = energy.readout(params, sol.z, cfg.energy)
        return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(sol.trajectory.z)

    return inject, f, readout, trajectory, init, predict_trajectory


def ep_dynamics(params: Params, config: EPConfig, *, predict: Callable | None = None) -> Dynamics:
    """The `Dynamics` of an EP-CNN's free phase: z_1..z_T (T = config.t1) of its update map.

    The unrolled-intermediate attacks then apply one free-phase update to the detached state z_i
    and K damped ones, with the input gradient through the update's dependence on x (no published
    study attacked EP this way). `num_states` is T; pass `states=` to the grid to attack a subset.

    Args:
        params: EP `Params`.
        config: `eqrobust.ep.EPConfig`.
        predict: the real prediction (default: the t1-step free phase, `ep.classifier`'s logits).

    Returns:
        Dynamics with tol = config.free_tol (used only by the adjoint's Broyden); with the
        default predict and `free_stop="never"`, `predict_trajectory` gives both from one phase.
    """
    inject, f, readout, trajectory, init, joint = _ep_fns(config)
    shared = predict is None and config.free_stop == "never"
    if predict is None:
        predict = classifier(params, config).logits_fn
    return Dynamics(
        inject=jax.tree_util.Partial(inject, params),
        f=jax.tree_util.Partial(f, params),
        readout=jax.tree_util.Partial(readout, params),
        trajectory=jax.tree_util.Partial(trajectory, params),
        init=jax.tree_util.Partial(init, params),
        predict=predict,
        num_states=int(config.t1),
        tol=float(config.free_tol or 1e-3),
        predict_trajectory=jax.tree_util.Partial(joint, params) if shared else None,
    )
