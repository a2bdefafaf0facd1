"""Per-step wall time of Picard / Anderson / Broyden on the 16x16x8 conv map, by memory size.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/broyden_cost.py [--old path/to/solvers.py]

Runs every method for exactly 40 steps (stop="never", float64, B=16, D=2051), compilation
excluded, calls interleaved over --rounds rounds (the CPU is shared: compare within one run),
and prints the median and minimum ms per step. With --old, a second copy of the engine loaded
from that file (e.g. `git show REV:eqrobust/solvers.py > /tmp/old.py`) runs side by side.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import statistics
import time

import jax

from benchmarks.solvers_fevals import conv_problem
from eqrobust import solvers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", help="path of another solvers.py to compare with")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=40)
    a = p.parse_args()
    engines = {"": solvers}
    if a.old:
        spec = importlib.util.spec_from_file_location("solvers_old", a.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        engines["old "] = old
    cases = [("picard", {}), ("anderson", {"memory": 5}), ("anderson", {"memory": 16})]
    cases += [("broyden", {"memory": 5}), ("broyden", {"memory": 16})]
    with jax.enable_x64(True):
        f, z0, args = conv_problem(batch=16, hw=16, channels=8)
        runs = {}
        for tag, eng in engines.items():
            for method, kw in cases:
                name = f"{tag}{method} {kw.get('memory', '')}".strip()
                run = jax.jit(
                    lambda z0, args, eng=eng, method=method, kw=kw: (
                        eng.solve(
                            f,
                            z0,
                            args,
                            method=method,
                            tol=1e-30,
                            max_steps=a.steps,
                            stop="never",
                            grad="none",
                            **kw,
                        ).z
                    )
                )
                c = run.lower(z0, args).compile()
                copies = len(re.findall(r"\[16,\d+,2051\]\{[0-9,]*\} copy\(", c.as_text()))
                jax.block_until_ready(c(z0, args))
                runs[name] = (c, copies, [])
        for _ in range(a.rounds):
            for c, _, ts in runs.values():
                t = time.perf_counter()
                jax.block_until_ready(c(z0, args))
                ts.append(time.perf_counter() - t)
        print(f"{'engine/method/memory':<22} {'median ms/step':>14} {'min':>7}  buffer copies")
        for name, (_, copies, ts) in runs.items():
            med, lo = statistics.median(ts) / a.steps * 1e3, min(ts) / a.steps * 1e3
            print(f"{name:<22} {med:>14.3f} {lo:>7.3f}  {copies}")


if __name__ == "__main__":
    main()
