"""Training loops: supervised (BP-CNN), adversarial (PGD-AT), EP; one `Trained` result type."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, NamedTuple

import ml_collections

from eqrobust.models import Classifier


class Trained(NamedTuple):
    """A trained model: the classifier attacks see, raw state, metric history, and its config."""

    classifier: Classifier
    state: Any
    history: list[dict]
    config: ml_collections.ConfigDict
    # The Flax module with the selected weights in eval mode, for trainers that build one (DEQ:
    # the defences and intermediate attacks need its cell, injection and readout).
    module: Any = None


# name -> "module:function"; imported lazily so that e.g. the BP-CNN path never imports EP code.
TRAINERS = {
    "supervised": "eqrobust.train.supervised:train",
    "adversarial": "eqrobust.train.adversarial:train",
    "ep": "eqrobust.train.ep:train",
    "distill": "eqrobust.train.distill:train",
    "deq": "eqrobust.train.deq:train",
}


def get_trainer(name: str) -> Callable[..., Trained]:
    """The `train(config, workdir) -> Trained` function registered under `name`."""
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}; expected one of {sorted(TRAINERS)}")
    module, fn = TRAINERS[name].split(":")
    return getattr(importlib.import_module(module), fn)
