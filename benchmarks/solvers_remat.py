"""Memory of BPTT through an EP free phase (grad="unrolled"), with and without remat=True.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/solvers_remat.py              # 250 steps
    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/solvers_remat.py --steps 60 --batch 8

The map is the EP-CNN free-phase step s <- sigma(dPhi/ds) of a Fashion-MNIST-sized energy
(28x28x1, conv 32 -> 64, pool after each, softmax readout), differentiated w.r.t. the
parameters through `steps` unrolled Picard steps (stop="never", the papers' fixed T). Reports
XLA's compiled temp/argument/output sizes (`memory_analysis()`, no run needed) and the median wall
time of the gradient (compilation excluded; the machine is shared, compare within one run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from eqrobust import ep, solvers
from eqrobust.energy import EnergyConfig, readout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-run", action="store_true", help="only compile and report memory")
    a = p.parse_args()
    cfg = EnergyConfig(in_shape=(28, 28, 1), channels=(32, 64), paddings=(1, 1))
    params = ep.init(jax.random.key(0), cfg)
    x = jax.random.uniform(jax.random.key(1), (a.batch, 28, 28, 1))
    y = jnp.arange(a.batch) % 10
    free = ep._free_map(cfg)
    z0 = tuple(jnp.zeros((a.batch, *s)) for s in cfg.state_shapes)

    def loss(params, remat):
        sol = solvers.solve(
            free, z0, (params, x), max_steps=a.steps, stop="never", grad="unrolled", remat=remat
        )
        logits = readout(params, sol.z, cfg)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    print(f"EP free phase, B={a.batch}, {a.steps} unrolled steps, grad w.r.t. params")
    grads = {}
    for remat in (False, True):
        g = jax.jit(jax.grad(lambda p, r=remat: loss(p, r)))
        t0 = time.perf_counter()
        compiled = g.lower(params).compile()
        tc = time.perf_counter() - t0
        m = compiled.memory_analysis()
        line = (
            f"remat={remat!s:5}  temp {m.temp_size_in_bytes / 2**20:8.1f} MiB  "
            f"args {m.argument_size_in_bytes / 2**20:6.2f} MiB  "
            f"out {m.output_size_in_bytes / 2**20:6.2f} MiB  compile {tc:5.1f} s"
        )
        if not a.no_run:
            grads[remat] = jax.block_until_ready(compiled(params))
            ts = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(params))
                ts.append(time.perf_counter() - t0)
            line += f"  run {statistics.median(ts) * 1e3:7.1f} ms (median of {a.repeats})"
        print(line, flush=True)
    if len(grads) == 2:
        diff = max(
            float(jnp.max(jnp.abs(u - v)))
            for u, v in zip(
                jax.tree.leaves(grads[False]), jax.tree.leaves(grads[True]), strict=True
            )
        )
        print(f"max |grad difference| float32: {diff:.2e}")


if __name__ == "__main__":
    main()
