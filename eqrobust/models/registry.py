"""The model registry: builders of Flax NNX networks by name (config.model.name)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections
from flax import nnx

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
