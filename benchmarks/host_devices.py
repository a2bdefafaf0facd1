"""One attack through a trained model, one chunk on XLA:CPU's single device against two half
chunks on two host devices run concurrently (`ops.run_chunked(devices=...)`, `host.split_cpu`).

    python -m benchmarks.host_devices --workdir=runs/demo/ep_cnn --attack=square_linf --n=100

Each mode runs in its own process (the device count is fixed when JAX starts), alternating,
`--repeats` rounds; prints wall and process CPU seconds per call (after a compiling call) and
the load average.
The parent process only starts the children (it imports JAX but runs nothing on it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from eqrobust import ops
from eqrobust.attacks import registry
from eqrobust.configs import study
from eqrobust.train import get_trainer
from eqrobust.train.supervised import load_data

SETTINGS = {
    "pgd_linf": dict(steps=50, step_fraction=0.25, step_size=None, random_start=True, restarts=1),
    "square_linf": dict(queries=500, p_init=0.8),
    "autoattack_linf": dict(version="standard", steps=20, queries=500, targets=3),
}


def _child(args: argparse.Namespace) -> None:
    cfg = study.get_config("cpu").models[args.model]
    clf = get_trainer(cfg.trainer)(cfg, args.workdir).classifier
    d = load_data(cfg)
    x = np.asarray(d.x_test[: args.n], np.float32) / 255.0
    y = np.asarray(d.y_test[: args.n])
    spec, st = registry.get(args.attack), SETTINGS[args.attack]
    devs = jax.devices()
    fns = {dv.id: ops.place(clf.logits_fn, dv) for dv in devs}

    def fn(xb, yb, k):
        return spec.run(fns[ops.device_of(xb).id], xb, yb, key=k, value=8 / 255, **st)

    def call():
        ops.run_chunked(fn, x, y, batch_size=args.n, key=jax.random.key(0), devices=devs)

    call()  # compiles
    t, c = time.perf_counter(), time.process_time()
    call()
    print(f"{len(devs)} {time.perf_counter() - t:.2f} {time.process_time() - c:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="a trained run of the cpu study's model")
    ap.add_argument("--model", default="ep_cnn", help="key in study.py:cpu's models")
    ap.add_argument("--attack", default="square_linf", choices=sorted(SETTINGS))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    rows: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for count in (1, 2):
            env = dict(os.environ, JAX_PLATFORMS="cpu")
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.host_devices", "--child", *sys.argv[1:]],
                env=env, capture_output=True, text=True, check=True,
            ).stdout.split()[-3:]  # fmt: skip
            rows[count].append((float(out[1]), float(out[2])))
            load = os.getloadavg()[0]
            print(f"{count} device(s): {out[1]} s wall, {out[2]} s CPU; load {load:.1f}")
    for count, r in rows.items():
        wall = [w for w, _ in r]
        print(f"{count} device(s): median wall {statistics.median(wall):.2f} s, range "
              f"{min(wall):.2f}-{max(wall):.2f} s over {len(r)} rounds")  # fmt: skip


if __name__ == "__main__":
    main()
