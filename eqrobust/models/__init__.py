"""Flax NNX networks, the model registry (`build_model`) and the pure `logits_fn` of a model."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from flax import nnx

from eqrobust.classifier import Classifier, GradientPath

__all__ = ["MODELS", "Classifier", "GradientPath", "build_model", "logits_fn", "register_model"]

# Builder(model_config, data, rngs) -> nnx.Module, where `model_config` is config.model and
# `data` provides image_shape, num_classes, mean and std (an `eqrobust.data.Dataset`).
Builder = Callable[[ml_collections.ConfigDict, Any, nnx.Rngs], nnx.Module]
MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: registers `builder(model_config, data, rngs) -> nnx.Module` under `name`."""

    def register(builder: Builder) -> Builder:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = builder
        return builder

    return register


def build_model(config: ml_collections.ConfigDict, data: Any) -> nnx.Module:
    """The network named by `config.model.name` for this dataset's shape, classes and statistics.

    Args:
        config: a training config with `model` (`name` plus the architecture's fields) and `seed`.
        data: `eqrobust.data.Dataset` (image_shape, num_classes, mean, std).
    """
    name = config.model.get("name", "bp_cnn")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(MODELS)}")
    return MODELS[name](config.model, data, nnx.Rngs(int(config.seed)))


@functools.lru_cache(maxsize=64)
def _eval_apply(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], jax.Array]:
    # One function object per architecture: jit caches key on it, so models that differ only in
    # their weights (BP-CNN, Adv-CNNs) share every compiled attack.
    def apply(state: nnx.State, x: jax.Array) -> jax.Array:
        m = nnx.merge(graphdef, state, copy=True)
        m.eval()
        return m(x)

    return apply


def logits_fn(model: nnx.Module) -> jax.tree_util.Partial:
    """A pure eval-mode function x -> logits for an NNX model (jit, vmap and grad safe).

    Returned as `jax.tree_util.Partial(apply, state)`: the model's arrays are pytree leaves, so
    the attacks and the evaluation pass them into their compiled programs as arguments instead of
    baking them in as constants (see `eqrobust.attacks._common.as_pytree_fn`). Each call merges a
    fresh copy, so tracing never mutates `model`.
    """
    graphdef, state = nnx.split(model)
    return jax.tree_util.Partial(_eval_apply(graphdef), state)


# Registering modules last: they import the registry above.
from eqrobust.models import cnn, deq  # noqa: E402, F401
