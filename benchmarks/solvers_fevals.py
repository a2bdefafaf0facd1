"""f-evaluations (and wall time) to reach tol: Picard vs Anderson vs Broyden on contractive maps.

    .venv/bin/python benchmarks/solvers_fevals.py              # float64, tol 1e-4 and 1e-8
    .venv/bin/python benchmarks/solvers_fevals.py --tols 1e-6 --repeats 5

Problems (all contractive, fixed point unique):
  linear      z = A z + W x, A symmetric with eigenvalues in [-0.5, 0.95], D = 64, B = 8;
  conv-small  the test suite's map {h: tanh(conv(h) + x), y: tanh(0.3 y + mean(h) M)}, 6x6x2, B = 3;
  conv        the same map at a representative size, 16x16x8, B = 16.
f-evaluations per example are steps + 1 (one evaluation at z0 for its residual). Wall time is
the median of a few calls of the jitted solve, compilation excluded; the machine is shared, so
compare methods within one run (ratios), not across runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from eqrobust import solvers


def linear_problem(batch: int = 8, dim: int = 64, top: float = 0.95, seed: int = 0):
    """z = A z + W x with symmetric A, eigenvalues in [-0.5, top]; returns f, z0, args."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    a = (q * np.linspace(-0.5, top, dim)) @ q.T
    w = rng.normal(size=(dim, 3))
    x = rng.normal(size=(batch, 3))

    def f(z, args):
        a, w, x = args
        return z @ a.T + x @ w.T

    return f, jnp.zeros((batch, dim)), tuple(jnp.asarray(t) for t in (a, w, x))


def conv_problem(batch: int = 3, hw: int = 6, channels: int = 2, gain: float = 0.98, seed: int = 1):
    """tanh(conv(h) + x) with sum|k| <= gain (contraction), plus a small readout leaf y."""
    rng = np.random.default_rng(seed)
    c = channels
    k = np.zeros((3, 3, c, c))
    k[1, 1] = 0.7 * np.eye(c)
    k += 0.3 / (9 * c)
    r = rng.normal(size=(3, 3, c, c))
    k = gain * (0.9 * k + 0.1 * r / np.abs(r).sum(axis=(0, 1, 2)).max())
    m = 0.5 * rng.normal(size=(c, 3))
    x = 0.3 * rng.normal(size=(batch, hw, hw, c))

    def f(z, args):
        k, m, x = args
        conv = jax.lax.conv_general_dilated(
            z["h"], k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jnp.tanh(conv + x)
        return {"h": h, "y": jnp.tanh(0.3 * z["y"] + jnp.mean(h, axis=(1, 2)) @ m)}

    z0 = {"h": jnp.zeros((batch, hw, hw, c)), "y": jnp.zeros((batch, 3))}
    return f, z0, tuple(jnp.asarray(t) for t in (k, m, x))


def measure(f, z0, args, method: str, tol: float, max_steps: int, repeats: int) -> dict:
    run = jax.jit(
        lambda z0, args: solvers.solve(
            f, z0, args, method=method, tol=tol, max_steps=max_steps, grad="none"
        )
    )
    sol = jax.block_until_ready(run(z0, args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(run(z0, args))
        times.append(time.perf_counter() - t)
    fevals = np.asarray(sol.steps) + 1
    return {
        "fevals_mean": float(fevals.mean()),
        "fevals_max": int(fevals.max()),
        "converged": float(np.mean(sol.converged)),
        "residual_max": float(np.max(sol.residual)),
        "ms": 1e3 * statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-4, 1e-8])
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--float32", action="store_true", help="float32 instead of float64")
    args = parser.parse_args()
    problems = {
        "linear": linear_problem,
        "conv-small": conv_problem,
        "conv": lambda: conv_problem(batch=16, hw=16, channels=8),
    }
    with jax.enable_x64(not args.float32):
        print(f"dtype={'float32' if args.float32 else 'float64'}  devices={jax.devices()}")
        header = f"{'problem':<11} {'tol':>7} {'method':<9} {'f-evals mean':>12} {'max':>5}"
        print(header + f" {'vs picard':>9} {'conv.':>6} {'max res':>9} {'ms':>8}")
        for name, make in problems.items():
            f, z0, fargs = make()
            for tol in args.tols:
                base = None
                for method in ("picard", "anderson", "broyden"):
                    r = measure(f, z0, fargs, method, tol, args.max_steps, args.repeats)
                    base = base or r["fevals_mean"]
                    print(
                        f"{name:<11} {tol:>7.0e} {method:<9} {r['fevals_mean']:>12.1f} "
                        f"{r['fevals_max']:>5d} {base / r['fevals_mean']:>8.2f}x "
                        f"{r['converged']:>6.0%} {r['residual_max']:>9.1e} {r['ms']:>8.2f}"
                    )


if __name__ == "__main__":
    main()
