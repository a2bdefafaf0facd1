"""Prediction agreement of cheaper EP free phases with a trained EP-CNN's own prediction.

    python -m benchmarks.ep_agreement --workdir=runs/ep_cnn --config=cpu --num=10000
    python -m benchmarks.ep_agreement --workdir=runs/ep_cnn --split=train --async_steps=6,7,8

Choose the cheaper setting on training images (`--split=train`: agreement needs no labels, so
no test image takes part in the choice), then report its agreement on the test images.

Loads a finished EP training run and compares, on the first `num` images, the T1-step
synchronous float32 prediction with: bfloat16 states and energy, even/odd (asynchronous) updates
at fewer steps, and convergence stopping. Prints agreement, accuracy, steps, the median residual
and the wall time relative to the reference on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from eqrobust import energy, ep
from eqrobust.configs import ep_cnn
from eqrobust.train import ep as ep_train


def _runner(cfg: ep.EPConfig, params, x: np.ndarray, dtype, batch: int):
    @jax.jit
    def f(p, xb):
        sol = ep.free_phase(p, xb.astype(dtype), cfg)
        return energy.readout(p, sol.z, cfg.energy).astype(jnp.float32), sol.steps, sol.residual

    p = jax.tree.map(lambda a: a.astype(dtype), params)
    chunks = [x[i : i + batch] for i in range(0, len(x), batch)]
    jax.block_until_ready(f(p, chunks[0]))  # compile
    t = time.perf_counter()
    out = [jax.block_until_ready(f(p, c)) for c in chunks]
    t = time.perf_counter() - t
    return tuple(np.concatenate([np.asarray(o[i]) for o in out]) for i in range(3)) + (t,)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="runs/ep_cnn")
    ap.add_argument("--config", default="cpu")
    ap.add_argument("--num", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--async_steps", default="4,5,6,8,10")
    ap.add_argument("--split", choices=("test", "train"), default="test")
    a = ap.parse_args()
    config = ep_cnn.get_config(a.config)
    params = ep_train.train(config, a.workdir).state["params"]  # finished run: loads it
    ds = ep_train.load_data(config)
    cfg = ep_train.build_ep_config(config, ds)
    images, labels = (ds.x_test, ds.y_test) if a.split == "test" else (ds.x_train, ds.y_train)
    x = np.asarray(images[: a.num], np.float32) / 255.0
    y = np.asarray(labels[: a.num])
    ref, _, res, t_ref = _runner(cfg, params, x, jnp.float32, a.batch)
    pred = ref.argmax(-1)
    print(f"reference: synchronous float32 T={cfg.t1}: accuracy {np.mean(pred == y):.4f}, "
          f"median residual {np.median(res):.1e}, {t_ref:.2f} s for {len(x)} {a.split} "
          "images")  # fmt: skip
    rows = [(f"bfloat16 T={cfg.t1}", cfg, jnp.bfloat16)]
    for t in (int(s) for s in a.async_steps.split(",")):
        rows.append((f"even/odd T={t}", dataclasses.replace(cfg, t1=t, update="async"), None))
    for tol in (1e-2, 1e-3):
        c = dataclasses.replace(cfg, free_stop="converged", free_tol=tol)
        rows.append((f"converged tol {tol:g} (max {cfg.t1})", c, None))
    for name, c, dtype in rows:
        logits, steps, res, t = _runner(c, params, x, dtype or jnp.float32, a.batch)
        p = logits.argmax(-1)
        print(f"{name:28s} agreement {np.mean(p == pred):.4f}  accuracy {np.mean(p == y):.4f}  "
              f"steps {steps.mean():5.1f}  median residual {np.median(res):.1e}  "
              f"time x{t_ref / t:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
