"""Typed results of the DEQ robustness study: frozen dataclasses with a JSON round trip."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from eqrobust.results import from_json, to_json, wilson

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
    """

    name: str
    clean: Acc
    attacks: dict[str, Acc]
    all: Acc
    worst_attack: str
    grid: GridSummary | None = None
    note: str = ""


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
    """

    num_states: int
    residual_clean: tuple[float, ...]
    residual_adv: tuple[float, ...]
    entropy_clean: tuple[float, ...]
    entropy_adv: tuple[float, ...]
    state_attacks: tuple[str, ...]
    state_accuracy: tuple[tuple[float, ...], ...]


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
