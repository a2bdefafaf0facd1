"""Flax NNX feedforward networks and the classifier interface every attack and evaluation sees."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
from flax import nnx

GRADIENT_MODES = ("exact", "bptt", "implicit", "phantom")


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A classifier as attacks and the evaluation suite see it.

    Attributes:
        logits_fn: x [B, H, W, C] float in [0, 1] -> logits [B, K]. Its forward value is the
            model's real prediction; attacks differentiate it.
        name: display name.
        trajectory_fn: optional x -> readout logits along the dynamics, [T, B, K] (EP/DEQ).
        prediction_depth: solver / free-phase steps behind the prediction (None: feedforward).
        gradient_mode: how logits_fn's gradient is obtained: "exact" (autodiff of the prediction
            path itself), "bptt" (backprop through `gradient_depth` steps that may differ from the
            prediction's), "implicit" (implicit function theorem at the fixed point), "phantom".
        gradient_depth: steps the gradient comes from ("bptt", "phantom").
    """

    logits_fn: Callable[[jax.Array], jax.Array]
    name: str
    trajectory_fn: Callable[[jax.Array], jax.Array] | None = None
    prediction_depth: int | None = None
    gradient_mode: str = "exact"
    gradient_depth: int | None = None

    def __post_init__(self) -> None:
        if self.gradient_mode not in GRADIENT_MODES:
            raise ValueError(
                f"gradient_mode must be one of {GRADIENT_MODES}, got {self.gradient_mode!r}"
            )

    @property
    def gradient_matches_prediction(self) -> bool:
        """Whether the attack gradient is the gradient of the prediction path itself."""
        if self.gradient_mode in ("exact", "implicit"):
            return True
        return self.gradient_depth is not None and self.gradient_depth == self.prediction_depth

    def describe_gradient(self) -> str:
        """One line naming the gradient path and the prediction path."""
        pred = (
            f"prediction depth {self.prediction_depth}" if self.prediction_depth else "feedforward"
        )
        grad = self.gradient_mode + (
            f" ({self.gradient_depth} steps)" if self.gradient_depth else ""
        )
        return f"gradient: {grad}; {pred}"


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
