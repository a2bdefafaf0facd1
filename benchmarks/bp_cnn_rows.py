"""Per-image cost of the cpu BP-CNN's forward pass and input gradient, where the attacks run them.

    .venv/bin/python -m benchmarks.bp_cnn_rows --repeats=9

AutoAttack on the BP-CNN (`benchmarks/autoattack_cpu.py`) is a few million forward passes
(Square) and input gradients (APGD, APGD-T, FAB-T) inside compiled while loops. This times
them per image: the cpu study's BP-CNN (Fashion-MNIST 28x28, channels 16-32, random weights),
batch 250, 9 calls (2250 images), in two ways:

- as 9 separate jitted calls (what a microbenchmark usually measures);
- inside one `lax.fori_loop` of 9 iterations, each depending on the last (what the attacks run);

for each conv formulation (`"patches"`; `"xla"`, `lax.conv`; `"xla_flip"`, `lax.conv` with the
input gradient as a forward conv of the flipped kernel; `"auto"`, the CPU default: patches for
the first conv, xla_flip for the second), against PyTorch at 1 and 2 intra-op threads (forward
under `no_grad`; gradient by `backward()`).
The FLOP floor line is the model's multiply-adds at the in-process float32 matmul rate.
Protocol: `benchmarks/fair.py` (alternating rounds, median and spread, load).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from jax import lax

from benchmarks import fair, torch_attacks
from benchmarks.ep_free_phase import matmul_rate
from eqrobust import models
from eqrobust.models.cnn import BPCNN

BATCH, CALLS, SHAPE, CHANNELS = 250, 9, (28, 28, 1), (16, 32)


def _macs() -> int:
    """Multiply-adds of one image's forward pass (3x3 convs, padding 1, 2x2 pools, head)."""
    h, w, c, total = *SHAPE, 0
    for co in CHANNELS:
        total += h * w * co * 9 * c
        h, w, c = h // 2, w // 2, co
    return total + h * w * c * 10


def _jax_candidates(x: jax.Array, y: jax.Array) -> dict:
    out = {}
    for impl in ("patches", "xla", "xla_flip", "auto"):
        m = BPCNN(
            in_shape=SHAPE, num_classes=10, channels=CHANNELS, conv_impl=impl, rngs=nnx.Rngs(0)
        )
        m.eval()
        f = models.logits_fn(m)
        g = jax.grad(lambda z, f=f: jnp.sum(jax.nn.log_softmax(f(z))[jnp.arange(BATCH), y]))
        fwd1, grad1 = jax.jit(f), jax.jit(g)

        @jax.jit
        def fwd_loop(h, f=f):  # each iteration's input depends on the last one's output
            body = lambda i, c: c + 1e-9 * f(h + c)[:, :1, None, None]  # noqa: E731
            return lax.fori_loop(0, CALLS, body, jnp.zeros((BATCH, 1, 1, 1)))

        @jax.jit
        def grad_loop(h, g=g):
            return lax.fori_loop(0, CALLS, lambda i, c: c + 1e-9 * g(h + c), jnp.zeros_like(h))

        out[f"jax {impl} forward, 9 calls"] = lambda f=fwd1: [
            f(x).block_until_ready() for _ in range(CALLS)
        ]
        out[f"jax {impl} forward, in a loop"] = lambda f=fwd_loop: f(x).block_until_ready()
        out[f"jax {impl} gradient, 9 calls"] = lambda f=grad1: [
            f(x).block_until_ready() for _ in range(CALLS)
        ]
        out[f"jax {impl} gradient, in a loop"] = lambda f=grad_loop: f(x).block_until_ready()
    return out


def _torch_candidates(x: np.ndarray, y: np.ndarray, threads: list[int]) -> dict:
    tm = torch_attacks.TorchBPCNN(SHAPE, 10, CHANNELS, (1, 1)).eval()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()

    def fwd(t):
        torch.set_num_threads(t)
        with torch.no_grad():
            for _ in range(CALLS):
                tm(xt)

    def grad(t):
        torch.set_num_threads(t)
        for _ in range(CALLS):
            z = xt.clone().requires_grad_(True)
            torch.nn.functional.cross_entropy(tm(z), yt, reduction="sum").backward()

    out = {}
    for t in threads:
        out[f"torch {t} thread(s) forward"] = lambda t=t: fwd(t)
        out[f"torch {t} thread(s) gradient"] = lambda t=t: grad(t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", default="1,2", help="PyTorch intra-op thread settings")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(BATCH, *SHAPE)).astype(np.float32)
    y = rng.integers(0, 10, BATCH).astype(np.int32)
    fns = _jax_candidates(jnp.asarray(x), jnp.asarray(y))
    fns.update(_torch_candidates(x, y, [int(t) for t in args.threads.split(",")]))
    res = fair.alternate(fns, args.repeats)
    rows = BATCH * CALLS
    print(f"cpu BP-CNN, batch {BATCH}, {CALLS} calls = {rows} images; per image (us):")
    for name, t in res.items():
        print(f"  {name:36s} {1e6 * t.median / rows:7.1f} us  ({t.fmt()})")
    flop = 2 * _macs()
    rate = matmul_rate()
    print(f"  FLOP floor of a forward pass: {flop / 1e6:.2f} MFLOP at {rate / 1e9:.0f} GFLOP/s "
          f"(in-process matmul) = {1e6 * flop / rate:.1f} us")  # fmt: skip
    for kind in ("forward", "gradient"):
        ours = fair.best({k: v for k, v in res.items() if kind in k and "loop" in k}, "jax")
        ref = fair.best({k: v for k, v in res.items() if kind in k}, "torch")
        print(f"  {kind}: " + fair.ratio_line(ours, ref))
    print(f"  load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
