"""Typed results of the DEQ robustness study: frozen dataclasses with a JSON round trip."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from eqrobust.results import GradientProbe, from_json, to_json, wilson

# The summary table's columns, in order (DefenseResult.attacks keys plus clean and ALL).
TABLE_COLUMNS = (
    "clean",
    "pgd",
    "intermediate",
    "ensemble",
    "adjoint",
    "adaptive",
    "transfer",
    "square",
    "all",
)
# Attacks whose per-example result is a worst case over other entries (excluded from "ALL"'s
# argmin naming, included in it by construction).
COMPOSITE_ATTACKS = ("adaptive", "transfer")
# Gradient paths behind a composite column: entropy reduction's "adaptive" is the worst case of
# its variants; "all" is flagged when no checked gradient of the defence passed (d).
COMPOSITE_PARTS = {"adaptive": ("phantom", "full", "bpda"), "all": "*"}


@dataclasses.dataclass(frozen=True)
class Acc:
    """An accuracy on `n` examples with its 95 % Wilson interval [lo, hi]."""

    accuracy: float
    n: int
    lo: float
    hi: float

    @classmethod
    def of(cls, correct: np.ndarray) -> Acc:
        """From a [n] bool array (True: the prediction is right)."""
        c = np.asarray(correct, bool).reshape(-1)
        n = int(c.size)
        acc = float(c.mean()) if n else float("nan")
        lo, hi = wilson(acc, n) if n else (0.0, 1.0)
        return cls(acc, n, float(lo), float(hi))

    def __str__(self) -> str:
        return f"{self.accuracy:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


@dataclasses.dataclass(frozen=True)
class GridSummary:
    """The unrolled-intermediate grid (i, K, lam) of PGD attacks.

    Attributes:
        accuracy: per-example minimum over the grid (robust in every cell).
        strongest_state, strongest_unroll, strongest_lam: the cell of lowest accuracy.
        states, unrolls, lams: the grid axes.
        cell_accuracy: [S * nK * nL] accuracy per cell, row-major over (i, K, lam).
    """

    accuracy: Acc
    strongest_state: int
    strongest_unroll: int
    strongest_lam: float
    states: tuple[int, ...]
    unrolls: tuple[int, ...]
    lams: tuple[float, ...]
    cell_accuracy: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class GradientCheck:
    """Check (d) of one white-box attack's gradient path on one defence.

    The attack's input gradient of the true-class margin (the prediction's margin cotangent
    pulled back through the attack's gradient path) against central finite differences of the
    defence's prediction, in float64 (`eqrobust.evaluation.probes.gradient_path_probe`).

    Attributes:
        gradient: the path, e.g. "own (phantom, 2 steps)", "BPTT through z_1..z_3".
        probe: the measurement; None when the path was not checked.
        passed: the check's verdict; None when not checked.
        note: why not checked, or the verdict in words.
    """

    gradient: str
    probe: GradientProbe | None = None
    passed: bool | None = None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class DefenseResult:
    """One defence of one DEQ: clean accuracy, each attack, and the per-example worst case.

    Attributes:
        name: "final" (undefended), "early", "ensemble" or "entropy".
        clean: clean accuracy of the defended prediction.
        attacks: {attack: accuracy}; an example counts as robust under an attack only when the
            defended prediction is right on x and on the attack's x_adv.
        all: robust under every attack ("ALL", the headline).
        worst_attack: the single attack of lowest accuracy.
        grid: the intermediate grid judged on this defence (when run).
        note: e.g. the selected early state.
        gradient_checks: {attack: check (d) of its gradient path}, for the white-box attacks
            run on this defence (keys of `attacks`; transfer and Square have none).
    """

    name: str
    clean: Acc
    attacks: dict[str, Acc]
    all: Acc
    worst_attack: str
    grid: GridSummary | None = None
    note: str = ""
    gradient_checks: dict[str, GradientCheck] = dataclasses.field(default_factory=dict)

    def gradient_flag(self, attack: str) -> bool:
        """True when the number of `attack` comes from a gradient that failed check (d): its
        own check failed, or (a composite: "adaptive", "all") every gradient path behind it was
        checked and failed (one unchecked path leaves it unflagged: unknown)."""
        checks = self.gradient_checks
        if attack in checks:
            return checks[attack].passed is False
        parts = COMPOSITE_PARTS.get(attack)
        if parts is None:
            return False
        done = [c.passed for k, c in checks.items() if (parts == "*" or k in parts)]
        return bool(done) and all(p is False for p in done)


@dataclasses.dataclass(frozen=True)
class DynamicsAnalysis:
    """Measurements along the solver states z_1..z_N of the undefended DEQ.

    Attributes:
        num_states: N.
        residual_clean, residual_adv: [N] mean relative residual ||f(z_n) - z_n|| / ||f(z_n)||
            on clean and PGD-adversarial inputs.
        entropy_clean, entropy_adv: [N] mean prediction entropy of readout(z_n).
        state_attacks: the rows of state_accuracy ("clean" and each attack on the final DEQ).
        state_accuracy: [attacks][N] accuracy of readout(z_n) at each attack's x_adv.
        spectral_radius_clean, spectral_radius_adv: [n] per example, the leading eigenvalue
            modulus of df/dz at the solver's z* (Arnoldi, `eqrobust.spectrum`) on clean and
            PGD-adversarial inputs; empty when not measured.
    """

    num_states: int
    residual_clean: tuple[float, ...]
    residual_adv: tuple[float, ...]
    entropy_clean: tuple[float, ...]
    entropy_adv: tuple[float, ...]
    state_attacks: tuple[str, ...]
    state_accuracy: tuple[tuple[float, ...], ...]
    spectral_radius_clean: tuple[float, ...] = ()
    spectral_radius_adv: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class DeqModelResult:
    """Everything measured on one DEQ.

    Attributes:
        key, name: the config key and display name.
        num_states: N solver states.
        early_index: the early state selected on the validation subset.
        early_val_robust, early_val_clean: [N] validation PGD / clean accuracy per state.
        defenses: final, early, ensemble, entropy (those run).
        dynamics: the analyses along the dynamics.
        timing: seconds per stage.
    """

    key: str
    name: str
    num_states: int
    early_index: int
    early_val_robust: tuple[float, ...]
    early_val_clean: tuple[float, ...]
    defenses: tuple[DefenseResult, ...]
    dynamics: DynamicsAnalysis
    timing: dict[str, float]


@dataclasses.dataclass(frozen=True)
class EpResult:
    """The EP-CNN's free phase under the same intermediate attacks (success on its prediction)."""

    name: str
    num_states: int
    clean: Acc
    pgd: Acc
    intermediate: Acc
    ensemble: Acc
    all: Acc
    grid: GridSummary


@dataclasses.dataclass(frozen=True)
class DeqStudyResults:
    """The DEQ study: one entry per model, the optional EP-CNN, and metadata."""

    models: tuple[DeqModelResult, ...]
    ep: EpResult | None
    meta: dict[str, Any]

    def to_json(self) -> dict:
        """JSON-ready dict (arrays dropped, non-finite floats as null)."""
        return to_json(self)

    @classmethod
    def from_json(cls, obj: dict) -> DeqStudyResults:
        """Inverse of `to_json`, with type checks and the invariants of `validate_deq`."""
        out = from_json(cls, obj, "deq_results")
        validate_deq(out)
        return out


def validate_deq(results: DeqStudyResults) -> None:
    """Accuracies in [0, 1]; per defence, every attack <= clean and ALL <= every attack."""
    for m in results.models:
        for d in m.defenses:
            where = f"{m.name} / {d.name}"
            accs = [d.clean, d.all, *d.attacks.values()]
            if any(not 0.0 <= a.accuracy <= 1.0 for a in accs):
                raise ValueError(f"{where}: accuracy outside [0, 1]")
            if len({a.n for a in accs}) != 1:
                raise ValueError(f"{where}: accuracies on different numbers of examples")
            for k, a in d.attacks.items():
                if a.accuracy > d.clean.accuracy or d.all.accuracy > a.accuracy:
                    raise ValueError(f"{where}: {k} {a.accuracy} not in [ALL, clean]")
