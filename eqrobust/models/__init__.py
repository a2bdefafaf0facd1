"""Flax NNX networks, the model registry (`build_model`) and the pure `logits_fn` of a model."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from flax import nnx

from eqrobust.classifier import Classifier, GradientPath
from eqrobust.models.registry import MODELS, build_model, register_model

__all__ = ["MODELS", "Classifier", "GradientPath", "build_model", "logits_fn", "register_model"]


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


# Importing the model modules registers them.
from eqrobust.models import cnn, deq, ep_student, resnet, vit  # noqa: E402, F401
