"""The DEQ robustness study: intermediate/adjoint attacks, defences and their adaptive attacks.

For every DEQ of the config: train or load it, then on one fixed subset of test images (the
same examples for every model and attack) measure clean accuracy, PGD on the final state, the
unrolled-intermediate grid, gradient-ensemble and simultaneous-adjoint PGD, the defences (early
state, ensemble state, entropy reduction) under transfer, adaptive, BPDA and Square attacks with
the per-example worst case, and residual / entropy / per-state accuracy along the dynamics.
Success is always judged on the prediction the (defended) model actually makes.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax import lax
from tqdm.auto import tqdm

from eqrobust import compile_options, ops, spectrum
from eqrobust import data as data_lib
from eqrobust import defenses as D
from eqrobust.attacks import _common as C
from eqrobust.attacks import autoattack, pgd, square
from eqrobust.attacks import intermediate as I
from eqrobust.classifier import Classifier, Dynamics
from eqrobust.ep import ep_dynamics
from eqrobust.evaluation.cache import EvalCache, Uncacheable, model_fingerprint
from eqrobust.evaluation.context import eval_devices
from eqrobust.evaluation.health import check_gradient_probe
from eqrobust.evaluation.probes import gradient_path_probes
from eqrobust.models.deq import DEQNet, deq_dynamics
from eqrobust.profiling import compile_seconds
from eqrobust.report import deq as deq_report
from eqrobust.results import from_json, to_json
from eqrobust.results_deq import (
    COMPOSITE_ATTACKS,
    Acc,
    DefenseResult,
    DeqModelResult,
    DeqStudyResults,
    DynamicsAnalysis,
    EpResult,
    GradientCheck,
    GridSummary,
)
from eqrobust.train import Trained, get_trainer
from eqrobust.train import ep as ep_train
from eqrobust.train.deq import split_validation
from eqrobust.train.supervised import load_data

DEFENSES = ("final", "early", "ensemble", "entropy")
# Attacks on the undefended DEQ whose x_adv are reused: transfer, per-state accuracies.
FINAL_ATTACKS = ("pgd", "intermediate", "ensemble", "adjoint", "autoattack", "square")


@dataclasses.dataclass(frozen=True)
class _Setup:
    """The fixed evaluation data and attack settings shared by every model."""

    x: jax.Array  # [n, H, W, C] test subset
    y: jax.Array  # [n]
    x_val: jax.Array  # [n_val, H, W, C] validation subset (disjoint from the test split)
    y_val: jax.Array
    a: ml_collections.ConfigDict  # config.attack
    key: jax.Array


def fixed_subset(ds: data_lib.Dataset, n: int, seed: int) -> tuple[jax.Array, jax.Array]:
    """The first n of a fixed permutation of the test split: x [n, H, W, C] in [0, 1], y [n]."""
    if not 0 < n <= len(ds.x_test):
        raise ValueError(f"num_test={n} must be in 1..{len(ds.x_test)} for {ds.name!r}")
    idx = np.random.default_rng(seed).permutation(len(ds.x_test))[:n]
    return data_lib.to_float(ds.x_test[idx]), jnp.asarray(ds.y_test[idx])


def deq_model(trained: Trained) -> DEQNet:
    """The DEQNet of a DEQ `Trained` (its selected weights), eval mode."""
    model = trained.module
    if not isinstance(model, DEQNet):
        raise ValueError(f"{trained.config.name}: the DEQ study needs config.model.name='deq'")
    model.eval()
    return model


def _correct(logits_fn: Callable, x: jax.Array, y: jax.Array) -> np.ndarray:
    return np.asarray(jnp.argmax(C.logits(logits_fn, x), -1) == y)


def _pgd_kw(a: ml_collections.ConfigDict) -> dict:
    return dict(eps=float(a.eps), steps=int(a.steps), step_size=float(a.step_size))


def _grid_summary(g: I.GridResult, clean_ok: np.ndarray) -> GridSummary:
    acc = np.asarray(g.accuracy)
    return GridSummary(
        accuracy=Acc.of(clean_ok & np.asarray(g.robust)),
        strongest_state=int(g.strongest[0]),
        strongest_unroll=int(g.strongest[1]),
        strongest_lam=float(g.strongest[2]),
        states=tuple(int(s) for s in g.states),
        unrolls=tuple(int(k) for k in g.unrolls),
        lams=tuple(float(v) for v in g.lams),
        cell_accuracy=tuple(float(v) for v in acc.reshape(-1)),
    )


def _grid(dyn: Dynamics, predict: Callable, s: _Setup, key: jax.Array, states=None):
    a = s.a
    return I.unrolled_intermediate_grid(
        dyn,
        s.x,
        s.y,
        key=key,
        states=states,
        unrolls=tuple(a.grid_unrolls),
        lams=tuple(a.grid_lams),
        predict_fn=predict,
        state_batch=a.get("state_batch", None),
        **_pgd_kw(a),
    )


def _white_box(
    name: str, dyn: Dynamics, predict: Callable, s: _Setup, key: jax.Array
) -> tuple[np.ndarray, np.ndarray, Any]:
    """(robust [n] judged on predict, x_adv [n, ...], GridResult or None) of one attack."""
    a, x, y = s.a, s.x, s.y
    if name == "pgd":
        r = pgd(predict, x, y, key=key, norm="linf", **_pgd_kw(a))
        return ~np.asarray(r.success), np.asarray(r.x_adv), None
    if name == "intermediate":
        g = _grid(dyn, predict, s, key)
        return np.asarray(g.robust), np.asarray(g.x_adv), g
    if name == "ensemble":
        r = I.gradient_ensemble_pgd(dyn, x, y, key=key, predict_fn=predict, **_pgd_kw(a))
        return ~np.asarray(r.success), np.asarray(r.x_adv), None
    if name == "adjoint":
        r = I.adjoint_pgd(dyn, x, y, key=key, predict_fn=predict, **_pgd_kw(a))
        return ~np.asarray(r.success), np.asarray(r.x_adv), None
    if name == "square":
        r = square(predict, x, y, key=key, eps=float(a.eps), norm="linf", queries=int(a.queries))
        return ~np.asarray(r.success), np.asarray(r.x_adv), None
    if name == "autoattack":  # paper 5: gradient from z_i + K damped steps, judged on predict
        aa = a.autoattack
        fn = I.intermediate_surrogate(
            dyn, predict, state=int(aa.state), unroll=int(aa.unroll), lam=float(aa.lam)
        )
        budget = dict(steps=int(aa.steps), queries=int(aa.queries), targets=int(aa.targets))
        r = autoattack(fn, x, y, key=key, eps=float(a.eps), norm="linf", **budget)
        return np.asarray(r.robust), np.asarray(r.x_adv), None
    raise ValueError(f"unknown attack {name!r}; expected one of {FINAL_ATTACKS}")


def _defense_result(
    name: str, clean_ok: np.ndarray, robust: dict[str, np.ndarray], grid=None, note: str = ""
) -> DefenseResult:
    """Every attack ANDed with clean correctness, ALL the AND over attacks (x is in the ball)."""
    robust = {k: clean_ok & v for k, v in robust.items()}
    every = np.logical_and.reduce([clean_ok, *robust.values()])
    accs = {k: Acc.of(v) for k, v in robust.items()}
    single = {k: v for k, v in accs.items() if k not in COMPOSITE_ATTACKS} or accs
    worst = min(single, key=lambda k: single[k].accuracy) if single else "none"
    summary = None if grid is None else _grid_summary(grid, clean_ok)
    return DefenseResult(name, Acc.of(clean_ok), accs, Acc.of(every), worst, summary, note)


def _attack_final(
    dyn: Dynamics,
    final: Callable,
    s: _Setup,
    attacks: tuple[str, ...],
    bar: tqdm,
    timing: dict[str, float],
) -> tuple[DefenseResult, dict[str, np.ndarray]]:
    """The undefended DEQ under each attack; also returns the x_adv per attack."""
    clean_ok = _correct(final, s.x, s.y)
    robust, x_adv, grid = {}, {}, None
    for i, name in enumerate(attacks):
        bar.set_postfix_str(f"final: {name}")
        t0 = time.perf_counter()
        r, xa, g = _white_box(name, dyn, final, s, jax.random.fold_in(s.key, i))
        timing[f"final: {name}"] = time.perf_counter() - t0
        robust[name] = r & _correct(final, xa, s.y)
        x_adv[name] = xa
        grid = g if g is not None else grid
    return _defense_result("final", clean_ok, robust, grid), x_adv


def _transfer(predict: Callable, x_adv: dict[str, np.ndarray], s: _Setup) -> dict[str, np.ndarray]:
    """Each undefended-DEQ x_adv fed to the defence: {attack: correct [n]}."""
    return {k: _correct(predict, jnp.asarray(v), s.y) for k, v in x_adv.items()}


def _defense_fns(
    name: str, model: DEQNet, er_cfg: D.EntropyReduction, early_index: int
) -> tuple[Classifier, Callable]:
    """(the defence's Classifier, its prediction: the logits_fn without gradient for entropy
    reduction, the classifier's own otherwise)."""
    if name == "early":
        clf = D.early_state(model, early_index)
    elif name == "ensemble":
        clf = D.ensemble_state(model)
    elif name == "entropy":
        clf = D.entropy_reduction(model, er_cfg, mode="phantom")
    else:
        raise ValueError(f"unknown defence {name!r}; expected one of {DEFENSES}")
    predict = D.entropy_reduction_logits_fn(model, er_cfg) if name == "entropy" else clf.logits_fn
    return clf, predict


ER_PATHS = {
    "phantom": "purified input as a constant (BPDA) + the model's phantom gradient",
    "full": "BPTT through the purification and every solver step",
    "bpda": "BPDA through the purification, BPTT through the solver",
}


def _gradient_paths(
    d: DefenseResult, dyn: Dynamics, own: Classifier, model: DEQNet, s: _Setup
) -> dict[str, tuple[str, Callable | None]]:
    """{attack: (its gradient path in words, a logits function whose VJP is that path, or None
    where none can be formed)} for the white-box attacks run on defence row d; `own` is the
    defence's classifier (its logits_fn carries the defence's own gradient)."""
    a, paths = s.a, {}
    for att in d.attacks:
        if (att == "pgd" and d.name == "final") or (att == "adaptive" and d.name != "entropy"):
            paths[att] = (f"own: {own.gradient}", own.logits_fn)
        elif att == "intermediate" and d.grid is not None:
            i, k, lam = d.grid.strongest_state, d.grid.strongest_unroll, d.grid.strongest_lam
            fn = I.surrogate_path(dyn, states=i, unroll=k, lam=lam)
            paths[att] = (f"intermediate z_{i}, K={k}, lam={lam:g} (strongest cell)", fn)
        elif att == "ensemble":
            paths[att] = ("gradient ensemble over every z_i, K=1, lam=0.5", I.surrogate_path(dyn))
        elif att == "autoattack":
            aa = a.autoattack
            i, k, lam = int(aa.state), int(aa.unroll), float(aa.lam)
            fn = I.surrogate_path(dyn, states=i, unroll=k, lam=lam)
            paths[att] = (f"intermediate z_{i}, K={k}, lam={lam:g}", fn)
        elif att == "adjoint":
            paths[att] = ("simultaneous adjoint, sum over n", None)
        elif att in ER_PATHS and d.name == "entropy":
            er_cfg = D.EntropyReduction(**dict(a.entropy_reduction))
            paths[att] = (ER_PATHS[att], D.entropy_reduction_logits_fn(model, er_cfg, mode=att))
    return paths


def _gradient_checks(
    d: DefenseResult, predict: Callable, paths: dict[str, tuple[str, Callable | None]], s: _Setup
) -> DefenseResult:
    """Row d with check (d) of each gradient path (config attack.gradient_check)."""
    gc = s.a.get("gradient_check", None)
    if gc is None or int(gc.images) < 1 or not paths:
        return d
    n = int(gc.images)
    idx = np.flatnonzero(_correct(predict, s.x, s.y))[:n]  # compiled by the attacks already
    if len(idx) == 0:  # nothing classified correctly: probe the first examples anyway
        idx = np.arange(min(n, len(s.x)))
    skip = set(gc.skip)
    run = {k: fn for k, (_, fn) in paths.items() if fn is not None and k not in skip}
    probes = {}
    if run:  # every path skipped: not even the prediction's finite differences
        probes = gradient_path_probes(
            predict,
            run,
            np.asarray(s.x)[idx],
            np.asarray(s.y)[idx],
            key=jax.random.fold_in(s.key, 300),
            directions=int(gc.directions),
            step=float(gc.step),
        )
    h = ml_collections.ConfigDict(
        dict(
            gradient_min_correlation=float(gc.min_correlation),
            gradient_max_relative_error=float(gc.max_relative_error),
            gradient_max_zero_fraction=float(gc.max_zero_fraction),
        )
    )
    checks = {}
    for k, (desc, fn) in paths.items():
        if k in probes:
            hc = check_gradient_probe(probes[k], h)
            verdict = hc.message.rpartition(": ")[2]
            checks[k] = GradientCheck(desc, probes[k], hc.passed, verdict)
        elif fn is None:
            note = "not checked: its loss (CE of every state) is built into the forward recursion"
            checks[k] = GradientCheck(desc, note=note)
        else:
            checks[k] = GradientCheck(desc, note="not checked at this scale (gradient_check.skip)")
    return dataclasses.replace(d, gradient_checks=checks)


def _defense_row(
    name: str,
    model: DEQNet,
    x_adv_final: Callable[[], dict[str, np.ndarray]],
    s: _Setup,
    attacks: tuple[str, ...],
    bar: tqdm,
    early_index: int,
    timing: dict[str, float],
) -> DefenseResult:
    """One defence: its own attacks (judged on it), adaptive, Square, then the transfer of the
    final-DEQ attacks (`x_adv_final()`: called last, so that the defence's own attacks can run
    in another lane while the final-state attacks are still running), then check (d) of its
    gradient paths. Timing gets "<name>: <attack>", "defence <name>" and its gradient checks."""
    t_row = time.perf_counter()
    dyn = deq_dynamics(model)
    er_cfg = D.EntropyReduction(**dict(s.a.entropy_reduction))
    clf, predict = _defense_fns(name, model, er_cfg, early_index)
    clean_ok = _correct(predict, s.x, s.y)
    robust: dict[str, np.ndarray] = {}
    grid = None
    for i, att in enumerate(attacks):
        bar.set_postfix_str(f"{name}: {att}")
        key, t0 = jax.random.fold_in(s.key, 100 + i), time.perf_counter()
        if att in ("intermediate", "ensemble", "adjoint", "autoattack", "square"):
            r, xa, g = _white_box(att, dyn, predict, s, key)
            robust[att] = r & _correct(predict, jnp.asarray(xa), s.y)
            grid = g if g is not None else grid
        elif att == "adaptive" and name == "entropy":
            variants = tuple(s.a.er_adaptive)
            res = D.attack_defense(
                predict,
                D.entropy_reduction_surrogates(model, er_cfg, variants),
                s.x,
                s.y,
                key=key,
                **_pgd_kw(s.a),
            )
            for v in variants:
                robust[v] = res.robust[v]
            robust["adaptive"] = np.logical_and.reduce([res.robust[v] for v in variants])
        elif att == "adaptive":  # the defence's own exact (BPTT) gradient
            r = pgd(clf.logits_fn, s.x, s.y, key=key, norm="linf", **_pgd_kw(s.a))
            robust["adaptive"] = _correct(predict, r.x_adv, s.y)
        elif att != "transfer":
            raise ValueError(f"unknown defence attack {att!r}")
        timing[f"{name}: {att}"] = time.perf_counter() - t0
    tr = _transfer(predict, x_adv_final(), s)
    if "pgd" in tr:  # PGD on the final state, transferred (the papers' protocol): first column
        robust = {"pgd": tr["pgd"], **robust}
    if tr:
        robust["transfer"] = np.logical_and.reduce(list(tr.values()))
    note = f"z_{early_index} (selected on validation)" if name == "early" else ""
    if name == "entropy":
        note = f"T_f={er_cfg.t_f}, R={er_cfg.r}, eps={er_cfg.eps:.4f}, alpha={er_cfg.alpha:.4f}"
    res = _defense_result(name, clean_ok, robust, grid, note)
    timing[f"defence {name}"] = time.perf_counter() - t_row
    t0 = time.perf_counter()
    bar.set_postfix_str(f"{name}: gradient checks (d)")
    res = _gradient_checks(res, predict, _gradient_paths(res, dyn, clf, model, s), s)
    timing[f"gradient checks (d): {name}"] = time.perf_counter() - t0
    bar.update()
    return res


@compile_options.jit
def _along(dyn: Dynamics, x: jax.Array, y: jax.Array) -> tuple[jax.Array, ...]:
    """Per solver state: relative residual, prediction entropy, correctness; each [N, B]."""
    zs = dyn.trajectory(x)
    a = dyn.inject(x)

    def per(z):
        fz = dyn.f(z, a)
        sq = lambda t: sum(jnp.sum(jnp.square(u).reshape(u.shape[0], -1), 1) for u in t)
        diff = jax.tree.map(lambda p, q: p - q, fz, z)
        res = jnp.sqrt(sq(jax.tree.leaves(diff))) / (jnp.sqrt(sq(jax.tree.leaves(fz))) + 1e-9)
        logits = dyn.readout(z)
        return res, D.prediction_entropy(logits), jnp.argmax(logits, -1) == y

    return lax.map(per, zs)


def _fixed_point(model: DEQNet) -> Callable[[jax.Array], Any]:
    """x -> the eval-mode solver state z* the DEQ's prediction reads out (f(z*) and on)."""
    graphdef, state = nnx.split(model)

    def fp(state: Any, x: jax.Array) -> Any:
        m = nnx.merge(graphdef, state, copy=True)
        m.eval()
        return m.equilibrium(x).z_star

    return jax.tree_util.Partial(fp, state)


def _dynamics(
    dyn: Dynamics,
    s: _Setup,
    x_adv: dict[str, np.ndarray],
    adv_key: str,
    fixed_point: Callable[[jax.Array], Any] | None = None,
    krylov: int = 20,
) -> DynamicsAnalysis:
    """Residual / entropy along z_1..z_N (clean and x_adv[adv_key]); per-state accuracies; with
    `fixed_point`, the spectral radius of df/dz at z* (clean and x_adv[adv_key], `krylov`
    Arnoldi steps)."""
    inputs = {"clean": s.x, **{k: jnp.asarray(v) for k, v in x_adv.items()}}
    out = {k: [np.asarray(t) for t in _along(dyn, v, s.y)] for k, v in inputs.items()}
    adv = out.get(adv_key, out["clean"])
    tup = lambda a: tuple(float(v) for v in a.mean(axis=1))
    radius: tuple[tuple[float, ...], ...] = ((), ())
    if fixed_point is not None:
        sp = spectrum.spectrum_clean_vs_adversarial(
            lambda z, x: dyn.f(z, dyn.inject(x)),
            fixed_point,
            jnp.asarray(s.x),
            inputs.get(adv_key, jnp.asarray(s.x)),
            k=krylov,
            top=1,
            batch_size=len(s.x),
            mode="vjp",  # the "xla_flip" conv (CPU default) has no forward-mode rule
        )
        radius = tuple(tuple(float(v) for v in np.abs(e[:, 0])) for e in sp[:2])
    return DynamicsAnalysis(
        num_states=int(dyn.num_states),
        residual_clean=tup(out["clean"][0]),
        residual_adv=tup(adv[0]),
        entropy_clean=tup(out["clean"][1]),
        entropy_adv=tup(adv[1]),
        state_attacks=tuple(out),
        state_accuracy=tuple(tup(v[2]) for v in out.values()),
        spectral_radius_clean=radius[0],
        spectral_radius_adv=radius[1],
    )


def _on_device(model: DEQNet, device: jax.Device) -> DEQNet:
    """A copy of `model` whose arrays live on `device` (its programs then run there)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, ops.place(state, device))


# The defence rows the second lane takes, in order: entropy reduction (its own attacks cost
# about as much as all the others), then the ensemble state, which balances the two lanes
# (BUILD_NOTES.md, "DEQ study"). The early state needs the main lane's state selection.
LANE_ROWS = ("entropy", "ensemble")


def _evaluate_model(
    key: str,
    trained: Trained,
    s: _Setup,
    config: ml_collections.ConfigDict,
    lane: tuple[ThreadPoolExecutor, jax.Device] | None = None,
) -> DeqModelResult:
    """`_evaluate_deq` compiled with the DEQ's compiler options (`Classifier.compiler_options`)."""
    with compile_options.options(trained.classifier.compiler_options):
        return _evaluate_deq(key, trained, s, config, lane)


def _evaluate_deq(
    key: str,
    trained: Trained,
    s: _Setup,
    config: ml_collections.ConfigDict,
    lane: tuple[ThreadPoolExecutor, jax.Device] | None,
) -> DeqModelResult:
    """All measurements of one trained DEQ.

    With a second lane (an executor and its host device), the rows of `LANE_ROWS` run there,
    in that order, on a copy of the model, beside the final-state attacks and the other
    defences; their transfer rows wait for the final-state x_adv. The numbers are those of the
    serial run: every attack has its own key and inputs.
    """
    timing: dict[str, float] = {}
    c0 = compile_seconds()
    model = deq_model(trained)
    dyn = deq_dynamics(model)
    # The trained classifier's logits (deq_classifier(model)); taking the Dynamics' own object
    # lets the intermediate attacks judge it and recompute the states with one solve per step.
    final = dyn.predict
    defenses = [d for d in config.defenses if d != "final"]
    defense_order = tuple(defenses)
    attacks = tuple(config.final_attacks)
    bar = tqdm(total=2 + len(defenses), desc=f"DEQ study {trained.config.name}", leave=False)
    final_x_adv: Future = Future()
    aside = {}
    on_lane = [d for d in LANE_ROWS if d in defenses] if lane is not None else []
    lane_model = _on_device(model, lane[1]) if on_lane else None
    for name in on_lane:  # one worker: the rows run one after the other
        defenses.remove(name)
        aside[name] = lane[0].submit(
            contextvars.copy_context().run, _defense_row, name, lane_model,
            final_x_adv.result, s, tuple(config.defense_attacks[name]), bar, -1, timing,
        )  # fmt: skip
    t0 = time.perf_counter()
    try:
        final_res, x_adv = _attack_final(dyn, final, s, attacks, bar, timing)
    except BaseException as e:  # the lane must not wait forever for x_adv
        final_x_adv.set_exception(e)
        raise
    final_x_adv.set_result(x_adv)
    timing["attacks on the final state"] = time.perf_counter() - t0
    bar.set_postfix_str("gradient checks (d)")
    t0 = time.perf_counter()
    paths = _gradient_paths(final_res, dyn, trained.classifier, model, s)
    final_res = _gradient_checks(final_res, final, paths, s)
    timing["gradient checks (d): final"] = time.perf_counter() - t0
    bar.update()
    t0 = time.perf_counter()
    bar.set_postfix_str("early-state selection")
    sel = D.select_early_state(
        model, s.x_val, s.y_val, key=jax.random.fold_in(s.key, 7), **_pgd_kw(s.a)
    )
    timing["early-state selection"] = time.perf_counter() - t0
    rows = {"final": final_res}
    for name in defenses:
        att = tuple(config.defense_attacks[name])
        rows[name] = _defense_row(name, model, lambda: x_adv, s, att, bar, sel.index, timing)
    rows.update({k: f.result() for k, f in aside.items()})
    t0 = time.perf_counter()
    krylov = int(config.get("spectrum_krylov", 20))
    fp = _fixed_point(model) if krylov > 0 else None
    dynamics = _dynamics(dyn, s, x_adv, "pgd", fp, krylov)
    timing["dynamics analyses"] = time.perf_counter() - t0
    timing["of which compilation"] = compile_seconds() - c0
    bar.update()
    bar.close()
    return DeqModelResult(
        key=key,
        name=str(trained.config.name),
        num_states=int(dyn.num_states),
        early_index=int(sel.index),
        early_val_robust=tuple(float(v) for v in sel.robust_accuracy),
        early_val_clean=tuple(float(v) for v in sel.clean_accuracy),
        defenses=tuple(rows[k] for k in ("final", *defense_order) if k in rows),
        dynamics=dynamics,
        timing=timing,
    )


def _evaluate_ep(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    s: _Setup,
    seed: int,
    device: jax.Device | None = None,
    study: ml_collections.ConfigDict | None = None,
) -> tuple[EpResult, float]:
    """The EP-CNN's free phase under final-state PGD and the intermediate attacks (on `device`
    when given: its weights are copied there, so its programs run there); with the `study`
    config, stored in and reused from the run's evaluation cache."""
    t0 = time.perf_counter()
    trained = get_trainer(cfg.trainer)(cfg, workdir)
    cached = None if study is None else _row_cache(study, trained, workdir)
    res, _ = _cached_row(
        cached, "deq_study_ep", EpResult, lambda: _ep_row(cfg, trained, s, seed, device)
    )
    return res, time.perf_counter() - t0


def _ep_row(
    cfg: ml_collections.ConfigDict,
    trained: Trained,
    s: _Setup,
    seed: int,
    device: jax.Device | None,
) -> EpResult:
    ds = load_data(trained.config)
    x, y = fixed_subset(ds, int(len(s.x)), seed)
    es = dataclasses.replace(s, x=x, y=y)
    params = trained.state["params"]
    if device is not None:
        params = ops.place(params, device)
    dyn = ep_dynamics(params, ep_train.build_ep_config(trained.config, ds))
    final = dyn.predict  # the trained EP-CNN's logits (ep.classifier's, exact BPTT gradient)
    clean_ok = _correct(final, x, y)
    robust, grid = {}, None
    for i, name in enumerate(("pgd", "intermediate", "ensemble")):
        states = s.a.get("ep_grid_states", None)
        if name == "intermediate" and states is not None:
            g = _grid(dyn, final, es, jax.random.fold_in(s.key, 200 + i), tuple(states))
            r, xa = np.asarray(g.robust), np.asarray(g.x_adv)
        else:
            r, xa, g = _white_box(name, dyn, final, es, jax.random.fold_in(s.key, 200 + i))
        robust[name] = clean_ok & r & _correct(final, jnp.asarray(xa), y)
        grid = g if g is not None else grid
    res = EpResult(
        name=str(cfg.get("name", "EP-CNN")),
        num_states=int(dyn.num_states),
        clean=Acc.of(clean_ok),
        pgd=Acc.of(robust["pgd"]),
        intermediate=Acc.of(robust["intermediate"]),
        ensemble=Acc.of(robust["ensemble"]),
        all=Acc.of(np.logical_and.reduce([clean_ok, *robust.values()])),
        grid=_grid_summary(grid, clean_ok),
    )
    return res


# The settings a model's row depends on (the model itself enters through its fingerprint).
_ROW_SETTINGS = ("num_test", "num_val", "subset_seed", "seed", "attack", "defenses")
_ROW_SETTINGS += ("final_attacks", "defense_attacks", "spectrum_krylov")


def _row_cache(
    config: ml_collections.ConfigDict, trained: Trained, run_dir: str
) -> tuple[EvalCache, dict[str, Any]] | None:
    """The run's evaluation cache and the key parts of its DEQ-study row: the study settings
    and this file's source (the evaluation cache's code fingerprint leaves the study out)."""
    if not config.get("eval_cache", True):
        return None
    try:
        model_id = model_fingerprint(trained.state, trained.config, trained.config.name)
    except Uncacheable as e:
        logging.warning("%s: DEQ study row not cached (%s)", trained.config.name, e)
        return None
    with open(__file__, "rb") as f:
        source = hashlib.sha256(f.read()).hexdigest()
    parts = {k: config.get(k, None) for k in _ROW_SETTINGS}
    parts["deq_study.py"] = source
    return EvalCache(os.path.join(run_dir, "eval_cache"), model_id), parts


def _cached_row(cached, kind: str, tp: type, compute: Callable[[], Any]) -> tuple[Any, bool]:
    """(result, from the cache?): the stored JSON of `kind` when `cached` has it, else
    `compute()`'s result, stored. An entry that no longer reads back is recomputed."""
    if cached is None:
        return compute(), False
    cache, parts = cached
    fresh = []

    def run() -> dict[str, np.ndarray]:
        fresh.append(compute())
        return {"json": np.asarray(json.dumps(to_json(fresh[0])))}

    out = cache.get_or_compute(kind, parts, run, {"json": ()})
    if fresh:
        return fresh[0], False
    try:
        return from_json(tp, json.loads(str(out["json"])), kind), True
    except (TypeError, ValueError, KeyError) as e:
        logging.warning("%s: cached entry unreadable (%s); recomputing", kind, e)
        return compute(), False


def _setup(config: ml_collections.ConfigDict, ds: data_lib.Dataset, val_cfg) -> _Setup:
    x, y = fixed_subset(ds, int(config.num_test), int(config.subset_seed))
    _, (xv, yv) = split_validation(ds, int(val_cfg.num_val))
    nv = min(int(config.num_val), len(xv))
    key = jax.random.PRNGKey(int(config.seed))
    return _Setup(x, y, data_lib.to_float(xv[:nv]), jnp.asarray(yv[:nv]), config.attack, key)


def run_deq_study(
    config: ml_collections.ConfigDict, workdir: str, out_dir: str | None = None
) -> DeqStudyResults:
    """Trains (or loads) every DEQ of the study, attacks it and its defences, writes the report.

    Args:
        config: see eqrobust/configs/deq_study.py (models, model_order, num_test, num_val,
            subset_seed, attack, defenses, final_attacks, defense_attacks, ep_model,
            ep_workdir).
        workdir: model runs go to workdir/<key>.
        out_dir: deq_results.json, deq_report.md and the figures (default: workdir).

    Returns:
        DeqStudyResults (also written to <out>/deq_results.json).
    """
    t_start, c_start = time.perf_counter(), compile_seconds()
    keys = list(config.model_order)
    missing = [k for k in keys if k not in config.models]
    if missing:
        raise ValueError(f"model_order names {missing} not in config.models {list(config.models)}")
    ds = load_data(config.models[keys[0]])
    s = _setup(config, ds, config.models[keys[0]])
    timing: dict[str, float] = {}
    # Two lanes when XLA:CPU is split into host devices (`host.split_cpu`): the EP-CNN and each
    # DEQ's entropy-reduction row run on the last device beside the rest. Their attacks are small
    # while loops that keep about one core busy each, and a lane fills the other core while one
    # compiles; the results are the serial run's (each attack has its own key and inputs).
    devices = eval_devices()
    pool = ThreadPoolExecutor(1, thread_name_prefix="deq-lane") if devices else None
    lane = (pool, devices[-1]) if pool is not None else None
    ep_job = None
    if config.get("ep_model", None) is not None:
        ep_args = (
            config.ep_model,
            config.get("ep_workdir", None) or os.path.join(workdir, "ep_cnn"),
            s,
            int(config.subset_seed),
        )
        ep_job = pool.submit(_evaluate_ep, *ep_args, devices[-1], config) if pool else None
    models = []
    for key in tqdm(keys, desc="DEQ study models"):
        cfg = config.models[key]
        if load_data(cfg).x_test.shape != ds.x_test.shape:
            raise ValueError(f"model {key!r} uses a different test split than {keys[0]!r}")
        t0 = time.perf_counter()
        trained = get_trainer(cfg.trainer)(cfg, os.path.join(workdir, key))
        timing[f"train-or-load {cfg.name}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        row, hit = _cached_row(
            _row_cache(config, trained, os.path.join(workdir, key)),
            "deq_study_row",
            DeqModelResult,
            lambda: _evaluate_model(key, trained, s, config, lane),
        )
        if hit:  # the stored stage times are the first run's; this run only loaded the row
            row = dataclasses.replace(
                row, timing={"loaded from the evaluation cache": time.perf_counter() - t0}
            )
        models.append(row)
        timing[f"evaluate {cfg.name}" + (" (cached)" if hit else "")] = time.perf_counter() - t0
    ep_res = None
    if config.get("ep_model", None) is not None:
        ep_out = ep_job.result() if ep_job is not None else _evaluate_ep(*ep_args, None, config)
        ep_res, timing["EP-CNN train-or-load + attacks"] = ep_out
    if pool is not None:
        pool.shutdown()
    timing["total before report"] = time.perf_counter() - t_start
    timing["of which compilation"] = compile_seconds() - c_start
    meta = dict(
        title=config.get("title", "DEQ robustness study"),
        scale=config.get("scale", "?"),
        dataset=str(config.models[keys[0]].dataset),
        num_test=int(len(s.x)),
        num_val=int(len(s.x_val)),
        attack=config.attack.to_dict(),
        timing=timing,
        lanes=2 if pool is not None else 1,
    )
    results = DeqStudyResults(models=tuple(models), ep=ep_res, meta=meta)
    out = workdir if out_dir is None else out_dir
    os.makedirs(out, exist_ok=True)
    js = results.to_json()
    DeqStudyResults.from_json(js)  # what we write must read back
    with open(os.path.join(out, "deq_results.json"), "w") as f:
        json.dump(js, f, indent=1)
    deq_report.write_deq_report(results, out)
    return results
