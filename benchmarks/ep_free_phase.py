"""Free-phase speed: our JAX EP-CNN (one XLA program) vs a PyTorch autograd-of-Phi loop.

Run (one invocation, both frameworks, same shapes, same machine, same weights):

    .venv/bin/python benchmarks/ep_free_phase.py --net=cpu --batch=128 --steps=20
    .venv/bin/python benchmarks/ep_free_phase.py --net=paper --batch=4 --steps=10

For each network it prints, per free-phase step: JAX while-loop program (the engine's Picard,
stop="never"), the same step jitted alone and called from Python, the formulations (max pool as
reshape, conv as patches + matmul), and PyTorch (the published approach: states require grad,
autograd of Phi each step, all layers updated at once); the JAX/PyTorch ratio; and the fraction of
the FLOP floor (conv/fc FLOPs of one step divided by the dense-matmul rate measured in-process).
The two implementations are checked to reach the same states. The machine is shared: timings are
noisy, ratios taken in one process are the numbers to trust.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from eqrobust import energy, ep  # noqa: E402
from eqrobust.energy import EnergyConfig  # noqa: E402

NETS = {
    # experiments/configs/ep_cnn.py:cpu (Fashion-MNIST)
    "cpu": EnergyConfig(in_shape=(28, 28, 1), channels=(16, 32), paddings=(1, 1)),
    # experiments/configs/ep_cnn.py:paper (CIFAR-10)
    "paper": EnergyConfig(
        in_shape=(32, 32, 3),
        channels=(128, 256, 512, 512),
        paddings=(1, 1, 1, 0),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.6069, 0.5982, 0.6030),
    ),
}


def step_flops(cfg: EnergyConfig, batch: int) -> float:
    """Multiply-add FLOPs (x2) of one free-phase step: every conv/fc forward once, and the
    transposed conv/fc feeding back into every neuron layer below (none into the input)."""
    flops, h, w, cin = 0.0, *cfg.in_shape
    k = cfg.kernel_size
    for i, (c, p) in enumerate(zip(cfg.channels, cfg.paddings, strict=True)):
        hc, wc = h + 2 * p - k + 1, w + 2 * p - k + 1
        f = 2.0 * hc * wc * k * k * cin * c
        flops += f * (2 if i > 0 else 1)
        h, w, cin = hc // 2, wc // 2, c
    fin = h * w * cin
    for j, f in enumerate((*cfg.fc, *((cfg.num_classes,) if cfg.output == "mse" else ()))):
        flops += 2.0 * fin * f * (2 if (j > 0 or cfg.channels) else 1)
        fin = f
    return flops * batch


def _time(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ------------------------------------------------------------------------------------- PyTorch


class TorchEP:
    """The reference approach: Phi written in PyTorch, dPhi/ds by autograd at every step."""

    def __init__(self, params, cfg: EnergyConfig):
        self.cfg = cfg
        self.layers = []
        for i, (w, b) in enumerate(params):
            w = torch.from_numpy(np.asarray(w))
            if i < cfg.num_conv:
                w = w.permute(3, 2, 0, 1).contiguous()  # HWIO -> OIHW
            else:
                w = w.T.contiguous()  # [in, out] -> [out, in]
            self.layers.append((w, torch.from_numpy(np.asarray(b))))
        self.mean = torch.tensor(cfg.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.std).view(1, -1, 1, 1)
        self.act = {
            "my_hard_sig": lambda u: torch.clamp(0.5 * u, 0, 1),
        }[cfg.activation]

    def phi(self, x, states):
        s_prev, total = (x - self.mean) / self.std, 0.0
        nc = self.cfg.num_conv
        for i in range(nc):
            w, b = self.layers[i]
            u = torch.nn.functional.conv2d(s_prev, w, b, padding=self.cfg.paddings[i])
            total = total + (torch.nn.functional.max_pool2d(u, 2) * states[i]).sum()
            s_prev = states[i]
        for j in range(len(self.cfg.fc)):
            w, b = self.layers[nc + j]
            total = (
                total + (torch.nn.functional.linear(s_prev.flatten(1), w, b) * states[nc + j]).sum()
            )
            s_prev = states[nc + j]
        return total

    def free_phase(self, x, steps: int):
        b = x.shape[0]
        shapes = [(c, h, w) for (h, w, c) in self.cfg.conv_shapes] + [(f,) for f in self.cfg.fc]
        states = [torch.zeros(b, *s, requires_grad=True) for s in shapes]
        for _ in range(steps):
            grads = torch.autograd.grad(self.phi(x, states), states)
            states = [self.act(g).requires_grad_() for g in grads]
        return [s.detach() for s in states]


# ------------------------------------------------------------------------------------- JAX


def jax_variants(params, x, cfg: EnergyConfig, steps: int):
    """name -> callable running `steps` free-phase steps (blocking)."""
    out = {}
    for label, c in (
        ("jax while-loop (reduce_window pool, xla conv)", cfg),
        ("jax while-loop (reshape pool)", dataclasses.replace(cfg, pool="reshape")),
        ("jax while-loop (patches conv)", dataclasses.replace(cfg, conv="patches")),
        (
            "jax while-loop (reshape pool, patches conv)",
            dataclasses.replace(cfg, pool="reshape", conv="patches"),
        ),
    ):
        epc = ep.EPConfig(energy=c, t1=steps)
        f = jax.jit(lambda p, x, epc=epc: ep.free_phase(p, x, epc).z)
        out[label] = (lambda f=f: jax.block_until_ready(f(params, x)), f)
    one = jax.jit(lambda p, x, s: energy.step(p, x, s, config=cfg))

    def python_loop():
        s = energy.zero_states(cfg, x.shape[0])
        for _ in range(steps):
            s = one(params, x, s)
        return jax.block_until_ready(s)

    out["jax single jitted step, Python loop"] = (python_loop, None)
    return out


def matmul_rate() -> float:
    """Dense float32 matmul FLOP/s of this machine right now (the FLOP 'floor' reference)."""
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    t = _time(lambda: jax.block_until_ready(mm(a)), 5)
    return 2.0 * n**3 / t


def run(net: str, batch: int, steps: int, repeats: int, threads: int) -> None:
    torch.set_num_threads(threads)
    cfg = NETS[net]
    params = ep.init(jax.random.PRNGKey(0), cfg)
    x = np.random.default_rng(0).uniform(size=(batch, *cfg.in_shape)).astype(np.float32)
    xj = jnp.asarray(x)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    tep = TorchEP(params, cfg)

    # Same fixed states (correctness of the comparison).
    z_jax = jax.jit(lambda p, x: ep.free_phase(p, x, ep.EPConfig(energy=cfg, t1=steps)).z)(
        params, xj
    )
    z_t = tep.free_phase(xt, steps)
    diff = max(
        float(np.abs(np.asarray(a) - b.permute(0, 2, 3, 1).numpy()).max())
        for a, b in zip(z_jax, z_t, strict=True)
    )

    flops = step_flops(cfg, batch)
    peak = matmul_rate()
    print(
        f"\n== {net} network {cfg.channels} paddings {cfg.paddings}, input {cfg.in_shape}, "
        f"batch {batch}, {steps} steps; {flops / 1e9:.3f} GFLOP/step; "
        f"in-process matmul rate {peak / 1e9:.1f} GFLOP/s; JAX vs PyTorch max |s| diff {diff:.2e}"
    )
    t_torch = _time(lambda: tep.free_phase(xt, steps), repeats) / steps
    rows = {"pytorch autograd-of-Phi loop": t_torch}
    for label, (fn, _) in jax_variants(params, xj, cfg, steps).items():
        rows[label] = _time(fn, repeats) / steps
    base = rows["jax while-loop (reduce_window pool, xla conv)"]
    for label, t in rows.items():
        print(
            f"  {label:48s} {1 / t:8.1f} steps/s  {t * 1e3:8.2f} ms/step  "
            f"torch/this {t_torch / t:5.2f}  FLOP-floor fraction {flops / t / peak:5.3f}"
        )
    print(f"  ratio JAX (default) / PyTorch speed: {t_torch / base:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", choices=sorted(NETS), action="append")
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    nets = a.net or ["cpu", "paper"]
    batches = a.batch or [128 if n == "cpu" else 4 for n in nets]
    if len(batches) != len(nets):
        raise ValueError("give one --batch per --net (or none)")
    print(f"jax {jax.__version__}, torch {torch.__version__}, torch threads {a.threads}")
    for n, b in zip(nets, batches, strict=True):
        run(n, b, a.steps, a.repeats, a.threads)


if __name__ == "__main__":
    main()
