"""Supervised (cross-entropy) training of NNX classifiers, with an optional adversary hook."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from eqrobust import data as data_lib
from eqrobust.autoaugment import autoaugment
from eqrobust.models import Classifier, build_model, logits_fn
from eqrobust.train import Trained
from eqrobust.train.loop import fit, make_optimizer

# perturb(logits_fn, x, y, key) -> x_adv, run inside the jitted step (adversarial training).
Perturb = Callable[[Callable[[jax.Array], jax.Array], jax.Array, jax.Array, jax.Array], jax.Array]


def load_data(config: ml_collections.ConfigDict) -> data_lib.Dataset:
    """The dataset named by config.dataset, subset by config.num_train / num_test if set."""
    kwargs = dict(config.get("dataset_options", {}) or {})
    ds = data_lib.load(config.dataset, data_dir=config.get("data_dir", None), **kwargs)
    return ds.subset(config.get("num_train", None), config.get("num_test", None))


def cross_entropy(logits: jax.Array, y: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy; logits [B, K], y [B] int; optional label smoothing."""
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    target = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, target).mean()


def build_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """config.optimizer.name "sgd" (default): `loop.make_optimizer`. "adam": Adam with coupled
    weight decay (PyTorch `Adam(weight_decay=...)`), b1/b2, and a per-step schedule: linear warmup
    over `warmup_epochs` from 0, then cosine to `lr_min` at the end of training (the ViT recipe)."""
    oc = config.optimizer
    if oc.get("name", "sgd") == "sgd":
        return make_optimizer(oc, steps_per_epoch)
    if oc.name != "adam":
        raise ValueError(f"unknown optimizer {oc.name!r}; expected 'sgd' or 'adam'")
    total = int(config.get("num_steps", 0) or 0) or int(config.num_epochs) * steps_per_epoch
    warmup = int(round(float(oc.get("warmup_epochs", 0)) * steps_per_epoch))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, float(oc.lr), max(warmup, 1), max(total, warmup + 1), float(oc.get("lr_min", 0.0))
    )
    tx = optax.chain(
        optax.add_decayed_weights(float(oc.get("weight_decay", 0.0) or 0.0)),
        optax.scale_by_adam(b1=float(oc.get("b1", 0.9)), b2=float(oc.get("b2", 0.999))),
        optax.scale_by_learning_rate(schedule),
    )
    return tx, schedule


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path | None,
    *,
    perturb: Perturb | None = None,
    stop_at_step: int | None = None,
) -> Trained:
    """Trains (or resumes, or just loads if finished) the model of `config`.

    Args:
        config: see eqrobust/configs/bp_cnn.py; optional label_smoothing (float), autoaugment
            (bool: CIFAR-10 AutoAugment policy on every training batch), optimizer.name
            ("sgd" or "adam", see `build_optimizer`).
        workdir: checkpoints and metrics.jsonl go here (None: nothing saved).
        perturb: optional adversary; the model is trained on perturb(eval_logits, x, y, key).
        stop_at_step: stop early at this step as if interrupted (tests, time budgets).

    Returns:
        Trained, whose classifier is the eval-mode model.
    """
    ds = load_data(config)
    model = build_model(config, ds)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx, schedule = build_optimizer(config, len(ds.x_train) // int(config.batch_size))
    smoothing = float(config.get("label_smoothing", 0.0) or 0.0)
    use_autoaugment = bool(config.get("autoaugment", False))
    init_state = {"params": params, "rest": rest, "opt": tx.init(params)}

    def apply(params: Any, rest: Any, x: jax.Array, *, train: bool) -> tuple[jax.Array, Any]:
        m = nnx.merge(graphdef, params, rest, copy=True)
        m.train() if train else m.eval()
        logits = m(x)
        return logits, nnx.state(m, nnx.Not(nnx.Param))

    def eval_logits(state: dict, x: jax.Array) -> jax.Array:
        return apply(state["params"], state["rest"], x, train=False)[0]

    def train_step(state: dict, x: jax.Array, y: jax.Array, key: jax.Array):
        if use_autoaugment:  # after crop/flip, like torchvision's Compose order; exact on uint8
            x_u8 = jnp.round(x * 255.0).astype(jnp.uint8)
            x = data_lib.to_float(autoaugment(jax.random.fold_in(key, 0x41A), x_u8))
        if perturb is not None:
            x = jax.lax.stop_gradient(perturb(lambda xx: eval_logits(state, xx), x, y, key))

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            logits, rest = apply(params, state["rest"], x, train=True)
            return cross_entropy(logits, y, smoothing), (logits, rest)

        (loss, (logits, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
            "lr": schedule(optax.tree_utils.tree_get_all_with_path(state["opt"], "count")[0][1]),
        }
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
    clf = Classifier(logits_fn=logits_fn(model), name=config.get("name", "BP-CNN"))
    return Trained(clf, result.state, result.history, config)
