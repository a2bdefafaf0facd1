"""Training loops: supervised (BP-CNN), adversarial (PGD-AT), EP; one `Trained` result type."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib
import os
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import ml_collections
from tqdm.auto import tqdm

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


@contextlib.contextmanager
def workdir_lock(workdir: str, who: str = "train") -> Iterator[None]:
    """Holds an exclusive lock on `workdir` (a `.lock` file, POSIX flock) for one train-or-load.

    Two processes training into one workdir would interleave checkpoints; with the lock the
    second waits (saying so) and then loads the finished run, so e.g. the EP and DEQ studies of
    `make demo` can run side by side and share one EP-CNN.
    """
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, ".lock"), "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            tqdm.write(f"{who}: waiting for another process training or loading {workdir}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def get_trainer(name: str) -> Callable[..., Trained]:
    """The `train(config, workdir, ...) -> Trained` function registered under `name`; it holds
    `workdir_lock(workdir)` while it trains or loads (workdir None: no lock, nothing saved)."""
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer {name!r}; expected one of {sorted(TRAINERS)}")
    module, fn = TRAINERS[name].split(":")
    train = getattr(importlib.import_module(module), fn)

    @functools.wraps(train)
    def locked(config: ml_collections.ConfigDict, workdir: str | None, *args, **kwargs) -> Trained:
        if workdir is None:
            return train(config, workdir, *args, **kwargs)
        with workdir_lock(str(workdir), str(config.get("name", None) or name)):
            return train(config, workdir, *args, **kwargs)

    return locked
