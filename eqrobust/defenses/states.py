"""Early-state and ensemble-state defences: predictions read from the DEQ's solver trajectory."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from eqrobust import solvers
from eqrobust.attacks import _common as C
from eqrobust.attacks import pgd
from eqrobust.classifier import Classifier, GradientPath
from eqrobust.models.deq import deq_compiler_options

ENSEMBLE_AVERAGES = ("softmax", "state")


def merged_eval(graphdef: nnx.GraphDef, state: nnx.State) -> Any:
    """The module of (graphdef, state) in eval mode (a copy: the caller's model is untouched)."""
    m = nnx.merge(graphdef, state, copy=True)
    m.eval()
    return m


def unrolled_trajectory(m: Any, x: jax.Array) -> list:
    """Solver iterates z_1..z_N of a DEQNet, differentiable w.r.t. x (BPTT through the steps).

    The same iterates as `DEQNet.equilibrium(record=True)` (same solver, memory = N: no restart),
    but with `grad="unrolled"`, so a readout of z_i has the exact input gradient of its value.

    Args:
        m: a DEQNet in eval mode.
        x: [B, H, W, C] in [0, 1].

    Returns:
        list of branch states, each [N, B, H_i, W_i, C_i].
    """
    sp = m.solver
    f, cstate = m.cell_fn()
    inj = m.inject(x)
    z0 = m.zeros(x.shape[0], inj.dtype)
    opts: dict = {"memory": sp.f_max_iter} if sp.f_solver == "broyden" else {}
    sol = solvers.solve(
        f,
        z0,
        (cstate, inj, None),
        method=sp.f_solver,
        max_steps=sp.f_max_iter,
        tol=sp.f_tol,
        record=sp.f_max_iter,
        grad="unrolled",
        remat=True,
        lowest=sp.lowest,
        **opts,
    )
    return sol.trajectory.z


def readout_all(m: Any, zs: list) -> jax.Array:
    """Readout of stacked states (leaves [N, B, ...]) -> logits [N, B, K]."""
    n, b = zs[0].shape[:2]
    return m.readout([a.reshape(n * b, *a.shape[2:]) for a in zs]).reshape(n, b, -1)


def ensemble_logits(traj_logits: jax.Array) -> jax.Array:
    """[N, B, K] per-state logits -> [B, K] log of the mean of the per-state softmaxes.

    softmax of the result is exactly mean_n softmax(logits_n) (the ensemble prediction).
    """
    n = traj_logits.shape[0]
    return jax.nn.logsumexp(jax.nn.log_softmax(traj_logits, axis=-1), axis=0) - jnp.log(n)


@functools.lru_cache(maxsize=32)
def _programs(graphdef: nnx.GraphDef) -> dict:
    def trajectory(state: nnx.State, x: jax.Array) -> jax.Array:  # [N, B, K]
        m = merged_eval(graphdef, state)
        return readout_all(m, unrolled_trajectory(m, x))

    def early(sa: tuple, x: jax.Array) -> jax.Array:  # [B, K]
        state, index = sa
        m = merged_eval(graphdef, state)
        zs = unrolled_trajectory(m, x)
        return m.readout([lax.dynamic_index_in_dim(a, index - 1, 0, keepdims=False) for a in zs])

    def ensemble_softmax(state: nnx.State, x: jax.Array) -> jax.Array:
        return ensemble_logits(trajectory(state, x))

    def ensemble_state(state: nnx.State, x: jax.Array) -> jax.Array:
        m = merged_eval(graphdef, state)
        return m.readout([jnp.mean(a, axis=0) for a in unrolled_trajectory(m, x)])

    return {
        "trajectory": trajectory,
        "early": early,
        "softmax": ensemble_softmax,
        "state": ensemble_state,
    }


def _traj_early(ta: tuple, x: jax.Array) -> jax.Array:
    traj_fn, index = ta
    return lax.dynamic_index_in_dim(traj_fn(x), index - 1, 0, keepdims=False)


def _traj_ensemble(traj_fn: Any, x: jax.Array) -> jax.Array:
    return ensemble_logits(traj_fn(x))


def num_states(model_or_classifier: Any, x_like: jax.Array | None = None) -> int:
    """N, the number of recorded solver states of a DEQNet or a Classifier with trajectory_fn."""
    if isinstance(model_or_classifier, Classifier):
        c = model_or_classifier
        if c.trajectory_fn is None:
            raise ValueError(f"classifier {c.name!r} has no trajectory_fn: no states to read out")
        if c.prediction_depth is not None:
            return int(c.prediction_depth)
        if x_like is None:
            raise ValueError("num_states of a classifier without prediction_depth needs x_like")
        return int(jax.eval_shape(c.trajectory_fn, x_like[:1]).shape[0])
    return int(model_or_classifier.solver.f_max_iter)


def early_state(model_or_classifier: Any, index: int, *, name: str | None = None) -> Classifier:
    """The early-state defence: predict with the readout of the solver iterate z_index.

    Args:
        model_or_classifier: a DEQNet (preferred: the returned logits_fn is differentiated by
            BPTT through the index solver steps, i.e. the exact gradient of the prediction), or a
            Classifier with trajectory_fn (then the gradient is whatever trajectory_fn gives; for
            `deq_classifier` that is zero, so attack the model form instead).
        index: 1-based state index i in 1..N (z_i after i solver steps).
        name: display name (default "<name>@z<i>").

    Returns:
        Classifier, logits_fn: x [B, H, W, C] -> readout(z_i) [B, K] (eval mode).
    """
    n = num_states(model_or_classifier)
    if not (isinstance(index, int | np.integer) and 1 <= int(index) <= n):
        raise ValueError(f"early_state: index must be an int in 1..{n} (z_1..z_N), got {index!r}")
    idx = jnp.asarray(int(index), jnp.int32)
    if isinstance(model_or_classifier, Classifier):
        c = model_or_classifier
        return Classifier(
            logits_fn=jax.tree_util.Partial(_traj_early, (C.as_pytree_fn(c.trajectory_fn), idx)),
            name=name or f"{c.name}@z{int(index)}",
            prediction_depth=int(index),
            gradient=None,
            compiler_options=c.compiler_options,
        )
    graphdef, state = nnx.split(model_or_classifier)
    return Classifier(
        logits_fn=jax.tree_util.Partial(_programs(graphdef)["early"], (state, idx)),
        name=name or f"DEQ@z{int(index)}",
        prediction_depth=int(index),
        gradient=GradientPath("unrolled", int(index)),
        compiler_options=deq_compiler_options(),
    )


def ensemble_state(
    model_or_classifier: Any, *, average: str = "softmax", name: str | None = None
) -> Classifier:
    """The ensemble-state defence over z_1..z_N.

    Args:
        model_or_classifier: a DEQNet (gradient: BPTT through all N solver steps) or a Classifier
            with trajectory_fn (average="softmax" only).
        average: "softmax" (the reference code: average of the N states' softmax predictions;
            logits_fn returns log of that average, so its softmax is the ensemble prediction) or
            "state" (the paper's wording: average z_n, then one readout).
        name: display name.

    Returns:
        Classifier with logits_fn x [B, H, W, C] -> [B, K] and trajectory_fn [N, B, K].
    """
    if average not in ENSEMBLE_AVERAGES:
        raise ValueError(f"ensemble_state: average must be one of {ENSEMBLE_AVERAGES}")
    if isinstance(model_or_classifier, Classifier):
        c = model_or_classifier
        if average != "softmax" or c.trajectory_fn is None:
            raise ValueError(
                "ensemble_state of a Classifier needs its trajectory_fn and average='softmax'; "
                "pass the DEQNet for average='state'"
            )
        tf = C.as_pytree_fn(c.trajectory_fn)
        return Classifier(
            logits_fn=jax.tree_util.Partial(_traj_ensemble, tf),
            name=name or f"{c.name}+ensemble",
            trajectory_fn=tf,
            prediction_depth=c.prediction_depth,
            gradient=None,
            compiler_options=c.compiler_options,
        )
    graphdef, state = nnx.split(model_or_classifier)
    progs = _programs(graphdef)
    n = num_states(model_or_classifier)
    return Classifier(
        logits_fn=jax.tree_util.Partial(progs[average], state),
        name=name or f"DEQ+ensemble({average})",
        trajectory_fn=jax.tree_util.Partial(progs["trajectory"], state),
        prediction_depth=n,
        gradient=GradientPath("unrolled", n),
        compiler_options=deq_compiler_options(),
    )


class EarlyStateSelection(NamedTuple):
    """Result of `select_early_state`.

    Attributes:
        index: the chosen 1-based state index.
        classifier: `early_state(model, index)`, fixed from now on.
        robust_accuracy: [N] PGD accuracy of each state's classifier on the validation split.
        clean_accuracy: [N] clean accuracy of each state's classifier.
    """

    index: int
    classifier: Classifier
    robust_accuracy: np.ndarray
    clean_accuracy: np.ndarray


def _accuracy(logits_fn: Any, x: jax.Array, y: jax.Array) -> float:
    return float(jnp.mean(jnp.argmax(C.logits(logits_fn, x), -1) == y))


def select_early_state(
    model_or_classifier: Any,
    x_val: jax.Array,
    y_val: jax.Array,
    *,
    key: jax.Array,
    eps: float = 8 / 255,
    step_size: float = 2 / 255,
    steps: int = 10,
    norm: str = "linf",
    random_start: bool = True,
) -> EarlyStateSelection:
    """Pick the state whose own classifier is most robust to PGD on a validation split.

    Each z_i's early-state classifier is attacked with PGD (default PGD-10, Linf 8/255, step
    2/255, as the DEQ papers) through its own gradient; the index with the best robust accuracy
    (ties: better clean accuracy, then the earlier state) is returned and then kept fixed.

    Args:
        model_or_classifier: see `early_state`.
        x_val: [B, H, W, C] validation images in [0, 1] (not the test set).
        y_val: [B] int labels.
        key: PRNG key of the random starts (the same key for every state).
        eps, step_size, steps, norm, random_start: the PGD settings.

    Returns:
        EarlyStateSelection.
    """
    n = num_states(model_or_classifier, x_val)
    rob, clean = np.zeros(n), np.zeros(n)
    for i in range(1, n + 1):
        c = early_state(model_or_classifier, i)
        res = pgd(
            c.logits_fn,
            x_val,
            y_val,
            key=key,
            eps=eps,
            norm=norm,
            steps=steps,
            step_size=step_size,
            random_start=random_start,
        )
        rob[i - 1] = _accuracy(c.logits_fn, res.x_adv, y_val)
        clean[i - 1] = _accuracy(c.logits_fn, x_val, y_val)
    order = np.lexsort((np.arange(n), -clean, -rob))  # rob desc, clean desc, index asc
    best = int(order[0]) + 1
    return EarlyStateSelection(best, early_state(model_or_classifier, best), rob, clean)
