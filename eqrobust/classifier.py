"""The classifier interface every attack, defence and evaluation stage sees (no Flax needed)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

# How a gradient reaches the input through a fixed-point solve (the engine's `solve(grad=...)`
# names): backprop through `depth` solver steps, the implicit function theorem at the solution,
# or the phantom gradient of `depth` damped steps from the detached solution.
GRADIENT_KINDS = ("unrolled", "implicit", "phantom")


@dataclasses.dataclass(frozen=True)
class GradientPath:
    """Where the input gradient of an equilibrium model's prediction comes from.

    Attributes:
        kind: one of `GRADIENT_KINDS`.
        depth: steps differentiated through: solver steps for "unrolled" (from the initial
            state), damped steps for "phantom"; None for "implicit".
    """

    kind: str
    depth: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in GRADIENT_KINDS:
            raise ValueError(
                f"GradientPath kind must be one of {GRADIENT_KINDS}, got {self.kind!r}"
            )
        if self.kind == "implicit" and self.depth is not None:
            raise ValueError("GradientPath('implicit') takes no depth")
        if self.kind != "implicit" and not (isinstance(self.depth, int) and self.depth >= 1):
            raise ValueError(
                f"GradientPath({self.kind!r}) needs an int depth >= 1, got {self.depth}"
            )

    def __str__(self) -> str:
        return self.kind if self.depth is None else f"{self.kind}({self.depth})"


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A classifier as attacks, defences and the evaluation suite see it.

    Attributes:
        logits_fn: x [B, H, W, C] float in [0, 1] -> logits [B, K]. Its forward value is the
            model's real prediction; attacks differentiate it.
        name: display name.
        trajectory_fn: optional x -> readout logits along the dynamics, [T, B, K] (EP/DEQ).
        prediction_depth: solver / free-phase steps behind the prediction (None: feedforward).
        gradient: how logits_fn's input gradient is obtained for an equilibrium model; None means
            plain autodiff of a feedforward forward.
        randomized: the forward draws fresh randomness per call (attacks need EOT).
        test_time_optimization: the forward optimises something at test time (e.g. entropy
            reduction); attacks must be adaptive through that optimisation.
    """

    logits_fn: Callable[[jax.Array], jax.Array]
    name: str
    trajectory_fn: Callable[[jax.Array], jax.Array] | None = None
    prediction_depth: int | None = None
    gradient: GradientPath | None = None
    randomized: bool = False
    test_time_optimization: bool = False

    @property
    def gradient_matches_prediction(self) -> bool:
        """Whether the declared attack gradient is the gradient of the prediction path itself.

        This reads the declaration only; `eqrobust.evaluation` verifies it numerically.
        """
        g = self.gradient
        if g is None or g.kind == "implicit":
            return True
        return g.kind == "unrolled" and g.depth == self.prediction_depth

    def describe_gradient(self) -> str:
        """One line naming the gradient path and the prediction path."""
        pred = (
            f"prediction depth {self.prediction_depth}" if self.prediction_depth else "feedforward"
        )
        return f"gradient: {self.gradient or 'autodiff'}; {pred}"
