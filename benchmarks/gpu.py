"""Paper scale on one GPU: EP-CNN training and free phase, attacks and DEQ-Large, against PyTorch on
the same device, in one run (issue 16).

Run (on a GPU machine; CIFAR-shaped generated data: throughput, not accuracy, is measured):

    python -m benchmarks.gpu --json=gpu.json            # or: make bench-gpu
    python -m benchmarks.gpu --dry-run                  # tiny sizes on CPU (the test suite runs it)

Sections (--sections=ep,attacks,deq):
  ep       EP-CNN paper network (128-256-512-512, T1=250, T2=30, batch 128, symmetric nudging):
           JAX and PyTorch (the published approach: autograd of Phi each step, `torch_ep.py`)
           checked to compute the same states and EP gradient, then the training step (images/s,
           implied CIFAR-10 epoch) and the free phase (steps/s) at float32 / TF32 / bfloat16;
           conv and pool formulations; convergence stopping and even/odd updates with their
           prediction agreement with the fixed-T float32 prediction.
  attacks  PGD-20, Square-5000 and standard AutoAttack (Linf) on the paper BP-CNN, PGD-20 and
           Square on the EP-CNN (T=T1, exact BPTT gradient), ours vs torchattacks on a PyTorch copy
           with the same weights. Labels are the models' own predictions and eps is tiny, so no
           point is broken and every attack spends its whole budget: the cost of a fully robust
           model.
  deq      DEQ-Large: PGD-AT training samples/s (PGD-10 crafting + phantom-gradient step, batch 96)
           and evaluation samples/s, beside the DEQ papers' RTX 3090 figures.

Protocol: everything is compiled/warmed first; JAX and PyTorch runs alternate; the median of
--repeats runs is reported with its spread (min-max). Random weights; the GPU is not shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import time
import traceback
from collections.abc import Callable

# JAX would take 75 % of the GPU; PyTorch runs in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from benchmarks import fair
from eqrobust import attacks, energy, ep, models
from eqrobust import data as data_lib
from eqrobust.configs import bp_cnn as bp_cnn_config
from eqrobust.configs import deq as deq_config
from eqrobust.configs import ep_cnn as ep_cnn_config
from eqrobust.energy import EnergyConfig, step_flops
from eqrobust.train import ep as ep_train

try:  # the PyTorch side needs the `bench` extra (torch, torchattacks)
    import torch
    import torchattacks

    from benchmarks import torch_attacks
    from benchmarks.torch_ep import TorchEP
except ImportError as e:  # pragma: no cover - depends on the environment
    torch = None
    TORCH_MISSING = str(e)

SIZES = {
    "paper": dict(
        net=EnergyConfig(
            in_shape=(32, 32, 3),
            channels=(128, 256, 512, 512),
            paddings=(1, 1, 1, 0),
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.6069, 0.5982, 0.6030),
        ),
        batch=128, t1=250, t2=30, async_t=(60, 20), check_batch=8, check_t=(20, 5),
        bp_scale="paper", attack_n=256, ep_attack_n=32, pgd_steps=20, queries=5000,
        ep_queries=100, deq_scale="paper", deq_batch=96, train_size=50000,
    ),
    "dry": dict(
        net=EnergyConfig(
            in_shape=(8, 8, 3), channels=(4, 8), paddings=(1, 1), mean=(0.5,) * 3, std=(0.5,) * 3
        ),
        batch=4, t1=4, t2=2, async_t=(2, 1), check_batch=2, check_t=(3, 2),
        bp_scale="smoke", attack_n=4, ep_attack_n=2, pgd_steps=2, queries=10, ep_queries=5,
        deq_scale="smoke", deq_batch=4, train_size=50000,
    ),
}  # fmt: skip
PRECISIONS = ("float32", "tensorfloat32", "bfloat16")
INIT_SCALE = 2.0
TINY_EPS = 1e-5  # no point is broken: every attack runs its whole budget (checked, reported)


@dataclasses.dataclass
class Row:
    section: str
    what: str
    ours: float | None
    reference: float | None = None
    unit: str = ""
    spread: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.reference is None or not self.reference:
            return None
        return self.ours / self.reference


ROWS: list[Row] = []


def add(section: str, what: str, ours, reference=None, unit="", spread="", note="") -> None:
    row = Row(section, what, ours, reference, unit, spread, note)
    ROWS.append(row)
    ratio = f"  ratio {row.ratio:.2f}x" if row.ratio else ""
    ref = f"  reference {reference:.4g}" if reference is not None else ""
    ours_s = f"{ours:.4g}" if isinstance(ours, int | float) else str(ours)
    print(f"[{section}] {what}: {ours_s} {unit}{ref}{ratio} {spread} {note}", flush=True)


# --------------------------------------------------------------------------- timing


def _sync(out) -> None:
    jax.block_until_ready(out)
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


def bench(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, str]]:
    """`fair.alternate` (warm-up, alternating rounds) with device synchronisation.

    Returns:
        name -> (median seconds, "[min-max s, n=...]" spread string).
    """
    res = fair.alternate({k: (lambda f=f: _sync(f())) for k, f in fns.items()}, repeats)
    return {k: (t.median, f"[{t.low:.4g}-{t.high:.4g} s, n={t.n}]") for k, t in res.items()}


def torch_mode(mode: str, deterministic: bool = False) -> None:
    """PyTorch float32 ("float32": TF32 off in cuDNN and matmul) or TF32 ("tensorfloat32");
    cuDNN autotuning on (its best speed) unless `deterministic`."""
    tf32 = mode == "tensorfloat32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


@functools.cache
def matmul_rate(prec: str) -> float:
    """Dense matmul FLOP/s measured in-process at `prec` (the FLOP floor's ceiling)."""
    n = 8192 if jax.default_backend() != "cpu" else 512
    dt = jnp.bfloat16 if prec == "bfloat16" else jnp.float32
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dt)
    with jax.default_matmul_precision("tensorfloat32" if prec == "bfloat16" else prec):
        mm = jax.jit(lambda a: a @ a)
        t, _ = bench({"mm": lambda: mm(a)}, 5)["mm"]
    return 2.0 * n**3 / t


def floor_fraction(flops: float, seconds: float, prec: str) -> str:
    rate = matmul_rate(prec)
    return f"FLOP floor {flops / rate * 1e3:.1f} ms, fraction {flops / seconds / rate:.2f}"


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


def _rel(a, b) -> float:
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def images(n: int, shape, seed: int = 0) -> np.ndarray:
    """CIFAR-shaped structured images (eqrobust.data.synthetic), float32 in [0, 1]."""
    ds = data_lib.synthetic(num_train=1, num_test=n, shape=shape, seed=seed)
    return np.asarray(ds.x_test, np.float32) / 255.0


# --------------------------------------------------------------------------- EP-CNN


def ep_setup(size: dict):
    """The paper EP-CNN and one batch of generated CIFAR-shaped images and labels.

    Weights: PyTorch's default init times INIT_SCALE. At scale 1 the untrained network's states
    do not depend on the image (every image gets the same logits), which would make the
    prediction agreement of the cheaper variants meaningless; at scale 2 the logits differ per
    image and the free phase needs its steps (as a trained network's does). Timings of fixed-T
    phases do not depend on the weights.
    """
    cfg = size["net"]
    epc = ep.EPConfig(energy=cfg, t1=size["t1"], t2=size["t2"], beta=0.5)
    params = ep.init(jax.random.PRNGKey(0), epc, scale=INIT_SCALE)
    ds = data_lib.synthetic(num_train=1, num_test=size["batch"], shape=cfg.in_shape, seed=0)
    x = np.asarray(data_lib.to_float(ds.x_test))
    return epc, params, x, np.asarray(ds.y_test, np.int32)


def _ep_optimizer(params) -> ml_collections.ConfigDict:
    oc = ep_cnn_config.get_config("paper").optimizer
    oc.lrs = tuple(oc.lrs)[-len(params) :]  # the dry-run net has fewer layers
    return oc


def ep_check(size: dict, epc, params, x, y, device) -> None:
    """JAX and PyTorch (float32, TF32 off) against a float64 JAX reference on the CPU: the free
    states and the EP gradient on a few images. The EP gradient is a difference of two nearly
    equal Phi-gradients over 2 beta, so float32 noise is amplified; each side is judged by its
    error to float64, not by their difference."""
    b, (t1, t2) = size["check_batch"], size["check_t"]
    c = dataclasses.replace(epc, t1=t1, t2=t2)
    xb, yb = x[:b], y[:b]

    def run(p, xx):
        grads, _ = ep.ep_gradient(p, xx, yb, c)
        return ep.free_phase(p, xx, c).z, [g for layer in grads for g in layer]

    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params)
        z64, g64 = jax.tree.map(np.asarray, jax.jit(run)(p64, jnp.asarray(xb, jnp.float64)))
    with jax.default_matmul_precision("float32"):
        z32, g32 = jax.tree.map(np.asarray, jax.jit(run)(params, xb))
    sides = {"JAX": (z32, g32)}
    if torch is not None:
        for det in (False, True):
            torch_mode("float32", deterministic=det)
            tep = TorchEP(params, epc.energy, device)
            xt = torch.from_numpy(xb).permute(0, 3, 1, 2).contiguous().to(device)
            yt = torch.from_numpy(yb).long().to(device)
            zt = [s.permute(0, 2, 3, 1).cpu().numpy() for s in tep.free_phase(xt, t1)]
            gt = tep.ep_gradient(xt, yt, t1, t2, c.beta)
            gt = [g.permute(2, 3, 1, 0) if g.dim() == 4 else g.T if g.dim() == 2 else g for g in gt]
            name = "PyTorch (cuDNN deterministic)" if det else "PyTorch"
            sides[name] = (zt, [g.cpu().numpy() for g in gt])
        torch_mode("float32")
    else:
        add("ep", "PyTorch check", None, note=f"skipped: {TORCH_MISSING}")
    for name, (z, g) in sides.items():
        ez = max(_rel(a, r) for a, r in zip(z, z64, strict=True))
        flat = _rel(
            np.concatenate([a.ravel() for a in g]), np.concatenate([r.ravel() for r in g64])
        )
        worst = max(_rel(a, r) for a, r in zip(g, g64, strict=True))
        add("ep", f"{name} float32 vs float64: free states (T={t1}), max rel. error", ez)
        add("ep", f"{name} float32 vs float64: EP gradient (T1={t1}, T2={t2}), rel. error", flat,
            note=f"worst layer {worst:.1e}")  # fmt: skip


def _train_step(epc: ep.EPConfig, tx, compute_dtype):
    @jax.jit
    def step(state, x, y):
        p = _cast(state["params"], compute_dtype)
        grads, aux = ep.ep_gradient(p, x.astype(compute_dtype), y, epc)
        grads = _cast(grads, jnp.float32)
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, aux.loss

    return step


def ep_training(size: dict, epc, params, x, y, device, repeats: int) -> None:
    oc = _ep_optimizer(params)
    tx, _ = ep_train.make_optimizer(oc, params, 390)
    fns: dict[str, Callable] = {}
    for prec in PRECISIONS:
        dt = jnp.bfloat16 if prec == "bfloat16" else jnp.float32
        step = _train_step(epc, tx, dt)
        state = {"params": params, "opt": tx.init(params)}
        ctx = "tensorfloat32" if prec == "bfloat16" else prec

        def run(step=step, state=state, ctx=ctx):
            with jax.default_matmul_precision(ctx):
                return step(state, x, y)[1]

        fns[f"jax {prec}, T1={epc.t1} T2={epc.t2}"] = run
    ta, tb = size["async_t"]
    step = _train_step(dataclasses.replace(epc, t1=ta, t2=tb, update="async"), tx, jnp.float32)
    state = {"params": params, "opt": tx.init(params)}

    def run_async():
        with jax.default_matmul_precision("tensorfloat32"):
            return step(state, x, y)[1]

    fns[f"jax even/odd updates tensorfloat32, T1={ta} T2={tb}"] = run_async
    if torch is not None:
        tep = TorchEP(params, epc.energy, device)
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).to(device)
        yt = torch.from_numpy(y).long().to(device)
        for mode in PRECISIONS[:2]:

            def trun(mode=mode):
                torch_mode(mode)
                return tep.train_step(xt, yt, epc.t1, epc.t2, epc.beta, oc.lrs)

            fns[f"torch {mode}, T1={epc.t1} T2={epc.t2}"] = trun
    res = bench(fns, repeats)
    b, steps_per_epoch = x.shape[0], size["train_size"] // x.shape[0]
    torch_t = {k.split(",")[0].split()[1]: v[0] for k, v in res.items() if k.startswith("torch")}
    for name, (t, spread) in res.items():
        prec = name.split(",")[0].split()[-1]
        tm = torch_t.get(prec) if name.startswith("jax") else None
        phases = (epc.t1 + 2 * epc.t2) if "even/odd" not in name else 2 * (ta + 2 * tb)
        flops = step_flops(epc.energy, b) * (phases + 2)  # + the two Phi gradients of the update
        add(
            "ep",
            f"training step batch {b}, {name}",
            b / t,
            b / tm if tm else None,
            "images/s",
            spread,
            f"CIFAR-10 epoch {steps_per_epoch * t:.0f} s; {floor_fraction(flops, t, prec)}"
            + ("; ratio vs same-precision torch" if tm else ""),
        )
    if torch_t:
        same = min(v[0] for k, v in res.items() if k.startswith("jax") and "even/odd" not in k)
        add("ep", "training step, best JAX vs best PyTorch (same algorithm)", b / same,
            b / min(torch_t.values()), "images/s")  # fmt: skip


def _predict(epc: ep.EPConfig, prec: str):
    dt = jnp.bfloat16 if prec == "bfloat16" else jnp.float32
    ctx = "tensorfloat32" if prec == "bfloat16" else prec

    @jax.jit
    def f(p, x):
        sol = ep.free_phase(_cast(p, dt), x.astype(dt), epc)
        return energy.readout(_cast(p, dt), sol.z, epc.energy).astype(jnp.float32), sol

    def run(p, x):
        with jax.default_matmul_precision(ctx):
            return f(p, x)

    return run


def ep_free_phase(size: dict, epc, params, x, device, repeats: int) -> None:
    """Free-phase steps/s by formulation and precision, and the agreement of cheaper predictions
    (TF32, bf16, convergence stopping, even/odd updates) with the float32 T1-step prediction."""
    ref_logits, _ = _predict(epc, "float32")(params, x)
    ref = np.argmax(np.asarray(ref_logits), -1)
    add("ep", "distinct classes among the reference predictions", len(np.unique(ref)))
    variants: dict[str, tuple[ep.EPConfig, str]] = {}
    for conv, pool in (("xla", "reduce_window"), ("xla", "reshape"), ("patches", "reshape")):
        e = dataclasses.replace(epc.energy, conv=conv, pool=pool)
        variants[f"{conv} conv + {pool} pool, tf32"] = (
            dataclasses.replace(epc, energy=e),
            "tensorfloat32",
        )
    for prec in PRECISIONS:
        variants[f"auto formulation, {prec}"] = (epc, prec)
    for tol in (1e-3, 1e-4):
        c = dataclasses.replace(epc, free_stop="converged", free_tol=tol)
        variants[f"convergence stop tol {tol:g}, tf32"] = (c, "tensorfloat32")
    ta = size["async_t"][0]
    variants[f"even/odd updates T={ta}, tf32"] = (
        dataclasses.replace(epc, t1=ta, update="async"),
        "tensorfloat32",
    )
    fns = {k: functools.partial(_predict(c, p), params, x) for k, (c, p) in variants.items()}
    if torch is not None:
        tep = TorchEP(params, epc.energy, device)
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).to(device)
        for mode in PRECISIONS[:2]:

            def trun(mode=mode):
                torch_mode(mode)
                return tep.free_phase(xt, epc.t1)[-1]

            fns[f"torch {mode}"] = trun
    res = bench(fns, repeats)
    t_torch = {k.split()[1]: v[0] for k, v in res.items() if k.startswith("torch")}
    for name, (t, spread) in res.items():
        if name.startswith("torch"):
            add("ep", f"free phase T={epc.t1}, {name}", epc.t1 / t, None, "steps/s", spread)
            continue
        logits, sol = fns[name]()
        pred = np.argmax(np.asarray(logits), -1)
        steps = np.asarray(sol.steps)
        prec = next(p for p in ("bfloat16", "tensorfloat32", "tf32", "float32") if p in name)
        # PyTorch has no bfloat16 run: bf16 is compared with its best (TF32).
        tref = t_torch.get("float32" if prec == "float32" else "tensorfloat32")
        evals = float(steps.mean()) * (2 if "even/odd" in name else 1)
        floor = floor_fraction(step_flops(epc.energy, x.shape[0]) * evals, t, prec.replace(
            "tf32", "tensorfloat32").replace("tensortensor", "tensor"))  # fmt: skip
        add(
            "ep",
            f"free phase T={epc.t1}, {name}",
            epc.t1 / t,
            epc.t1 / tref if tref else None,
            "steps/s (T1-equivalent)",
            spread,
            f"agreement {np.mean(pred == ref):.4f}, logits rel. diff {_rel(logits, ref_logits):.1e}"
            f", steps mean {steps.mean():.0f} max {steps.max()}, "
            f"residual {float(np.max(sol.residual)):.1e}; {floor}",
        )


# --------------------------------------------------------------------------- attacks


class _ContiguousGrad(torch.autograd.Function if torch is not None else object):
    """Identity whose backward hands a contiguous gradient on: cuDNN may return input gradients
    in channels-last layout on GPU, which torchattacks' FAB cannot `.view`."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


class _NCHW(torch.nn.Module if torch is not None else object):
    """Our PyTorch BP-CNN copy on NCHW input (what torchattacks passes), permuting only inside,
    so that input gradients are contiguous (torchattacks' FAB views them)."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, x):
        m = self.m
        x = _ContiguousGrad.apply(x)
        h = (x - m.mean.view(1, -1, 1, 1)) / m.std.view(1, -1, 1, 1)
        for conv, norm in zip(m.convs, m.norms, strict=True):
            h = torch.nn.functional.max_pool2d(torch.relu(norm(conv(h))), 2)
        return m.head(h.permute(0, 2, 3, 1).reshape(h.shape[0], -1))


def _bp_cnn(size: dict, n: int):
    c = bp_cnn_config.get_config(size["bp_scale"])
    shape = size["net"].in_shape
    ds = data_lib.synthetic(num_train=64, num_test=n, shape=shape, seed=0)
    model = models.build_model(c, ds)
    model.eval()
    return model, ds, c


def _labels_of(logits_fn, x) -> np.ndarray:
    return np.asarray(jnp.argmax(jax.jit(lambda f, x: f(x))(logits_fn, x), -1)).astype(np.int32)


def _attack_rows(name, n, res, ours_fn, torch_fn, repeats):
    fns = {"ours": ours_fn}
    if torch_fn is not None:
        fns["torch"] = torch_fn
    out = bench(fns, repeats)
    t, spread = out["ours"]
    tt = out.get("torch", (None,))[0]
    broken = float(np.mean(np.asarray(ours_fn().success)))
    add("attacks", name, n / t, n / tt if tt else None, "images/s", spread, f"broken {broken:.3f}")


def attacks_bp(size: dict, device, repeats: int, parts=("pgd", "square", "aa")) -> None:
    n = size["attack_n"]
    model, ds, c = _bp_cnn(size, n)
    f = models.logits_fn(model)
    x = jnp.asarray(data_lib.to_float(ds.x_test))
    y = jnp.asarray(_labels_of(f, x))
    key = jax.random.PRNGKey(0)
    tm = None
    if torch is not None:
        torch_mode("tensorfloat32")
        tcnn = torch_attacks.TorchBPCNN(
            ds.image_shape, ds.num_classes, tuple(c.model.channels), tuple(c.model.paddings)
        )
        state = nnx.to_pure_dict(nnx.state(model))
        tm = _NCHW(torch_attacks.load_from_nnx(tcnn, state)).to(device).eval()
        # Contiguous NCHW: torchattacks' FAB clones the input and views its gradient.
        xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous().to(device)
        yt = torch.from_numpy(np.asarray(y)).long().to(device)
        agree = _rel(tm(xt).detach().cpu(), jax.jit(lambda f, x: f(x))(f, x))
        agree2 = _rel(tm.m(xt.permute(0, 2, 3, 1)).detach().cpu(), tm(xt).detach().cpu())
        assert agree2 < 1e-5, agree2
        add("attacks", "BP-CNN JAX vs PyTorch logits rel. diff", agree)
    steps, q = size["pgd_steps"], size["queries"]
    eps = TINY_EPS

    def torch_run(atk):
        return None if tm is None else (lambda: atk(xt, yt))

    if "pgd" in parts:
        _attack_rows(
            f"BP-CNN PGD-{steps} Linf, n={n}",
            n,
            None,
            lambda: attacks.pgd(f, x, y, key=key, eps=eps, steps=steps),
            torch_run(tm and torchattacks.PGD(tm, eps=eps, alpha=eps / 8, steps=steps)),
            repeats,
        )
    if "square" in parts:
        _attack_rows(
            f"BP-CNN Square Linf {q} queries, n={n}",
            n,
            None,
            lambda: attacks.square(f, x, y, key=key, eps=eps, queries=q),
            torch_run(tm and torchattacks.Square(tm, norm="Linf", eps=eps, n_queries=q, seed=0)),
            1,
        )
    aa_kw = {} if q >= 5000 else dict(steps=steps, queries=q)
    label = "standard" if not aa_kw else f"reduced {aa_kw}"
    if "aa" in parts:
        _attack_rows(
            f"BP-CNN AutoAttack Linf ({label}), n={n}",
            n,
            None,
            lambda: attacks.autoattack(f, x, y, key=key, eps=eps, **aa_kw),
            # torchattacks' components at the standard budget: torchattacks.AutoAttack runs
            # APGD/APGD-T/FAB with 10 iterations (measured before the eleventh session).
            torch_run(tm and torch_attacks.standard_autoattack(tm, "linf", eps))
            if not aa_kw
            else None,
            1,
        )


def attacks_ep(size: dict, epc, params, device) -> None:
    n, steps, q = size["ep_attack_n"], size["pgd_steps"], size["ep_queries"]
    clf = ep.classifier(params, epc)
    f = clf.logits_fn
    x = jnp.asarray(images(n, epc.energy.in_shape, seed=2))
    y = jnp.asarray(_labels_of(f, x))
    key, eps = jax.random.PRNGKey(0), TINY_EPS
    tm = None
    if torch is not None:
        torch_mode("tensorfloat32")
        tm = TorchEP(params, epc.energy, device).classifier(epc.t1).eval()
        xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous().to(device)
        yt = torch.from_numpy(np.asarray(y)).long().to(device)
    _attack_rows(
        f"EP-CNN (T={epc.t1}, exact BPTT) PGD-{steps} Linf, n={n}",
        n,
        None,
        lambda: attacks.pgd(f, x, y, key=key, eps=eps, steps=steps),
        (lambda: torchattacks.PGD(tm, eps=eps, alpha=eps / 8, steps=steps)(xt, yt)) if tm else None,
        1,
    )
    _attack_rows(
        f"EP-CNN (T={epc.t1}) Square Linf {q} queries, n={n}",
        n,
        None,
        lambda: attacks.square(f, x, y, key=key, eps=eps, queries=q),
        (lambda: torchattacks.Square(tm, eps=eps, n_queries=q, seed=0)(xt, yt)) if tm else None,
        1,
    )


# --------------------------------------------------------------------------- DEQ


def deq(size: dict, repeats: int) -> None:
    c = deq_config.get_config(size["deq_scale"])
    b = size["deq_batch"]
    shape = (32, 32, 3) if size["deq_scale"] == "paper" else tuple(c.dataset_options.shape)
    ds = data_lib.synthetic(num_train=64, num_test=b, shape=shape, seed=0)
    model = models.build_model(c, ds)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(1e-3)
    opt = tx.init(params)
    x = jnp.asarray(data_lib.to_float(ds.x_test))
    y = jnp.asarray(ds.y_test)
    eps, adv_steps = 8 / 255, 10 if size["deq_scale"] == "paper" else 2

    def forward(params, rest, x, train, key=None):
        m = nnx.merge(graphdef, params, rest, copy=True)
        m.train() if train else m.eval()
        return m.equilibrium(x, key=key).logits

    @jax.jit
    def pgd_at_step(params, opt, x, y, key):
        k_adv, k_drop = jax.random.split(key)
        f = jax.tree_util.Partial(lambda p, r, xx: forward(p, r, xx, False), params, rest)
        x_adv = attacks.pgd(f, x, y, key=k_adv, eps=eps, steps=adv_steps, step_size=2 / 255).x_adv

        def loss_fn(p):
            logits = forward(p, rest, jax.lax.stop_gradient(x_adv), True, k_drop)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    evaluate = jax.jit(lambda p, x: forward(p, rest, x, False))
    key = jax.random.PRNGKey(0)
    t = time.perf_counter()
    _sync(pgd_at_step(params, opt, x, y, key))
    add("deq", "DEQ-Large PGD-AT step compilation", time.perf_counter() - t, unit="s")
    res = bench(
        {
            "train": lambda: pgd_at_step(params, opt, x, y, key)[2],
            "eval": lambda: evaluate(params, x),
        },
        repeats,
    )
    paper = size["deq_scale"] == "paper"
    rows = (  # key, label, the papers' RTX 3090 figure (DEQ paper 5, Tables 9 and 10)
        ("train", f"DEQ-Large PGD-AT (PGD-{adv_steps}) training, batch {b}", 30.2),
        ("eval", f"DEQ-Large evaluation (8 Broyden + 5 damped), batch {b}", 94.9),
    )
    for k, label, ref in rows:
        t, spread = res[k]
        add("deq", label, b / t, ref if paper else None, "samples/s", spread,
            "reference: RTX 3090, DEQ paper 5")  # fmt: skip


# --------------------------------------------------------------------------- main


def table() -> str:
    lines = ["| section | measurement | ours | reference | ratio | unit | spread / note |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in ROWS:
        fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
        ratio = f"{r.ratio:.2f}x" if r.ratio else ""
        note = " ".join(s for s in (r.spread, r.note) if s)
        lines.append(
            f"| {r.section} | {r.what} | {fmt(r.ours)} | {fmt(r.reference)} | {ratio} | {r.unit}"
            f" | {note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes (CPU; the tests run it)")
    ap.add_argument(
        "--sections", default="check,ep,attacks,deq", help="also: aa (AutoAttack alone)"
    )
    ap.add_argument("--attack_n", type=int, help="images per BP-CNN attack (default 256)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="write the rows and the environment here")
    a = ap.parse_args(argv)
    size = dict(SIZES["dry" if a.dry_run else "paper"])
    size["attack_n"] = a.attack_n or size["attack_n"]
    repeats = 1 if a.dry_run else a.repeats
    device = "cuda" if torch is not None and torch.cuda.is_available() else "cpu"
    env = {
        "jax": jax.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
        "torch": None if torch is None else torch.__version__,
        "torch_device": device if torch is None else (
            torch.cuda.get_device_name() if device == "cuda" else platform.processor()
        ),
        "loadavg": os.getloadavg(),
        "dry_run": a.dry_run,
    }  # fmt: skip
    print(json.dumps(env), flush=True)
    sections = set(a.sections.split(","))
    ROWS.clear()
    if sections & {"check", "ep", "attacks"}:
        epc, params, x, y = ep_setup(size)
    jobs = {
        "check": [lambda: ep_check(size, epc, params, x, y, device)],
        "ep": [
            lambda: ep_training(size, epc, params, x, y, device, repeats),
            lambda: ep_free_phase(size, epc, params, x, device, repeats),
        ],
        "attacks": [
            lambda: attacks_bp(size, device, repeats),
            lambda: attacks_ep(size, epc, params, device),
        ],
        "deq": [lambda: deq(size, repeats)],
        "aa": [lambda: attacks_bp(size, device, repeats, parts=("aa",))],
    }
    failed = 0
    for name in ("check", "ep", "attacks", "deq", "aa"):
        for job in jobs[name] if name in sections else ():
            try:  # one failing measurement (e.g. out of memory) must not lose the others
                job()
            except Exception as e:  # noqa: BLE001
                failed += 1
                traceback.print_exc()
                add(name, "FAILED", None, note=f"{type(e).__name__}: {str(e)[:200]}")
            if torch is not None and torch.cuda.is_available():
                torch.cuda.empty_cache()
    print("\n" + table())
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"env": env, "rows": [dataclasses.asdict(r) for r in ROWS]}, fh, indent=1)
    if failed:
        raise SystemExit(f"{failed} measurement(s) failed (see FAILED rows)")


if __name__ == "__main__":
    main()
