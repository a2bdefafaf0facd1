"""Free-phase speed: our JAX EP-CNN (one XLA program) vs a PyTorch autograd-of-Phi loop.

Run (one invocation, both frameworks, same shapes, same machine, same weights; the fair protocol
of benchmarks/fair.py: PyTorch at 1 and 2 threads, alternating runs, medians, load):

    .venv/bin/python -m benchmarks.ep_free_phase --net=cpu --batch=64 --steps=15 --train --pgd
    .venv/bin/python -m benchmarks.ep_free_phase --net=cpu --batch=64 --steps=15 \
        --async_steps=8 --train --pgd
    .venv/bin/python -m benchmarks.ep_free_phase --net=paper --batch=4 --steps=10 --async_steps=5
    .venv/bin/python -m benchmarks.ep_free_phase --net=cpu --batch=64 --steps=15 --xla_threads=1
    .venv/bin/python -m benchmarks.ep_free_phase --net=cpu --batch=64 --steps=15 --bptt

On a trained model (accuracy along the free phase; f-evals of convergence stopping, Anderson and
Broyden to match the 250-step Picard prediction):

    .venv/bin/python benchmarks/ep_free_phase.py --workdir=runs/ep_cnn --config=cpu

For each network it prints, per free-phase step: JAX while-loop program (the engine's Picard,
stop="never"), the same step jitted alone and called from Python, the formulations (max pool as
reshape, conv as patches + matmul), and PyTorch (the published approach: states require grad,
autograd of Phi each step, all layers updated at once); the JAX/PyTorch ratio; and the fraction of
the FLOP floor (conv/fc FLOPs of one step divided by the dense-matmul rate measured in-process).
The two implementations are checked to reach the same states. The machine is shared: timings are
noisy, ratios taken in one process are the numbers to trust.

With --bptt it times exact BPTT through the synchronous free phase, `energy.run_sync` against
autodiff of the plain loop of `energy.step`, same process, alternating.

With --async_steps=N it also times the model's prediction (`--steps` synchronous steps, or N
even/odd sweeps, on both sides: PyTorch's best scheme and thread count is the reference), and
repeats --train and --pgd with even/odd sweeps (T1=N, T2 scaled alike) on both sides.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

from benchmarks import fair

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if __name__ == "__main__":  # XLA's thread pool is fixed when jax starts
    _xt = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--xla_threads=")]
    fair.xla_threads(int(_xt[-1]) if _xt else None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from benchmarks.torch_ep import TorchEP  # noqa: E402
from eqrobust import attacks, energy, ep  # noqa: E402
from eqrobust.energy import EnergyConfig, step_flops  # noqa: E402

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


def _time(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ------------------------------------------------------------------------------------- JAX


VARIANTS = (
    # label, pool, conv
    ("jax while-loop, reduce_window pool + xla conv", "reduce_window", "xla"),
    ("jax while-loop, slice pool + xla conv", "reshape", "xla"),
    ("jax while-loop, reduce_window pool + patches conv", "reduce_window", "patches"),
    ("jax while-loop, slice pool + xla_flip conv", "reshape", "xla_flip"),
    ("jax while-loop, slice pool + patches conv [default]", "reshape", "patches"),
)
DEFAULT = VARIANTS[-1][0]


def jax_variants(params, x, cfg: EnergyConfig, steps: int):
    """label -> callable running `steps` free-phase steps (blocking)."""
    out = {}
    for label, pool, conv in VARIANTS:
        epc = ep.EPConfig(energy=dataclasses.replace(cfg, pool=pool, conv=conv), t1=steps)
        f = jax.jit(lambda p, x, epc=epc: ep.free_phase(p, x, epc).z)
        out[label] = lambda f=f: jax.block_until_ready(f(params, x))
    for label, pool, conv in (VARIANTS[0], VARIANTS[-1]):
        c = dataclasses.replace(cfg, pool=pool, conv=conv)
        one = jax.jit(lambda p, x, s, c=c: energy.step(p, x, s, config=c))

        def python_loop(one=one, c=c):
            s = energy.zero_states(c, x.shape[0])
            for _ in range(steps):
                s = one(params, x, s)
            return jax.block_until_ready(s)

        out[label.replace("while-loop", "single jitted step + Python loop")] = python_loop
    return out


def matmul_rate() -> float:
    """Dense float32 matmul FLOP/s of this machine right now (the FLOP 'floor' reference)."""
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    t = _time(lambda: jax.block_until_ready(mm(a)), 5)
    return 2.0 * n**3 / t


def run(net: str, batch: int, steps: int, repeats: int, threads: list[int]) -> None:
    """Free phase, fair protocol (benchmarks/fair.py): PyTorch at each thread count in
    `threads` and our variants alternate; medians, spreads, load; best vs best."""
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
        f"\n== free phase, {net} network {cfg.channels} paddings {cfg.paddings}, input "
        f"{cfg.in_shape}, batch {batch}, {steps} steps; {flops / 1e9:.3f} GFLOP/step; "
        f"in-process matmul rate {peak / 1e9:.1f} GFLOP/s; JAX vs PyTorch max |s| diff {diff:.2e}"
    )
    fns = {}
    for n in threads:
        fns[f"pytorch autograd-of-Phi loop, {n} thread(s)"] = lambda n=n: (
            torch.set_num_threads(n),
            tep.free_phase(xt, steps),
        )
    fns.update(jax_variants(params, xj, cfg, steps))
    res = fair.alternate(fns, repeats)
    for label, t in res.items():
        print(
            f"  {label:70s} {steps / t.median:8.1f} steps/s  {t.fmt(per=steps)}/step  "
            f"FLOP-floor fraction {flops * steps / t.median / peak:5.3f}"
        )
    print("  " + fair.ratio_line(fair.best(res, "jax"), fair.best(res, "pytorch")))


def run_prediction(
    net: str, batch: int, steps: int, async_steps: int, repeats: int, threads: list[int]
) -> None:
    """Time to the model's prediction: its `steps`-step synchronous free phase, or `async_steps`
    even/odd sweeps (`update="async"`; `benchmarks/ep_agreement.py` measures how often the two
    predictions agree on a trained model), on each side; PyTorch's best of both schemes and
    thread counts is the reference."""
    cfg = NETS[net]
    params = ep.init(jax.random.PRNGKey(0), cfg)
    x = np.random.default_rng(0).uniform(size=(batch, *cfg.in_shape)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    tep = TorchEP(params, cfg)
    rows = (("synchronous", "sync", steps), ("even/odd", "async", async_steps))
    fns, diffs = {}, []
    for name, update, t in rows:
        epc = ep.EPConfig(energy=cfg, t1=t, update=update)
        f = jax.jit(lambda p, x, epc=epc: ep.predict(p, x, epc))
        fns[f"jax {name}, T={t}"] = lambda f=f: jax.block_until_ready(f(params, x))
        want = tep.readout(tep.free_phase(xt, t, update)[-1]).numpy()
        diffs.append(f"{name} {float(np.abs(np.asarray(f(params, x)) - want).max()):.1e}")
    for n in threads:
        for name, update, t in rows:
            fns[f"pytorch {name}, T={t}, {n} thread(s)"] = lambda n=n, t=t, u=update: (
                torch.set_num_threads(n),
                tep.free_phase(xt, t, u),
            )
    res = fair.alternate(fns, repeats)
    print(
        f"\n== time to the prediction, {net} network, batch {batch}; max |logit| difference "
        f"JAX vs PyTorch: {', '.join(diffs)}"
    )
    for label, t in res.items():
        print(f"  {label:45s} {batch / t.median:8.1f} images/s  {t.fmt()}/prediction")
    print("  " + fair.ratio_line(fair.best(res, "jax even/odd"), fair.best(res, "pytorch")))
    print("  " + fair.ratio_line(fair.best(res, "jax synchronous"), fair.best(res, "pytorch")))


def run_training(
    net: str, batch: int, t1: int, t2: int, repeats: int, threads: list[int], update="sync"
):
    """EP training step (free + two nudged phases + EP gradient + SGD), fair protocol."""
    cfg = NETS[net]
    epc = ep.EPConfig(energy=cfg, t1=t1, t2=t2, beta=0.5, update=update)
    params = ep.init(jax.random.PRNGKey(0), cfg)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(batch, *cfg.in_shape)).astype(np.float32)
    y = rng.integers(0, cfg.num_classes, batch).astype(np.int32)
    lrs = (0.2, 0.1, 0.05, 0.05, 0.05)[: len(params)]
    tx = optax.multi_transform(
        {f"l{i}": optax.chain(optax.add_decayed_weights(3e-4), optax.sgd(lr, momentum=0.9))
         for i, lr in enumerate(lrs)},
        tuple(energy.Layer(f"l{i}", f"l{i}") for i in range(len(params))),
    )  # fmt: skip

    @jax.jit
    def step(p, opt, x, y):
        grads, _ = ep.ep_gradient(p, x, y, epc)
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt

    opt = tx.init(params)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(y).long()
    tep = TorchEP(params, cfg)
    fns = {"jax training step (one XLA program)": lambda: jax.block_until_ready(
        step(params, opt, x, y))}  # fmt: skip
    for n in threads:
        fns[f"pytorch training step, {n} thread(s)"] = lambda n=n: (
            torch.set_num_threads(n),
            tep.train_step(xt, yt, t1, t2, 0.5, lrs, update=update),
        )
    res = fair.alternate(fns, repeats)
    print(f"\n== EP training step, {net} network, batch {batch}, T1={t1} T2={t2}, {update}")
    for label, t in res.items():
        print(f"  {label:50s} {batch / t.median:8.1f} images/s  {t.fmt()}/step")
    print("  " + fair.ratio_line(fair.best(res, "jax"), fair.best(res, "pytorch")))


def run_pgd(
    net: str, batch: int, steps: int, repeats: int, threads: list[int], update="sync"
) -> None:
    """PGD-20 (Linf) through the EP-CNN's `steps`-step free phase with the exact (BPTT) gradient:
    ours vs torchattacks' PGD on the PyTorch EP model, same weights and images. Labels are the
    model's predictions and eps is tiny, so every image uses all 20 steps on both sides."""
    import torchattacks  # the bench extra

    cfg = NETS[net]
    epc = ep.EPConfig(energy=cfg, t1=steps, update=update)
    params = ep.init(jax.random.PRNGKey(0), cfg, scale=2.0)  # image-dependent logits
    x = np.random.default_rng(0).uniform(size=(batch, *cfg.in_shape)).astype(np.float32)
    clf = ep.classifier(params, epc)
    y = np.asarray(jnp.argmax(jax.jit(clf.logits_fn)(x), -1))
    key, eps = jax.random.PRNGKey(0), 1e-5
    tm = TorchEP(params, cfg).classifier(steps, update).eval()
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    yt = torch.from_numpy(y).long()
    atk = torchattacks.PGD(tm, eps=eps, alpha=eps / 8, steps=20)

    def ours():
        return jax.block_until_ready(attacks.pgd(clf.logits_fn, x, y, key=key, eps=eps).x_adv)

    fns = {"jax PGD-20 (exact BPTT)": ours}
    for n in threads:
        fns[f"torchattacks PGD-20, {n} thread(s)"] = lambda n=n: (
            torch.set_num_threads(n),
            atk(xt, yt),
        )
    res = fair.alternate(fns, repeats)
    print(f"\n== PGD-20 through the free phase, {net} network, batch {batch}, T={steps}, {update}")
    for label, t in res.items():
        print(f"  {label:50s} {batch / t.median:8.1f} images/s  {t.fmt()}/attack")
    print("  " + fair.ratio_line(fair.best(res, "jax"), fair.best(res, "torchattacks")))


def run_bptt(net: str, batch: int, steps: int, repeats: int) -> None:
    """Exact BPTT through the synchronous free phase: `energy.run_sync`'s reverse loop against
    autodiff of the plain loop of `energy.step` (what `_plain_phase` ran before), for the input
    gradient of a cross-entropy (one PGD step) and for input and params; alternating, same
    process. Prints the gradients' largest difference and run_sync's tape size."""
    cfg = NETS[net]
    params = ep.init(jax.random.PRNGKey(0), cfg, scale=2.0)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(batch, *cfg.in_shape)), jnp.float32)

    def plain(p, x):
        s = energy.from_zero(p, x, cfg)
        body = lambda _, s: energy.step(p, x, s, config=cfg)  # noqa: E731
        return energy.readout(p, jax.lax.fori_loop(1, steps, body, s), cfg)

    def ours(p, x):
        return energy.readout(p, energy.run_sync(p, x, None, steps, config=cfg), cfg)

    y = jnp.argmax(jax.jit(plain)(params, x), -1)

    def ce(f):
        return lambda p, x: -jnp.sum(jax.nn.log_softmax(f(p, x))[jnp.arange(batch), y])

    fns, grads = {}, {}
    for name, f in (("autodiff of the plain loop", plain), ("run_sync", ours)):
        for what, argnums in (("input", 1), ("input + params", (0, 1))):
            g = jax.jit(jax.grad(ce(f), argnums))
            grads[name, what] = g(params, x)
            fns[f"{name}, gradient w.r.t. {what}"] = lambda g=g: jax.block_until_ready(g(params, x))
        fwd = jax.jit(f)
        fns[f"{name}, forward only"] = lambda fwd=fwd: jax.block_until_ready(fwd(params, x))
    diff = max(
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
        for what in ("input", "input + params")
        for a, b in zip(
            jax.tree.leaves(grads["autodiff of the plain loop", what]),
            jax.tree.leaves(grads["run_sync", what]),
            strict=True,
        )
    )
    n = len(cfg.state_shapes)
    state = sum(math.prod(shp) for shp in cfg.state_shapes) * 4  # bytes of one state, float32
    routes = sum(4 * math.prod(cfg.conv_shapes[i]) for i in range(1, cfg.num_conv))
    res = fair.alternate(fns, repeats)
    print(
        f"\n== BPTT through {steps} synchronous steps, {net} network, batch {batch}, {n} layers; "
        f"largest relative gradient difference {diff:.1e}; run_sync's tape "
        f"{batch * (steps * state + (steps - 1) * routes) / 2**20:.1f} MiB"
    )
    for label, t in res.items():
        print(f"  {label:60s} {t.fmt()}")
    for what in ("input", "input + params"):
        print(
            f"  {what}: "
            + fair.ratio_line(
                fair.best(res, f"run_sync, gradient w.r.t. {what}"),
                fair.best(res, f"autodiff of the plain loop, gradient w.r.t. {what}"),
            )
        )


def convergence_study(config_name: str, workdir: str, num: int, batch: int, t_ref: int) -> None:
    """On a trained model: test accuracy along the free phase, and the energy-gradient
    evaluations convergence stopping / Anderson / Broyden need to match the t_ref-step Picard
    prediction."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # experiments/
    from eqrobust.configs import ep_cnn
    from eqrobust.train import ep as ep_train

    config = ep_cnn.get_config(config_name)
    trained = ep_train.train(config, workdir)  # finished run: loads the last checkpoint
    params = trained.state["params"]
    ds = ep_train.load_data(config)
    cfg = ep_train.build_ep_config(config, ds)
    x_all = np.asarray(ds.x_test[:num], np.float32) / 255.0
    y_all = np.asarray(ds.y_test[:num])
    traj = jax.jit(lambda p, x: jnp.argmax(ep.trajectory(p, x, cfg, steps=t_ref), -1))
    preds = np.concatenate(
        [np.asarray(traj(params, x_all[i : i + batch])) for i in range(0, num, batch)], axis=1
    )  # [T, N]
    acc = (preds == y_all[None]).mean(1)
    ref = preds[-1]
    marks = [
        t
        for t in (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 75, 100, 150, 200, 250)
        if t <= t_ref
    ]
    print(
        f"\n== accuracy along the free phase ({config_name}, trained t1={cfg.t1}; "
        f"{num} test images)"
    )
    print("  step  " + " ".join(f"{t:6d}" for t in marks))
    print("  acc   " + " ".join(f"{acc[t - 1]:6.4f}" for t in marks))
    print(
        f"  agreement of step-t prediction with step-{t_ref}: "
        + " ".join(f"{t}:{(preds[t - 1] == ref).mean():.4f}" for t in marks)
    )
    print(f"\n== f-evals to match the {t_ref}-step Picard prediction (mean/max per example)")
    for method in ("picard", "anderson", "broyden"):
        for tol in (1e-2, 1e-3, 1e-4):
            c = dataclasses.replace(
                cfg, t1=t_ref, free_method=method, free_stop="converged", free_tol=tol
            )
            run = jax.jit(
                lambda p, x, c=c: (
                    lambda s: (
                        jnp.argmax(energy.readout(p, s.z, c.energy), -1),
                        s.steps,
                        s.converged,
                    )
                )(ep.free_phase(p, x, c))
            )
            out = [run(params, x_all[i : i + batch]) for i in range(0, num, batch)]
            pred = np.concatenate([np.asarray(o[0]) for o in out])
            steps = np.concatenate([np.asarray(o[1]) for o in out])
            conv = np.concatenate([np.asarray(o[2]) for o in out])
            print(
                f"  {method:9s} tol {tol:.0e}: f-evals mean {steps.mean() + 1:6.1f} max "
                f"{steps.max() + 1:4d}; agreement with Picard-{t_ref} {(pred == ref).mean():.4f};"
                f" accuracy {(pred == y_all).mean():.4f}; converged {conv.mean():.3f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", choices=sorted(NETS), action="append")
    ap.add_argument("--batch", type=int, action="append")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5, help="alternating rounds (median)")
    ap.add_argument("--threads", default="1,2", help="PyTorch thread counts to try")
    ap.add_argument("--xla_threads", type=int, help="1: XLA:CPU on one thread (default: all)")
    ap.add_argument("--train", action="store_true", help="also the EP training step")
    ap.add_argument("--pgd", action="store_true", help="also PGD-20 vs torchattacks")
    ap.add_argument(
        "--bptt", action="store_true",
        help="also exact BPTT: energy.run_sync against autodiff of the plain loop",
    )  # fmt: skip
    ap.add_argument("--t2", type=int, default=6, help="nudged steps of the training step")
    ap.add_argument(
        "--async_steps", type=int, default=0,
        help="also the time to the prediction: --steps synchronous vs this many even/odd sweeps",
    )  # fmt: skip
    ap.add_argument("--workdir", help="trained EP run: run the convergence study on it instead")
    ap.add_argument("--config", default="cpu", help="ep_cnn.py scale of --workdir")
    ap.add_argument("--num", type=int, default=2000, help="test images for the study")
    ap.add_argument("--t_ref", type=int, default=250)
    a = ap.parse_args()
    if a.workdir:
        convergence_study(a.config, a.workdir, a.num, 200, a.t_ref)
        return
    nets = a.net or ["cpu", "paper"]
    batches = a.batch or [128 if n == "cpu" else 4 for n in nets]
    if len(batches) != len(nets):
        raise ValueError("give one --batch per --net (or none)")
    threads = [int(t) for t in a.threads.split(",")]
    print(
        f"jax {jax.__version__} (XLA threads: {a.xla_threads or 'default'}), torch "
        f"{torch.__version__} (threads tried: {threads}); load {os.getloadavg()[0]:.1f}"
    )
    for n, b in zip(nets, batches, strict=True):
        run(n, b, a.steps, a.repeats, threads)
        if a.async_steps:
            run_prediction(n, b, a.steps, a.async_steps, a.repeats, threads)
        if a.train:
            run_training(n, b, a.steps, a.t2, a.repeats, threads)
            if a.async_steps:
                t2 = max(1, round(a.t2 * a.async_steps / a.steps))
                run_training(n, b, a.async_steps, t2, a.repeats, threads, update="async")
        if a.bptt:
            run_bptt(n, b, a.steps, a.repeats)
        if a.pgd:
            run_pgd(n, b, a.steps, a.repeats, threads)
            if a.async_steps:
                run_pgd(n, b, a.async_steps, a.repeats, threads, update="async")


if __name__ == "__main__":
    main()
