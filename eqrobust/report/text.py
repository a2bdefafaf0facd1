"""Formatting helpers of the report: numbers with intervals, strengths, tables, subset notes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from eqrobust.results import ModelResult, value_label, wilson  # noqa: F401  (re-exported)


def mean_ci(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and 95 % confidence half-width (Student t) of per-seed values; None for one seed."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if v.size == 0:
        return float("nan"), None
    if v.size == 1:
        return float(v[0]), None
    half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean()), float(half)


def fmt(values: Sequence[float], digits: int = 3) -> str:
    """Mean (± 95 % CI over seeds when there are several) or – when there is none."""
    mean, half = mean_ci(values)
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if half is None else f"±{half:.{digits}f}")


def fmt_acc(values: Sequence[float], n: int) -> str:
    """An accuracy on n examples: one seed with its 95 % Wilson interval, several with the
    Student-t interval over seeds (`fmt`)."""
    vals = [v for v in values if v is not None]
    if len(vals) != 1:
        return fmt(vals)
    lo, hi = wilson(vals[0], n)
    return f"{vals[0]:.3f} [{lo:.2f}, {hi:.2f}]"


def fmt_mean_acc(runs: Sequence[Sequence[tuple[float, int]]]) -> str:
    """A mean of accuracies (e.g. over an eps grid), per run a list of (accuracy, n).

    One run: the mean with the means of the per-accuracy 95 % Wilson bounds (exact when
    robustness is nested across the grid, as it is for one attack over growing eps; wider than
    needed when the accuracies vary independently). Several runs: the Student-t interval over
    the runs' means (`fmt`).
    """
    runs = [list(r) for r in runs if len(r)]
    if len(runs) != 1:
        return fmt([float(np.mean([a for a, _ in r])) for r in runs])
    bounds = np.asarray([wilson(a, n) for a, n in runs[0]])
    mean = float(np.mean([a for a, _ in runs[0]]))
    return f"{mean:.3f} [{bounds[:, 0].mean():.2f}, {bounds[:, 1].mean():.2f}]"


def flag_str(runs: Sequence[ModelResult], attack: str, value: float | None) -> str:
    """' ⚠a,c' for the failed health checks that apply to one cell, else ''."""
    flags = sorted({f for m in runs for f in m.cell_flags(attack, value)})
    return " ⚠" + ",".join(flags) if flags else ""


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def subset_note(n: int, total: int) -> str:
    return f"all {total} test images" if n >= total else f"**subset: {n} of {total} test images**"


def subset_notes(ns: dict[str, int], total: int) -> str:
    """One note when every model used the same examples, else one per model."""
    if len(set(ns.values())) <= 1:
        return subset_note(next(iter(ns.values())), total)
    return "; ".join(f"{name}: {subset_note(n, total)}" for name, n in ns.items())
