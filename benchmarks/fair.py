"""Fair side-by-side timing for the CPU benchmarks (issue 17).

How to read the numbers: every side runs at its best thread setting (PyTorch with 1 and with 2
intra-op threads — with 2 it collapses when the other core is busy, its OpenMP threads spin-wait —
and XLA with its default Eigen pool or, via `xla_threads(1)` before JAX starts, one thread); the
candidates run in alternation, `repeats` rounds, so a burst of load hits all of them; each figure
is the median with the min-max spread and the 1-minute load average measured around its runs.
Ratios are best-vs-best medians. A ratio whose spreads overlap is not a result.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


def xla_threads(n: int | None) -> None:
    """Restrict XLA:CPU to `n` intra-op threads; must run before jax is imported."""
    if n is None:
        return
    if "jax" in __import__("sys").modules:
        raise RuntimeError("xla_threads() must be called before jax is imported")
    flags = os.environ.get("XLA_FLAGS", "")
    extra = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" if n == 1 else ""
    os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate: median, spread and the load while it ran."""

    median: float
    low: float
    high: float
    load: float
    n: int

    def fmt(self, per: float = 1.0, unit: str = "ms") -> str:
        scale = 1e3 if unit == "ms" else 1.0
        return (
            f"{self.median / per * scale:8.2f} {unit} [{self.low / per * scale:.2f}-"
            f"{self.high / per * scale:.2f}] load {self.load:.1f}"
        )


def alternate(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: bool = True
) -> dict[str, Timing]:
    """Warms each candidate up once (unless `warmup` is False: for calls of minutes, where the
    first call's compilation is a small part and counts against the compiled side), then times
    them in alternation for `repeats` rounds.

    Each fn must block until its result is ready.
    """
    for fn in fns.values() if warmup else ():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    loads: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
            loads[name].append(os.getloadavg()[0])
    return {
        k: Timing(statistics.median(v), min(v), max(v), statistics.mean(loads[k]), len(v))
        for k, v in times.items()
    }


def best(timings: dict[str, Timing], prefix: str) -> tuple[str, Timing]:
    """The fastest candidate (by median) whose name starts with `prefix`."""
    cands = {k: v for k, v in timings.items() if k.startswith(prefix)}
    if not cands:
        raise ValueError(f"no candidate starts with {prefix!r}: {sorted(timings)}")
    name = min(cands, key=lambda k: cands[k].median)
    return name, cands[name]


def ratio_line(ours: tuple[str, Timing], ref: tuple[str, Timing]) -> str:
    """'best ours / best reference' with an overlap warning."""
    (on, o), (rn, r) = ours, ref
    overlap = o.high >= r.low and r.high >= o.low
    note = "  (spreads overlap: not a result)" if overlap else ""
    return f"ratio {r.median / o.median:.2f}x: best ours [{on}] vs best reference [{rn}]{note}"
