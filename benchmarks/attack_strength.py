"""Issue 15 item 4: is C&W strong enough, and has PGD converged? Accuracy vs C&W constant for the
papers' C&W and the strong (fixed-constant) one; PGD with more steps / restarts / APGD-CE.

The examples are the study's (the evaluation's fixed permutation, seed 0, first n).

    python -m experiments.train --config=experiments/configs/bp_cnn.py:cpu --workdir=runs/bp_cnn
    python -m experiments.train --config=experiments/configs/ep_cnn.py:cpu --workdir=runs/ep_cnn
    python benchmarks/attack_strength.py --model=bp --workdir=runs/bp_cnn --part=cw
    python benchmarks/attack_strength.py --model=bp --workdir=runs/bp_cnn --part=pgd
    (the same with --model=ep --workdir=runs/ep_cnn)
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from eqrobust import data
from eqrobust.attacks import apgd, cw_l2, pgd
from eqrobust.configs import bp_cnn, ep_cnn
from eqrobust.train import get_trainer
from eqrobust.train.supervised import load_data

_MODEL = flags.DEFINE_enum("model", "bp", ["bp", "ep"], "bp_cnn.py:cpu or ep_cnn.py:cpu run.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/bp_cnn", "A finished training run of --model.")
_PART = flags.DEFINE_enum("part", "cw", ["cw", "pgd"], "Which measurement.")
_N = flags.DEFINE_integer("n", 100, "Test images (the study's permutation, first n).")
_CONSTS = flags.DEFINE_list("consts", ["0.01", "0.1", "1", "10", "100"], "C&W constants.")
_CW = flags.DEFINE_list(
    "cw", ["paper", "fixed:100:0.01", "fixed:300:0.01"], "C&W settings: paper | fixed:steps:lr"
)
_LINF = flags.DEFINE_list("linf", ["3", "8"], "PGD-Linf eps, in 1/255.")
_L2 = flags.DEFINE_list("l2", ["0.31", "0.49"], "PGD-L2 eps.")
_STOP = flags.DEFINE_integer(
    "stop_at_step", None, "Load this checkpoint of an unfinished run (a copy: it resumes there)."
)
_PGD = flags.DEFINE_list(
    "pgd",
    ["20", "20b", "40", "100", "20x5", "apgd100"],
    "PGD settings: steps[xrestarts][/d] (step eps/d, default 8), b = another key, apgdN = "
    "APGD-CE with N iterations",
)


def _load():
    cfg = (bp_cnn if _MODEL.value == "bp" else ep_cnn).get_config("cpu")
    kw = {} if _STOP.value is None else dict(stop_at_step=_STOP.value)
    trained = get_trainer(cfg.trainer)(cfg, _WORKDIR.value, **kw)
    ds = load_data(cfg)
    order = np.random.default_rng(0).permutation(len(ds.x_test))[: _N.value]
    return trained.classifier.logits_fn, data.to_float(ds.x_test[order]), ds.y_test[order]


def _acc(fn, x_adv, y):
    return float(np.mean(np.asarray(jnp.argmax(fn(x_adv), -1)) == y))


def _cw_rows(fn, x, y):
    print("| setting | " + " | ".join(f"c={c}" for c in _CONSTS.value) + " | s per c |")
    print("|---|" + "---|" * (len(_CONSTS.value) + 1))
    for setting in _CW.value:
        if setting == "paper":
            kw = dict(steps=10, lr=0.01, binary_search_steps=10)
        else:
            _, steps, lr = setting.split(":")
            kw = dict(steps=int(steps), lr=float(lr), binary_search_steps=1)
        cells, t0 = [], time.perf_counter()
        for c in _CONSTS.value:
            r = cw_l2(fn, x, y, c=float(c), **kw)
            l2 = np.asarray(r.l2)[np.asarray(r.success)]
            med = f"{np.median(l2):.2f}" if len(l2) else "-"
            cells.append(f"{_acc(fn, r.x_adv, y):.2f} (L2 {med})")
        dt = (time.perf_counter() - t0) / len(_CONSTS.value)
        print(f"| {setting} | " + " | ".join(cells) + f" | {dt:.1f} |", flush=True)


def _pgd_one(fn, x, y, eps, norm, setting, key):
    if setting.startswith("apgd"):
        return apgd(fn, x, y, key=key, eps=eps, norm=norm, steps=int(setting[4:])).x_adv
    if setting.endswith("b"):
        key, setting = jax.random.fold_in(key, 1), setting[:-1]
    setting, _, div = setting.partition("/")
    steps, _, restarts = setting.partition("x")
    ss = eps / float(div or 8)
    r = pgd(
        fn,
        x,
        y,
        key=key,
        eps=eps,
        norm=norm,
        steps=int(steps),
        restarts=int(restarts or 1),
        step_size=ss,
    )
    return r.x_adv


def _pgd_rows(fn, x, y):
    cases = [("linf", int(e) / 255, f"Linf {e}/255") for e in _LINF.value]
    cases += [("l2", float(e), f"L2 {e}") for e in _L2.value]
    print("| attack | " + " | ".join(_PGD.value) + " |")
    print("|---|" + "---|" * len(_PGD.value))
    times = {s: 0.0 for s in _PGD.value}
    for norm, eps, name in cases:
        cells = []
        for s in _PGD.value:
            t0 = time.perf_counter()
            acc = _acc(fn, _pgd_one(fn, x, y, eps, norm, s, jax.random.key(0)), y)
            times[s] += time.perf_counter() - t0
            cells.append(f"{acc:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print("| s (all eps) | " + " | ".join(f"{times[s]:.0f}" for s in _PGD.value) + " |")


def main(argv):
    del argv
    fn, x, y = _load()
    print(f"{_MODEL.value}: clean accuracy {_acc(fn, x, y):.3f} on n={len(y)}", flush=True)
    (_cw_rows if _PART.value == "cw" else _pgd_rows)(fn, x, y)


if __name__ == "__main__":
    app.run(main)
