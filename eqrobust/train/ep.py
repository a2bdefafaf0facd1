"""EP training of the EP-CNN: symmetric-nudging gradient, layer-wise SGD, shared fit loop."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax

from eqrobust import data as data_lib
from eqrobust import ep
from eqrobust.energy import Layer, Params
from eqrobust.train import Trained
from eqrobust.train.loop import fit, make_schedule
from eqrobust.train.supervised import load_data

# config.model fields that are not EPConfig / EnergyConfig fields.
_MODEL_EXTRA = ("name", "init_scale", "std_scale", "compute_dtype")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_ep_config(config: ml_collections.ConfigDict, data: data_lib.Dataset) -> ep.EPConfig:
    """The `EPConfig` of config.model for this dataset (shape, classes, and normalisation).

    mean/std come from config.model.mean/std when set, else from the training set; both are then
    multiplied by nothing / config.model.std_scale (the CIFAR-10 reference uses 3 x std).
    """
    m = dict(config.model)
    mean = m.get("mean") or tuple(float(v) for v in data.mean)
    std = m.get("std") or tuple(float(v) for v in data.std)
    std = tuple(float(s) * float(m.get("std_scale", 1.0) or 1.0) for s in std)
    fields = {k: v for k, v in m.items() if k not in _MODEL_EXTRA and k not in ("mean", "std")}
    if "update_order" in fields:  # the config's name for EPConfig.update (see configs/ep_cnn.py)
        fields["update"] = fields.pop("update_order")
    for k in ("solver_options", "implicit_options"):
        if k in fields and fields[k] is not None:
            fields[k] = dict(fields[k])
        elif k in fields:
            del fields[k]
    fields.update(
        in_shape=data.image_shape,
        num_classes=data.num_classes,
        mean=tuple(float(v) for v in mean),
        std=std,
    )
    return ep.config_from_dict(fields)


def make_optimizer(
    opt_config: ml_collections.ConfigDict, params: Params, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, list[optax.Schedule]]:
    """Layer-wise SGD (momentum, coupled weight decay, per-layer schedule), PyTorch semantics.

    opt_config.lrs: one initial learning rate per synapse layer (conv..., fc..., readout); every
    layer follows make_schedule (e.g. cosine annealing to lr_min) from its own initial rate.
    """
    lrs = tuple(opt_config.lrs)
    if len(lrs) != len(params):
        raise ValueError(
            f"optimizer.lrs has {len(lrs)} entries but the EP network has {len(params)} synapse "
            "layers (conv..., fc..., readout); give one learning rate per layer."
        )
    wd = float(opt_config.get("weight_decay", 0.0))
    momentum = float(opt_config.get("momentum", 0.0)) or None
    schedules, transforms = [], {}
    for i, lr in enumerate(lrs):
        oc = ml_collections.ConfigDict(opt_config.to_dict())
        oc.lr = float(lr)
        sched = make_schedule(oc, steps_per_epoch)
        schedules.append(sched)
        transforms[f"layer{i}"] = optax.chain(
            optax.add_decayed_weights(wd), optax.sgd(sched, momentum=momentum)
        )
    labels = tuple(Layer(f"layer{i}", f"layer{i}") for i in range(len(params)))
    return optax.multi_transform(transforms, labels), schedules


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path | None,
    *,
    stop_at_step: int | None = None,
) -> Trained:
    """Trains (or resumes, or loads if finished) the EP-CNN of `config` with EP.

    Args:
      config: see eqrobust/configs/ep_cnn.py.
      workdir: checkpoints and metrics.jsonl go here (None: nothing saved).
      stop_at_step: stop early at this step as if interrupted.

    Returns:
      `Trained` whose classifier predicts with the t1-step free phase and whose attack gradient
      is exact BPTT through those same steps.
    """
    ds = load_data(config)
    cfg = build_ep_config(config, ds)
    dtype_name = config.model.get("compute_dtype", "float32") or "float32"
    if dtype_name not in COMPUTE_DTYPES:
        raise ValueError(
            f"model.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}; got {dtype_name!r}"
        )
    compute_dtype = COMPUTE_DTYPES[dtype_name]
    params = ep.init(
        jax.random.PRNGKey(int(config.seed)),
        cfg,
        scale=float(config.model.get("init_scale", 1.0) or 1.0),
    )
    steps_per_epoch = len(ds.x_train) // int(config.batch_size)
    tx, schedules = make_optimizer(config.optimizer, params, steps_per_epoch)
    init_state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    def eval_logits(state: dict, x: jax.Array) -> jax.Array:
        return ep.predict(state["params"], x, cfg)

    def train_step(state: dict, x: jax.Array, y: jax.Array, key: jax.Array):
        # Phases and EP gradient in the compute dtype (bfloat16: 1.6x TF32 on an H100, BUILD_NOTES
        # "Paper scale on one GPU"); float32 master weights and optimizer state.
        p = jax.tree.map(lambda a: a.astype(compute_dtype), state["params"])
        grads, aux = ep.ep_gradient(p, x.astype(compute_dtype), y, cfg, key=key)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": jnp.mean(aux.loss),
            "accuracy": jnp.mean(aux.correct),
            "free_residual": jnp.mean(aux.residual),
            "nudged_residual": jnp.mean(aux.nudged_residual),
            "lr0": schedules[0](state["step"]),
        }
        return {"params": params, "opt": opt, "step": state["step"] + 1}, metrics

    result = fit(
        config=config,
        workdir=workdir,
        data=ds,
        init_state=init_state,
        train_step=train_step,
        eval_logits=eval_logits,
        stop_at_step=stop_at_step,
    )
    params = result.state["params"]
    clf = ep.classifier(params, cfg, name=config.get("name", "EP-CNN"))
    return Trained(clf, result.state, result.history, config)
