"""Where the cpu DEQ's time goes: GroupNorm and 3x3 convolutions, JAX against PyTorch.

    python -m benchmarks.deq_ops [--batch 96] [--devices 1|2]

Times (ms per call, median of 5 rounds) one GroupNorm (ours, the textbook 5-d reduction it
replaced, torch) and a 3x3 convolution forward and forward+backward (XLA, torch 1 and 2 threads)
at the cpu DEQ's shapes. `--devices 2` splits XLA's host into two devices and shards the batch
over them (data parallelism; set before JAX starts), the measured way to use both cores for
convolutions, which XLA:CPU runs on one thread. Results: BUILD_NOTES "DEQ against torchdeq (CPU)".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable


def _ms(fn: Callable[[], object], n: int = 30) -> float:
    fn()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        ts.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--devices", type=int, default=1)
    a = ap.parse_args()
    if "jax" in sys.modules:
        raise RuntimeError("run as a script: XLA_FLAGS must be set before jax starts")
    if a.devices > 1:
        flag = f"--xla_force_host_platform_device_count={a.devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from eqrobust.models.deq import conv2d, group_norm

    def gn_5d(x, groups):  # the formulation group_norm replaced
        b, h, w, c = x.shape
        xg = x.reshape(b, h, w, groups, c // groups)
        mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
        return ((xg - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(b, h, w, c)

    mesh = Mesh(np.array(jax.devices()), ("b",))
    put = lambda v, spec: jax.device_put(v, NamedSharding(mesh, spec))  # noqa: E731
    bl = jax.block_until_ready
    r = np.random.RandomState(0)
    n_dev, load = len(jax.devices()), os.getloadavg()[0]
    print(f"batch {a.batch}, {n_dev} XLA host device(s), load {load:.2f}")
    for h, ci, co in [(14, 16, 32), (14, 32, 16), (7, 32, 64), (7, 64, 32)]:
        x = r.randn(a.batch, h, h, ci).astype(np.float32)
        w = r.randn(3, 3, ci, co).astype(np.float32)
        y = r.randn(a.batch, h, h, co).astype(np.float32)
        xj, wj, yj = put(x, P("b")), put(w, P()), put(y, P("b"))
        conv = jax.jit(conv2d)
        conv_g = jax.jit(jax.grad(lambda p, q: jnp.sum(conv2d(p, q) ** 2), argnums=(0, 1)))
        gn, gn5 = jax.jit(lambda v: group_norm(v, 8)), jax.jit(lambda v: gn_5d(v, 8))
        row = (
            f"{h}x{h} {ci}->{co}: XLA conv {_ms(lambda: bl(conv(xj, wj))):.2f} "
            f"fwd+bwd {_ms(lambda: bl(conv_g(xj, wj))):.2f} | "
            f"GN ours {_ms(lambda: bl(gn(yj))):.3f} "
            f"5-d {_ms(lambda: bl(gn5(yj))):.3f}"
        )
        xt = torch.tensor(x).permute(0, 3, 1, 2).contiguous().requires_grad_()
        wt = torch.tensor(w).permute(3, 2, 0, 1).contiguous().requires_grad_()
        yt = torch.tensor(y).permute(0, 3, 1, 2).contiguous()
        for th in (1, 2):
            torch.set_num_threads(th)
            with torch.no_grad():
                tf = _ms(lambda: torch.nn.functional.conv2d(xt, wt, padding=1))
                tg = _ms(lambda: torch.nn.functional.group_norm(yt, 8))

            def tb():
                out = torch.nn.functional.conv2d(xt, wt, padding=1)
                torch.autograd.grad((out**2).sum(), (xt, wt))

            row += f" | torch {th}t conv {tf:.2f} fwd+bwd {_ms(tb):.2f} GN {tg:.3f}"
        print(row)


if __name__ == "__main__":
    main()
