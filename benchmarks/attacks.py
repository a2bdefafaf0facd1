"""Throughput of PGD-20 and Square (Linf) on the BP-CNN: eqrobust (JAX) vs a PyTorch version.

    .venv/bin/python benchmarks/attacks.py            # defaults: batch 128, 28x28x1, (32, 64)
    .venv/bin/python benchmarks/attacks.py --queries 300 --threads 1   # quicker, 1 torch thread
    .venv/bin/python benchmarks/attacks.py --conv xla   # our model with lax.conv instead

Both sides run the same algorithm on the same weights and batch. Labels are the model's own
predictions and eps is tiny, so no example is broken and every example uses the full budget
(20 steps / all queries): the numbers are full-budget throughput, not early-exit luck.
Compilation (first call minus a timed call) is excluded from images/s; torch gets a
short warm-up run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_attacks  # noqa: E402

from eqrobust import attacks  # noqa: E402
from eqrobust.models import logits_fn  # noqa: E402
from eqrobust.models.cnn import BPCNN  # noqa: E402


def build(args) -> tuple[BPCNN, torch_attacks.TorchBPCNN]:
    """A randomly initialised BP-CNN (random BN statistics) and its torch copy."""
    model = BPCNN(in_shape=(args.size, args.size, 1), num_classes=10, channels=args.channels,
                  mean=0.3, std=0.35, conv_impl=args.conv, rngs=nnx.Rngs(0))  # fmt: skip
    rng = np.random.default_rng(0)
    for norm in model.norms:
        norm.mean[...] = jnp.asarray(rng.normal(size=norm.mean.shape) * 0.1, jnp.float32)
        norm.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, norm.var.shape), jnp.float32)
    state = nnx.to_pure_dict(nnx.state(model))
    tmodel = torch_attacks.TorchBPCNN((args.size, args.size, 1), 10, channels=args.channels)
    return model, torch_attacks.load_from_nnx(tmodel, state)


def timed(fn, repeats: int) -> float:
    """Best wall time of `repeats` calls (fn must block until its result is ready)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--eps", type=float, default=1e-4)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--conv", choices=("auto", "patches", "xla", "xla_flip"), default="auto",
                   help="BPCNN conv_impl of our side (auto: by backend and layer)")  # fmt: skip
    args = p.parse_args()
    args.channels = tuple(args.channels)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tmodel = build(args)
    f = logits_fn(model)
    x = jax.random.uniform(jax.random.key(1), (args.batch, args.size, args.size, 1))
    y = jnp.argmax(f(x), -1)
    xt, yt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)).long()
    with torch.no_grad():
        diff = np.abs(tmodel(xt).numpy() - np.asarray(f(x))).max()
    print(f"device: {jax.devices()[0].device_kind}; torch threads {torch.get_num_threads()}; "
          f"batch {args.batch}, input {args.size}x{args.size}x1, channels {args.channels}, "
          f"conv {args.conv}; "
          f"max |logits_jax - logits_torch| = {diff:.2e}")  # fmt: skip
    assert diff < 1e-3, "the torch copy of the model disagrees with the JAX model"
    key = jax.random.key(0)
    gen = torch.Generator().manual_seed(0)

    def ours_pgd():
        return jax.block_until_ready(attacks.pgd(f, x, y, key=key, eps=args.eps, steps=args.steps))

    def ours_square():
        r = attacks.square(f, x, y, key=key, eps=args.eps, queries=args.queries)
        return jax.block_until_ready(r)

    def torch_pgd(steps=args.steps):
        return torch_attacks.pgd_linf(tmodel, xt, yt, eps=args.eps, steps=steps, generator=gen)

    def torch_square(queries=args.queries):
        return torch_attacks.square_linf(tmodel, xt, yt, eps=args.eps, queries=queries,
                                         generator=gen)  # fmt: skip

    rows = []
    for name, ours, ref, budget in [
        (f"PGD-{args.steps} Linf", ours_pgd, torch_pgd, "iterations"),
        (f"Square Linf {args.queries}q", ours_square, torch_square, "queries"),
    ]:
        t = time.perf_counter()
        r = ours()  # compiles, then runs once
        first = time.perf_counter() - t
        t_ours = timed(ours, args.repeats)
        ref(2)  # warm-up with a tiny budget
        out = {}
        t_ref = timed(lambda ref=ref, out=out: out.update(r=ref()), args.repeats)
        rt = out["r"]
        rows.append((name, args.batch / t_ours, args.batch / t_ref, t_ref / t_ours,
                     first - t_ours, int(np.asarray(getattr(r, budget)).sum()), int(rt[2].sum()),
                     int(np.asarray(r.success).sum()), int(rt[1].sum())))  # fmt: skip
    print(f"{'attack':22s} {'ours img/s':>11s} {'torch img/s':>12s} {'ratio':>7s} "
          f"{'compile s':>10s} {'budget used ours/torch':>24s} {'fooled':>8s}")  # fmt: skip
    for name, a, b, ratio, comp, u, ut, s, st in rows:
        print(f"{name:22s} {a:11.1f} {b:12.1f} {ratio:6.2f}x {comp:10.1f} {u:>11d}/{ut:<12d} "
              f"{s:>3d}/{st:<3d}")  # fmt: skip
    print("ratio = ours / torch throughput (>1: eqrobust faster). Timings on a shared machine "
          "are noisy; the ratio is measured in one process.")  # fmt: skip


if __name__ == "__main__":
    main()
