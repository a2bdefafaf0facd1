"""The classifier interface every attack, defence and evaluation stage sees (no Flax needed)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax

from eqrobust.compile_options import normalized

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
            Such a classifier should also give `sample_logits_fn`, and its `logits_fn` should
            be a forward the user can reproduce (e.g. the noise-free forward or one fixed
            draw): attacks and the evaluation judge success with `logits_fn`.
        test_time_optimization: the forward optimises something at test time (e.g. entropy
            reduction); attacks must be adaptive through that optimisation.
        residual_fn: optional x -> [B] relative residual ||f(z) - z|| / ||f(z)|| of the state the
            prediction reads out (equilibrium models); a measurement, checked by the evaluation.
        sample_logits_fn: optional randomised forward with an explicit PRNG key,
            (x [B, H, W, C], key) -> logits [B, K]: one draw of the model's randomness. EOT
            attacks (`eot_iter` of PGD/APGD, AutoAttack version="rand") average their
            gradients over draws of it; their success is still judged with `logits_fn`.
        compiler_options: XLA options for the programs that run this model, as
            `compile_options.normalized` pairs (e.g. `(("xla_backend_optimization_level", 1),)`);
            the evaluation compiles its attacks and probes under `compile_options.options` of
            them. A speed choice per architecture: it must not change what is computed beyond
            floating-point rounding. () means XLA's defaults.
    """

    logits_fn: Callable[[jax.Array], jax.Array]
    name: str
    trajectory_fn: Callable[[jax.Array], jax.Array] | None = None
    prediction_depth: int | None = None
    gradient: GradientPath | None = None
    randomized: bool = False
    test_time_optimization: bool = False
    residual_fn: Callable[[jax.Array], jax.Array] | None = None
    sample_logits_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None
    compiler_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "compiler_options", normalized(self.compiler_options))
        if self.sample_logits_fn is not None and not callable(self.sample_logits_fn):
            raise TypeError(
                "Classifier.sample_logits_fn must be a callable (x, key) -> logits or None, "
                f"got {type(self.sample_logits_fn).__name__}"
            )

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


PyTree = Any


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["inject", "f", "readout", "trajectory", "init", "predict", "predict_trajectory"],
    meta_fields=["num_states", "tol"],
)
@dataclasses.dataclass(frozen=True)
class Dynamics:
    """An equilibrium model as the intermediate-state attacks see it (eval mode, pure functions).

    Every function should be a `jax.tree_util.Partial` binding the model's arrays, so that the
    compiled attack programs take them as arguments and are shared between models of one
    architecture (plain callables work too; they are static).

    Attributes:
        inject: x [B, H, W, C] -> a (pytree, leaves [B, ...]): the input injection; the only path
            from x to the dynamics.
        f: (z, a) -> z: one cell step; z a pytree with leaves [B, ...], examples independent.
        readout: z -> logits [B, K].
        trajectory: x -> z_1..z_N (leaves [N, B, ...]): the recorded forward-solver iterates,
            treated as constants (no gradient).
        init: x -> z_0 (leaves [B, ...]), the solver's initial state (zeros for a DEQ).
        predict: x -> logits [B, K], the model's real (defended) prediction, or None.
        num_states: N, the number of recorded iterates.
        tol: the forward solver's relative-residual stop (the adjoint's Broyden uses it).
        predict_trajectory: optional x -> (predict(x), trajectory(x)) from one forward solve.
            The intermediate attacks judge the prediction and take the next step's states at
            the same x', so with it one solve per PGD step serves both (only when they judge
            `predict` itself); it must equal the two functions (tests/test_intermediate.py), so
            replacing `predict` or `trajectory` (dataclasses.replace) needs it replaced too.
    """

    inject: Callable[[jax.Array], PyTree]
    f: Callable[[PyTree, PyTree], PyTree]
    readout: Callable[[PyTree], jax.Array]
    trajectory: Callable[[jax.Array], PyTree]
    init: Callable[[jax.Array], PyTree]
    predict: Callable[[jax.Array], jax.Array] | None
    num_states: int
    tol: float = 1e-3
    predict_trajectory: Callable[[jax.Array], tuple[jax.Array, PyTree]] | None = None
