"""Typed evaluation results: frozen dataclasses with `to_json` / `from_json` and the schema version.

The evaluation suite produces these, the report reads them; neither imports the other. JSON keys
are the field names; `from_json` checks types (and accuracies in [0, 1]) and names the offending
path on error.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, TypeVar

import numpy as np

SCHEMA_VERSION = 2

HEALTH_CHECKS = {
    "a": "accuracy at a very large eps is ~0",
    "b": "white-box accuracy <= black-box (Square) accuracy + tolerance",
    "c": "more PGD iterations/restarts change accuracy by <= tolerance",
    "d": "the attack gradient is the derivative of the prediction (finite differences, measured)",
    "e": "the declared gradient path is the prediction path (metadata)",
    "f": "the prediction is deterministic (else white-box numbers need EOT)",
}


def wilson(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95 % at z = 1.96) of a proportion observed on `n` examples."""
    if n <= 0:
        return 0.0, 1.0
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """Accuracy on `n` examples."""

    accuracy: float
    n: int


@dataclasses.dataclass(frozen=True)
class GradientInfo:
    """The attack-gradient path of a classifier against its prediction path."""

    mode: str  # str(GradientPath) or "autodiff"
    gradient_depth: int | None
    prediction_depth: int | None
    matches_prediction: bool
    randomized: bool = False  # declared: the forward draws fresh randomness (attacks need EOT)
    test_time_optimization: bool = False  # declared: the forward optimises at test time


@dataclasses.dataclass(frozen=True)
class GradientProbe:
    """Autodiff directional derivatives of the margin vs finite differences of the prediction."""

    correlation: float  # Pearson over (image, direction) pairs
    relative_error: float  # median |g.d - fd| / (|g.d| + |fd|)
    zero_gradient_fraction: float  # images whose input gradient is exactly zero
    ce_zero_gradient_fraction: float  # ... of the cross-entropy, in the model's precision
    function_change: float  # median |fd|: does the prediction move at all along d
    n: int
    directions: int
    step: float
    dtype: str = "float64"  # the precision the prediction was probed in


@dataclasses.dataclass(frozen=True)
class DeterminismProbe:
    """The forward called several times on the same images."""

    max_logit_change: float
    prediction_change: float  # fraction of images whose prediction changed between calls
    n: int


@dataclasses.dataclass(frozen=True)
class ResidualProbe:
    """Relative residual ||f(z) - z|| / ||f(z)|| of the state an equilibrium model predicts from,
    measured on clean images (the classifier's `residual_fn`)."""

    mean: float
    median: float
    max: float
    n: int


@dataclasses.dataclass(frozen=True)
class LargeRun:
    """Health check (a)'s run at a very large strength."""

    value: float
    accuracy: float
    n: int


@dataclasses.dataclass(frozen=True)
class AttackResult:
    """One attack over its strength grid (robust accuracy judged by the prediction)."""

    label: str
    norm: str  # "l2" or "linf"
    box: str  # "white" or "black"
    param: str  # what `values` mean: "eps" or "c"
    values: tuple[float, ...]
    accuracy: tuple[float, ...]
    n: int
    settings: dict[str, Any]
    large: LargeRun | None = None
    reduced: bool = False  # a budget below the attack's standard one (weaker attack)
    # False: reported only to compare with the papers (their too-weak C&W protocol); left out of
    # the mean robustness, its failed checks do not flag the model's headline.
    headline: bool = True


@dataclasses.dataclass(frozen=True)
class WorstCase:
    """Per-example worst case over every attack of one norm at one eps ("ALL" of AutoAttack):
    an example counts as robust only when it survived each attack; `n` is the smallest subset
    of those attacks (subsets are nested prefixes, so all of them ran on these examples)."""

    norm: str
    value: float
    accuracy: float
    n: int
    attacks: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class MaskingComparison:
    """Check (b)'s input: a white-box attack against Square on common examples."""

    attack: str
    value: float
    white_accuracy: float
    black_accuracy: float
    n: int


@dataclasses.dataclass(frozen=True)
class ConvergenceRun:
    """Check (c)'s input: the same attack with more steps and restarts."""

    attack: str
    value: float
    steps: int
    restarts: int
    strong_steps: int
    strong_restarts: int
    accuracy: float
    strong_accuracy: float
    n: int
    # Of the n examples classified correctly, the fraction whose attack-loss input gradient is
    # exactly zero: there "more steps change nothing" means masked, not converged.
    zero_gradient_fraction: float = 0.0


@dataclasses.dataclass(frozen=True)
class HealthCheck:
    """One health-check verdict; `attack` is "*" when it applies to every white-box attack."""

    id: str
    attack: str
    value: float | None
    passed: bool
    message: str


@dataclasses.dataclass(frozen=True)
class CorruptionResult:
    """Accuracy per corruption and severity (`accuracy[name][severity index]`)."""

    n: int
    severities: tuple[int, ...]
    accuracy: dict[str, tuple[float, ...]]
    per_severity: tuple[float, ...]
    mean: float | None


@dataclasses.dataclass(frozen=True)
class Curve:
    """Clean accuracy of the readout after each step of the dynamics."""

    steps: tuple[int, ...]
    accuracy: tuple[float, ...]
    n: int


@dataclasses.dataclass(frozen=True)
class DepthVariant:
    """Robust accuracy with one attack-gradient path (prediction unchanged)."""

    mode: str
    gradient_depth: int | None
    prediction_depth: int | None
    matches_prediction: bool
    accuracy: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class AttackDepth:
    """Robust accuracy vs attack-gradient path, on one attack's grid."""

    attack: str
    values: tuple[float, ...]
    n: int
    variants: tuple[DepthVariant, ...]


@dataclasses.dataclass(frozen=True)
class DynamicsResult:
    """Analyses of an equilibrium model's dynamics (EP free phase, DEQ solver)."""

    prediction_depth: int | None
    trajectory: Curve | None = None
    attack_depth: AttackDepth | None = None


@dataclasses.dataclass(frozen=True)
class Gallery:
    """Gallery images (arrays in memory only; the JSON keeps `file`)."""

    attack: str
    eps: float
    labels: tuple[int, ...]
    pred_clean: tuple[int, ...]
    pred_adversarial: tuple[int, ...]
    clean: np.ndarray | None = None
    adversarial: np.ndarray | None = None
    file: str | None = None


@dataclasses.dataclass(frozen=True)
class ModelResult:
    """Everything measured on one trained model (one seed)."""

    name: str
    seed: int
    num_test: int
    clean: Accuracy
    gradient: GradientInfo
    attacks: dict[str, AttackResult]
    health: tuple[HealthCheck, ...] = ()
    mean_robustness: float | None = None
    corruptions: CorruptionResult | None = None
    dynamics: DynamicsResult | None = None
    masking_comparisons: tuple[MaskingComparison, ...] = ()
    convergence_runs: tuple[ConvergenceRun, ...] = ()
    gallery: Gallery | None = None
    gradient_probe: GradientProbe | None = None
    determinism: DeterminismProbe | None = None
    residual: ResidualProbe | None = None
    worst_case: tuple[WorstCase, ...] = ()
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return f"{self.name}#{self.seed}"

    def cell_flags(self, attack: str, value: float | None = None) -> list[str]:
        """Ids of failed checks that apply to one table cell (attack at one strength)."""
        flags = []
        white = attack in self.attacks and self.attacks[attack].box == "white"
        for c in self.health:
            if c.passed:
                continue
            if c.attack == "*":
                applies = white
            else:
                applies = c.attack == attack and (
                    c.value is None or value is None or math.isclose(c.value, value)
                )
            if applies and c.id not in flags:
                flags.append(c.id)
        return sorted(flags)


@dataclasses.dataclass(frozen=True)
class StudyResults:
    """All models of a study plus free-form metadata (title, dataset, timing, configs)."""

    models: tuple[ModelResult, ...]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def by_name(self) -> dict[str, list[ModelResult]]:
        """Runs grouped by model name (seeds), in first-appearance order."""
        groups: dict[str, list[ModelResult]] = {}
        for m in self.models:
            groups.setdefault(m.name, []).append(m)
        return groups

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (gallery arrays dropped, non-finite floats as null)."""
        return to_json(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> StudyResults:
        """Parses and validates a dict produced by `to_json` (raises ValueError naming the path)."""
        if obj.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"results schema_version {obj.get('schema_version')!r} != {SCHEMA_VERSION}"
            )
        out = from_json(cls, obj)
        validate(out)
        return out


# ----------------------------------------------------------------------------------------------
# Generic conversion


def to_json(obj: Any) -> Any:
    """Dataclasses, tuples, dicts, NumPy scalars -> JSON types; arrays are dropped (None)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return None  # images stay in memory (the report saves them as PNG)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


T = TypeVar("T")


def from_json(tp: type[T], obj: Any, path: str = "results") -> T:
    """Builds `tp` (a dataclass or typing form used above) from JSON data, checking types."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if obj is None and type(None) in args:
            return None  # type: ignore[return-value]
        (inner,) = [a for a in args if a is not type(None)]
        return from_json(inner, obj, path)
    if tp is Any or tp is np.ndarray:
        return obj
    if obj is None:
        raise ValueError(f"{path}: expected {getattr(tp, '__name__', tp)}, got null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected an object, got {type(obj).__name__}")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in obj:
                kwargs[f.name] = from_json(hints[f.name], obj[f.name], f"{path}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{path}: missing key {f.name!r}")
        return tp(**kwargs)
    if origin is tuple:
        if not isinstance(obj, list | tuple):
            raise ValueError(f"{path}: expected a list, got {type(obj).__name__}")
        return tuple(from_json(args[0], v, f"{path}[{i}]") for i, v in enumerate(obj))
    if origin is dict:
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: expected an object, got {type(obj).__name__}")
        return {k: from_json(args[1], v, f"{path}[{k!r}]") for k, v in obj.items()}
    if tp is float:
        if isinstance(obj, bool) or not isinstance(obj, int | float):
            raise ValueError(f"{path}: expected a number, got {type(obj).__name__}")
        return float(obj)  # type: ignore[return-value]
    if tp in (int, str, bool) and (not isinstance(obj, tp) or (tp is int and obj is True)):
        raise ValueError(f"{path}: expected {tp.__name__}, got {type(obj).__name__}")
    return obj


def validate(results: StudyResults) -> None:
    """Invariants beyond types: accuracies in [0, 1], one accuracy per strength, check (d)."""
    if not results.models:
        raise ValueError("results.models is empty")
    for m in results.models:
        where = f"model {m.name!r} (seed {m.seed})"
        accs = [m.clean.accuracy]
        for aname, a in m.attacks.items():
            if len(a.values) != len(a.accuracy):
                raise ValueError(
                    f"{where}: {aname} has {len(a.values)} strengths but "
                    f"{len(a.accuracy)} accuracies"
                )
            accs += a.accuracy
        if any(not 0.0 <= a <= 1.0 for a in accs):
            raise ValueError(f"{where}: accuracy outside [0, 1] in {accs}")
        ids = {c.id for c in m.health}
        if "e" not in ids:
            raise ValueError(f"{where}: health check (e) missing")
        if any(a.large is not None for a in m.attacks.values()) and "a" not in ids:
            raise ValueError(f"{where}: health check (a) missing although large-eps runs exist")


def value_label(param: str, v: float) -> str:
    """A strength as people write it: ε=8/255 for small Linf radii, ε=0.5, c=0.01."""
    if param == "eps" and v < 0.1 and abs(v * 255 - round(v * 255)) < 1e-6:
        return f"ε={round(v * 255)}/255"
    return f"{'ε' if param == 'eps' else 'c'}={v:g}"
