"""Attractor distillation (ep-distillation eqs. 8-9): a feedforward student mimics an EP-CNN's
fixed points (full state) or only its prediction (last layer)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from eqrobust import compile_options, energy, ep
from eqrobust import data as data_lib
from eqrobust.energy import Params
from eqrobust.models import Classifier, build_model, logits_fn
from eqrobust.train import Trained, get_trainer
from eqrobust.train.ep import build_ep_config
from eqrobust.train.loop import fit, make_optimizer
from eqrobust.train.supervised import build_optimizer, load_data

LOSSES = ("full_state", "last_layer")
CE_TARGETS = ("teacher", "teacher_hard", "labels")
EVAL_FILE = "distill_eval.json"


class Teacher(NamedTuple):
    """A trained EP-CNN: its parameters, `EPConfig` and the `Trained` record it came from."""

    params: Params
    cfg: ep.EPConfig
    trained: Trained


def load_teacher(config: ml_collections.ConfigDict) -> Teacher:
    """Train-or-load the teacher named by config.teacher (an EP-CNN config) and
    config.teacher_workdir; a finished teacher run is only loaded."""
    tc = config.teacher
    if tc.trainer != "ep":
        raise ValueError(
            f"the distillation teacher must be an EP model (trainer 'ep'), got {tc.trainer!r}"
        )
    if config.get("teacher_workdir", None) is None:
        raise ValueError("config.teacher_workdir is required: where the teacher run is (or goes)")
    trained = get_trainer("ep")(tc, config.teacher_workdir)
    cfg = build_ep_config(tc, load_data(tc))
    return Teacher(trained.state["params"], cfg, trained)


def teacher_targets(params: Params, cfg: ep.EPConfig, x: jax.Array) -> tuple[tuple, jax.Array]:
    """The teacher's free-phase fixed point (t1 steps from zeros, as it predicts) and its logits.

    Args:
        params, cfg: the EP-CNN.
        x: [B, H, W, C] in [0, 1].

    Returns:
        (states s*_l per neuron layer, logits [B, K]); constants for differentiation.
    """
    sol = ep.free_phase(params, x, cfg)
    z = jax.lax.stop_gradient(sol.z)
    return z, jax.lax.stop_gradient(energy.readout(params, z, cfg.energy))


def state_mses(student: tuple, teacher: tuple) -> jax.Array:
    """Per-layer mean squared error between matching states: [L] (PyTorch MSELoss, mean)."""
    if len(student) != len(teacher):
        raise ValueError(
            f"the student has {len(student)} hidden layers but the teacher has {len(teacher)}; "
            "the full-state loss needs the EP-CNN's layer layout (model 'ep_student')"
        )
    return jnp.stack([jnp.mean((s - t) ** 2) for s, t in zip(student, teacher, strict=True)])


def distill_loss(
    student_states: tuple,
    student_logits: jax.Array,
    teacher_states: tuple,
    teacher_logits: jax.Array,
    y: jax.Array,
    *,
    loss: str = "full_state",
    ce_target: str = "teacher",
    state_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Distillation loss: eq. 8 ("full_state") sum_l MSE(s*_l, s~_l) + CE(s*_N, y~), or eq. 9
    ("last_layer") CE(s*_N, y~) alone.

    CE(s*_N, y~) is the cross-entropy of the student's softmax against the teacher's output: its
    softmax (ce_target "teacher"), its argmax ("teacher_hard") or the labels ("labels").

    Args:
        student_states, teacher_states: hidden states per layer, [B, ...] each (may be empty for
            "last_layer").
        student_logits, teacher_logits: [B, K].
        y: [B] int labels (only for ce_target "labels").
        loss: "full_state" or "last_layer".
        ce_target: see above.
        state_weight: multiplies the state term.

    Returns:
        (scalar loss, {"ce": scalar, "mse": [L] per-layer MSEs (zeros if not computed)}).
    """
    if loss not in LOSSES or ce_target not in CE_TARGETS:
        raise ValueError(f"loss must be in {LOSSES} and ce_target in {CE_TARGETS}")
    logp = jax.nn.log_softmax(student_logits, axis=-1)
    k = student_logits.shape[-1]
    if ce_target == "teacher":
        target = jax.nn.softmax(teacher_logits, axis=-1)
    elif ce_target == "teacher_hard":
        target = jax.nn.one_hot(jnp.argmax(teacher_logits, -1), k, dtype=logp.dtype)
    else:
        target = jax.nn.one_hot(y, k, dtype=logp.dtype)
    ce = -jnp.mean(jnp.sum(target * logp, axis=-1))
    if student_states:
        mse = state_mses(student_states, teacher_states)
    else:
        mse = jnp.zeros((len(teacher_states),), logp.dtype)
    total = ce + state_weight * jnp.sum(mse) if loss == "full_state" else ce
    return total, {"ce": ce, "mse": mse}


def student_forward(model: nnx.Module, x: jax.Array) -> tuple[tuple, jax.Array]:
    """(hidden states, logits) of a student; states are () for models without a `states` method."""
    if hasattr(model, "states"):
        return model.states(x)
    return (), model(x)


def _layer_label(path: tuple, _: Any) -> str:
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "idx", None))
        if isinstance(key, int):
            return f"layer{key}"
    raise ValueError(f"cannot find a layer index in parameter path {jax.tree_util.keystr(path)}")


def layerwise_optimizer(
    opt_config: ml_collections.ConfigDict, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD per layer (`loop.make_optimizer` with lr = opt_config.lrs[i]) for the layer-indexed
    parameters of `EPStudent` (ws[i], bs[i]); returns the transform and layer 0's schedule."""
    transforms, schedules = {}, []
    for i, lr in enumerate(opt_config.lrs):
        oc = ml_collections.ConfigDict(opt_config.to_dict())
        oc.lr = float(lr)
        transforms[f"layer{i}"], sched = make_optimizer(oc, steps_per_epoch)
        schedules.append(sched)
    labels = lambda params: jax.tree_util.tree_map_with_path(_layer_label, params)  # noqa: E731
    return optax.multi_transform(transforms, labels), schedules[0]


def compare_with_teacher(
    student_fn: Callable[[jax.Array], tuple[tuple, jax.Array]],
    teacher: Teacher,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 500,
) -> dict[str, float]:
    """Student vs teacher on uint8 images x [N, H, W, C], labels y [N].

    Args:
        student_fn: x float [B, H, W, C] -> (hidden states, logits), eval mode.
        teacher: the EP-CNN.

    Returns:
        test_accuracy, teacher_test_accuracy, test_agreement (same argmax), and per hidden layer
        test_state_mse_l{i} (mean over examples and units) when the student has states.
    """

    @compile_options.jit
    def batch_stats(xb: jax.Array, yb: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
        s_states, s_logits = student_fn(xb)
        t_states, t_logits = teacher_targets(teacher.params, teacher.cfg, xb)
        ps, pt = jnp.argmax(s_logits, -1), jnp.argmax(t_logits, -1)
        out = {
            "test_accuracy": jnp.sum(valid * (ps == yb)),
            "teacher_test_accuracy": jnp.sum(valid * (pt == yb)),
            "test_agreement": jnp.sum(valid * (ps == pt)),
        }
        for i, (s, t) in enumerate(zip(s_states, t_states)):
            per_ex = jnp.mean((s - t).reshape(s.shape[0], -1) ** 2, axis=-1)
            out[f"test_state_mse_l{i}"] = jnp.sum(valid * per_ex)
        return out

    sums: dict[str, float] = {}
    for i in range(0, len(x), batch_size):
        xb, yb = data_lib.to_float(x[i : i + batch_size]), jnp.asarray(y[i : i + batch_size])
        n = xb.shape[0]
        pad = batch_size - n if len(x) > batch_size else 0
        xb = jnp.concatenate([xb, jnp.zeros((pad, *xb.shape[1:]), xb.dtype)])
        yb = jnp.concatenate([yb, jnp.zeros((pad,), yb.dtype)])
        valid = (jnp.arange(xb.shape[0]) < n).astype(jnp.float32)
        for k, v in jax.device_get(batch_stats(xb, yb, valid)).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {k: v / len(x) for k, v in sums.items()}


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path | None,
    *,
    stop_at_step: int | None = None,
) -> Trained:
    """Distils a trained EP-CNN (train-or-load through `config.teacher`/`teacher_workdir`) into
    the student `config.model` (any registered model; "ep_student" for the full-state loss).

    The teacher's fixed point is computed on the fly inside the jitted step, on the augmented
    batch the student sees. metrics.jsonl (through `fit`) records per epoch the test accuracy and
    the training-batch averages of loss, ce, mse_l{i} (per-layer state MSE to the teacher) and
    agreement (same prediction as the teacher). After training, the test-set comparison
    (`compare_with_teacher`) is written to workdir/distill_eval.json and appended to the history.

    Args:
        config: see eqrobust/configs/distill.py (distill.loss, distill.ce_target,
            distill.state_weight, optimizer.lrs for layer-wise SGD).
        workdir: checkpoints and metrics go here (None: nothing saved).
        stop_at_step: stop early at this step as if interrupted.
    """
    if config.dataset != config.teacher.dataset:
        raise ValueError(
            f"student dataset {config.dataset!r} differs from the teacher's "
            f"{config.teacher.dataset!r}"
        )
    ds = load_data(config)
    model = build_model(config, ds)
    d = config.distill
    if d.loss == "full_state" and not hasattr(model, "states"):
        raise ValueError(
            "loss 'full_state' needs a model with states (e.g. 'ep_student'), "
            f"got {config.model.name!r}"
        )
    teacher = load_teacher(config)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    spe = len(ds.x_train) // int(config.batch_size)
    if config.optimizer.get("lrs", None):
        tx, schedule = layerwise_optimizer(config.optimizer, spe)
    else:
        tx, schedule = build_optimizer(config, spe)
    init_state = {"params": params, "rest": rest, "opt": tx.init(params)}

    def apply(params: Any, rest: Any, x: jax.Array, *, train: bool):
        m = nnx.merge(graphdef, params, rest, copy=True)
        m.train() if train else m.eval()
        states, logits = student_forward(m, x)
        return states, logits, nnx.state(m, nnx.Not(nnx.Param))

    def eval_logits(state: dict, x: jax.Array) -> jax.Array:
        return apply(state["params"], state["rest"], x, train=False)[1]

    def train_step(state: dict, x: jax.Array, y: jax.Array, key: jax.Array):
        del key
        t_states, t_logits = teacher_targets(teacher.params, teacher.cfg, x)

        def loss_fn(params: Any):
            s_states, logits, rest = apply(params, state["rest"], x, train=True)
            loss, parts = distill_loss(
                s_states, logits, t_states, t_logits, y,
                loss=d.loss, ce_target=d.ce_target, state_weight=float(d.state_weight),
            )  # fmt: skip
            return loss, (logits, parts, rest)

        (loss, (logits, parts, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"]
        )
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        pred = jnp.argmax(logits, -1)
        metrics = {
            "loss": loss,
            "ce": parts["ce"],
            "accuracy": jnp.mean(pred == y),
            "agreement": jnp.mean(pred == jnp.argmax(t_logits, -1)),
            "teacher_accuracy": jnp.mean(jnp.argmax(t_logits, -1) == y),
            "lr": schedule(optax.tree_utils.tree_get_all_with_path(state["opt"], "count")[0][1]),
        }
        if hasattr(model, "states"):
            metrics.update({f"mse_l{i}": v for i, v in enumerate(parts["mse"])})
        return {"params": params, "rest": rest, "opt": opt}, metrics

    result = fit(
        config=config,
        workdir=workdir,
        data=ds,
        init_state=init_state,
        train_step=train_step,
        eval_logits=eval_logits,
        stop_at_step=stop_at_step,
    )
    nnx.update(model, result.state["params"], result.state["rest"])
    history = list(result.history)
    if stop_at_step is None or result.step >= stop_at_step:
        history.append({"step": result.step, **_final_eval(config, workdir, model, teacher, ds)})
    clf = Classifier(logits_fn=logits_fn(model), name=config.get("name", "Distilled BP-CNN"))
    return Trained(clf, result.state, history, config)


def _final_eval(
    config: ml_collections.ConfigDict,
    workdir: str | Path | None,
    model: nnx.Module,
    teacher: Teacher,
    ds: data_lib.Dataset,
) -> dict[str, float]:
    """The test-set comparison with the teacher, cached in workdir/distill_eval.json."""
    path = Path(workdir) / EVAL_FILE if workdir is not None else None
    if path is not None and path.exists():
        return json.loads(path.read_text())
    graphdef, state = nnx.split(model)

    def student_fn(x: jax.Array) -> tuple[tuple, jax.Array]:
        m = nnx.merge(graphdef, state, copy=True)
        m.eval()
        return student_forward(m, x)

    row = compare_with_teacher(
        student_fn,
        teacher,
        ds.x_test,
        ds.y_test,
        batch_size=int(config.get("eval_batch_size", 500)),
    )
    if path is not None:
        path.write_text(json.dumps(row, indent=1))
    return row
