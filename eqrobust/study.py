"""Studies: train-or-load several models, evaluate them on the same examples, write the report.

The only module that imports training, evaluation and the report together.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from eqrobust import compile_once, compile_options, ep, host, report, spectrum
from eqrobust import data as data_lib
from eqrobust.attacks import pgd
from eqrobust.classifier import Classifier, GradientPath
from eqrobust.cost import inference_cost
from eqrobust.evaluation import evaluate_classifier
from eqrobust.evaluation.cache import EvalCache, Uncacheable, array_digest, model_fingerprint
from eqrobust.evaluation.context import check_data, predict
from eqrobust.evaluation.runner import make_context
from eqrobust.profiling import compile_seconds
from eqrobust.results import StudyResults
from eqrobust.train import Trained, get_trainer
from eqrobust.train import ep as ep_train
from eqrobust.train.supervised import load_data

CLASS_NAMES = {
    "fashion_mnist": [
        "T-shirt",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Boot",
    ],
    "cifar10": ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


def ep_gradient_variants(
    trained: Trained, analysis: ml_collections.ConfigDict, name: str, data: Any = None
) -> list[Classifier]:
    """Classifiers of a trained EP model with other attack-gradient paths (same prediction).

    Args:
      trained: `eqrobust.train.Trained` from the EP trainer (state["params"]).
      analysis: `bptt_depths` (unrolled depths > T are dropped; T itself is the exact gradient)
        and `implicit`.
      name: display name for the variants.
      data: the training `Dataset` (its statistics normalise the input); loaded when None.

    Returns:
      Classifiers: BPTT through each depth t, then the implicit gradient.
    """
    data = load_data(trained.config) if data is None else data
    params = trained.state["params"]
    ep_config = ep_train.build_ep_config(trained.config, data)
    depths = sorted({int(t) for t in analysis.bptt_depths if int(t) <= ep_config.t1})
    paths = [GradientPath("unrolled", t) for t in depths]
    if analysis.implicit:
        paths.append(GradientPath("implicit"))
    return [ep.classifier(params, ep_config, gradient=p, name=name) for p in paths]


def ep_gradient_check(trained: Trained, data: Any, name: str, n: int = 64) -> str:
    """How far the trained EP-CNN's EP gradient is from the implicit gradient of the loss at its
    free-phase state, on its first `n` training images (one batch): the cosine and relative
    error over all weights, and the phases' residuals (EP's formula assumes both settled).

    Returns:
      One line for the report's notes.
    """
    params = trained.state["params"]
    cfg = ep_train.build_ep_config(trained.config, data)
    x = data_lib.to_float(data.x_train[:n])
    y = jnp.asarray(data.y_train[:n])

    @compile_options.jit
    def both(p):
        g_ep, aux = ep.ep_gradient(p, x, y, cfg)
        g_imp = jax.grad(lambda q: ep.loss_at_fixed_point(q, x, y, cfg, grad="implicit"))(p)
        return g_ep, g_imp, aux

    g_ep, g_imp, aux = both(params)
    a = np.concatenate([np.ravel(v) for v in jax.tree.leaves(g_ep)]).astype(np.float64)
    b = np.concatenate([np.ravel(v) for v in jax.tree.leaves(g_imp)]).astype(np.float64)
    cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
    return (
        f"{name}: EP gradient vs the implicit gradient at its free-phase state, on {n} training "
        f"images: cosine {cos:.3f}, relative error {rel:.2f}; mean relative residual of the free "
        f"phase {float(jnp.mean(aux.residual)):.3g} (T1={cfg.t1}), of the nudged phases "
        f"{float(jnp.mean(aux.nudged_residual)):.3g} (T2={cfg.t2})"
    )


def describe_training(cfg: ml_collections.ConfigDict) -> str:
    """One line on how a model of the study was trained, from its training config."""
    m = cfg.model
    arch = f"{m.name}" + (f" channels {tuple(m.channels)}" if "channels" in m else "")
    n = cfg.get("num_train", None)
    budget = (
        f"{cfg.num_steps} steps" if cfg.get("num_steps", 0) else f"{cfg.get('num_epochs')} epochs"
    )
    o = cfg.optimizer
    lr = o.get("lrs", None) or o.get("lr", None)
    parts = [
        f"{cfg.name}: trainer `{cfg.trainer}`, {arch}; {budget} on "
        f"{'all' if n is None else n} {cfg.dataset} training images, batch {cfg.batch_size}, "
        f"lr {lr}" + (f" ({o.schedule})" if "schedule" in o else "")
    ]
    if cfg.trainer == "ep":
        parts.append(
            f"EP: free phase T1={m.t1}, nudged T2={m.t2}, beta={m.beta} ({m.estimator}, "
            f"random sign {m.random_sign})"
        )
    adv, objective = cfg.get("adv", None), cfg.get("objective", "adversarial")
    if adv is not None and objective != "clean":  # the DEQ configs keep `adv` for every objective
        norm = {"linf": "L∞", "l2": "L2"}[str(adv.get("norm", "linf"))]
        parts.append(
            f"{'adversarial training' if objective == 'adversarial' else objective}: PGD-{norm} "
            f"at eps {adv.eps:g}, {adv.steps} steps"
        )
    return "; ".join(parts)


def _merged(base: ml_collections.ConfigDict, over) -> ml_collections.ConfigDict:
    """A copy of `base` with the (nested) entries of `over` replacing its own."""
    out = ml_collections.ConfigDict(base.to_dict())

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict | ml_collections.ConfigDict) and k in dst:
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(out, over)
    return out


def _common_test_split(config: ml_collections.ConfigDict, keys: Sequence[str]) -> Any:
    """The dataset of the first model; every other model must have the same test split."""
    data = load_data(config.models[keys[0]])
    for k in keys[1:]:
        other = load_data(config.models[k])
        if not (
            np.array_equal(other.x_test, data.x_test) and np.array_equal(other.y_test, data.y_test)
        ):
            raise ValueError(
                f"models {keys[0]!r} and {k!r} have different test splits "
                f"({config.models[keys[0]].dataset} vs {config.models[k].dataset}); a study "
                "compares models on one dataset"
            )
    return data


@dataclasses.dataclass(frozen=True)
class _Run:
    key: str
    seed: int
    classifier: Classifier
    variants: tuple[Classifier, ...]
    note: str | None = None
    cache_dir: str | None = None
    cache_id: str | None = None
    spectrum: dict[str, Any] | None = None


_CACHE_NOTE = (
    "evaluation cache: each attack cell (attack, strength, settings, examples, key) and each "
    "corruption result is stored in <model run>/eval_cache/ and reused while the trained "
    "weights, code and settings are unchanged; the time budget counts this run's work only"
)


def _eval_cache(
    config: ml_collections.ConfigDict,
    trained: Trained,
    cfg: ml_collections.ConfigDict,
    run_dir: str,
) -> EvalCache | None:
    """The model's evaluation cache, <run_dir>/eval_cache, when the study config asks for one."""
    if not config.get("eval_cache", False):
        return None
    try:
        fingerprint = model_fingerprint(trained.state, cfg, cfg.name)
    except Uncacheable as e:
        logging.warning("%s: evaluation not cached (%s)", cfg.name, e)
        return None
    return EvalCache(os.path.join(run_dir, "eval_cache"), fingerprint)


def _ep_note(trained: Trained, data: Any, name: str, cache: EvalCache | None) -> str:
    """`ep_gradient_check`'s line, stored in the model's evaluation cache when it has one."""
    n = 64
    compute = lambda: dict(note=np.asarray(ep_gradient_check(trained, data, name, n)))
    if cache is None:
        return str(compute()["note"])
    parts = dict(name=name, examples=array_digest(data.x_train[:n], data.y_train[:n]))
    return str(cache.get_or_compute("ep_gradient_check", parts, compute, {"note": ()})["note"])


def ep_spectrum(
    trained: Trained, data: Any, x: np.ndarray, y: np.ndarray, scfg: ml_collections.ConfigDict
) -> dict[str, np.ndarray]:
    """Spectral radius of the trained EP-CNN's free-phase Jacobian at s*(x) and at s*(x_adv).

    Args:
      trained: the EP-CNN run; x [n, H, W, C] float images in [0, 1], y [n] labels.
      scfg: krylov (Arnoldi steps), eps and steps of the PGD-Linf that makes x_adv (the exact
        BPTT gradient of the prediction).

    Returns:
      clean, adversarial: [n] |lambda_max| estimates; fooled: [n] bool, PGD changed the class.
    """
    params = trained.state["params"]
    cfg = ep_train.build_ep_config(trained.config, data)
    key = jax.random.PRNGKey(0)
    adv = pgd(trained.classifier.logits_fn, x, y, key=key, norm="linf",
              eps=float(scfg.eps), steps=int(scfg.steps))  # fmt: skip
    res = spectrum.spectrum_clean_vs_adversarial(
        spectrum.ep_map(params, cfg),
        lambda xb: ep.free_phase(params, xb, cfg).z,
        jnp.asarray(x),
        adv.x_adv,
        k=int(scfg.krylov),
        top=1,
        batch_size=64,
        key=key,
    )
    return dict(
        clean=np.abs(res.clean[:, 0]),
        adversarial=np.abs(res.adversarial[:, 0]),
        fooled=np.asarray(adv.success),
    )


def _ep_spectrum(
    trained: Trained, data: Any, config: ml_collections.ConfigDict, cache: EvalCache | None
) -> dict[str, Any] | None:
    """`ep_spectrum` on the first examples of the evaluation's order (cached), for the report."""
    scfg = config.ep_analysis.get("spectrum", None)
    if not scfg:
        return None
    ctx = make_context(trained.classifier, data.x_test, data.y_test, config.eval)
    n = min(int(scfg.num_examples), len(ctx.x))
    x, y = ctx.x[:n], ctx.y[:n]
    compute = lambda: ep_spectrum(trained, data, x, y, scfg)  # noqa: E731
    if cache is None:
        out = compute()
    else:
        parts = dict(examples=array_digest(x, y), settings=scfg.to_dict())
        shapes = {"clean": (n,), "adversarial": (n,), "fooled": (n,)}
        out = cache.get_or_compute("ep_spectrum", parts, compute, shapes)
    return dict(
        model=str(trained.config.get("name", "EP-CNN")),
        num_examples=n,
        krylov=int(scfg.krylov),
        eps=float(scfg.eps),
        steps=int(scfg.steps),
        fooled=float(np.mean(out["fooled"])),
        radius_clean=[float(v) for v in out["clean"]],
        radius_adversarial=[float(v) for v in out["adversarial"]],
    )


def _run_dir(workdir: str, key: str, seed: int, seeds: Sequence[int]) -> str:
    """Where one (model, seed) of a study trains: workdir/<key>, or <key>-seed<s> with seeds."""
    return os.path.join(workdir, key if len(seeds) == 1 else f"{key}-seed{seed}")


def _with_study_teacher(
    config: ml_collections.ConfigDict,
    cfg: ml_collections.ConfigDict,
    workdir: str,
    seed: int,
    require_trained: bool,
) -> ml_collections.ConfigDict:
    """A distillation config whose teacher is a model of the study (`cfg.study_teacher`, a key
    of config.models): `teacher` becomes that model's config at this seed and `teacher_workdir`
    its run directory, so the student distils the very run the study evaluates."""
    key = cfg.study_teacher
    if key not in config.models:
        raise ValueError(
            f"{cfg.name}: study_teacher {key!r} is not a model of the study ({list(config.models)})"
        )
    teacher = ml_collections.ConfigDict(config.models[key].to_dict())
    teacher.seed = seed
    teacher_dir = _run_dir(workdir, key, seed, [int(s) for s in config.seeds])
    if require_trained and not os.path.isdir(os.path.join(teacher_dir, "checkpoints")):
        raise FileNotFoundError(
            f"no checkpoints for {teacher.name}, the teacher of {cfg.name}, in {teacher_dir}; "
            f"train the study first: python -m experiments.study --config=... --workdir={workdir}"
        )
    cfg.teacher = teacher
    cfg.teacher_workdir = teacher_dir
    return cfg


def _inference_costs(
    config: ml_collections.ConfigDict, runs: Sequence[_Run], data: Any
) -> dict[str, Any] | None:
    """Throughput of the teacher named by `config.inference_cost.teacher` and of its students
    (models whose `study_teacher` it is), first seed, on the clean-accuracy examples.

    Returns:
      None without `config.inference_cost`; else teacher, num_examples, batch_size, repeats and
      rows (name, images_per_s, f_evals_per_image, speedup vs the teacher, agreement with the
      teacher's predictions on those examples, agreement_test on the whole test split: the
      distillation's own measure, which a 1000-example subset estimates only to +-1.4 points).
    """
    ic = config.get("inference_cost", None)
    if not ic:
        return None
    seed0 = int(config.seeds[0])
    first = {r.key: r for r in runs if r.seed == seed0}
    if ic.teacher not in first:
        return None
    chosen = [first[ic.teacher]] + [
        r for k, r in first.items() if config.models[k].get("study_teacher", None) == ic.teacher
    ]
    x = make_context(chosen[0].classifier, data.x_test, data.y_test, config.eval).x
    bs = min(int(ic.batch_size), len(x))
    x = jnp.asarray(x[: len(x) // bs * bs])
    x_all, _ = check_data(data.x_test, data.y_test)
    rows, teacher_pred, teacher_all = [], None, None
    for r in chosen:
        c = inference_cost(r.classifier, x, batch_size=bs, repeats=int(ic.repeats))
        pred = predict(r.classifier.logits_fn, np.asarray(x), batch_size=bs)
        pred_all = predict(r.classifier.logits_fn, x_all, batch_size=bs)
        teacher_pred = pred if teacher_pred is None else teacher_pred
        teacher_all = pred_all if teacher_all is None else teacher_all
        ips0 = rows[0]["images_per_s"] if rows else c["images_per_s"]
        rows.append(
            dict(
                name=r.classifier.name,
                images_per_s=c["images_per_s"],
                f_evals_per_image=c["f_evals_per_image"],
                speedup=c["images_per_s"] / ips0,
                agreement=float(np.mean(pred == teacher_pred)),
                agreement_test=float(np.mean(pred_all == teacher_all)),
            )
        )
    return dict(
        teacher=chosen[0].classifier.name,
        num_examples=len(x),
        num_test=len(x_all),
        batch_size=bs,
        repeats=int(ic.repeats),
        rows=rows,
    )


def _train_or_load(
    config: ml_collections.ConfigDict,
    workdir: str,
    keys: Sequence[str],
    data: Any,
    timing: dict[str, float],
    require_trained: bool,
) -> list[_Run]:
    """Every (model, seed) of the study trained, or loaded when its run has finished."""
    seeds = [int(s) for s in config.seeds]
    runs = []
    for key in keys:
        for seed in seeds:
            cfg = ml_collections.ConfigDict(config.models[key].to_dict())
            cfg.seed = seed
            run_dir = _run_dir(workdir, key, seed, seeds)
            if cfg.get("study_teacher", None) is not None:
                cfg = _with_study_teacher(config, cfg, workdir, seed, require_trained)
            if require_trained and not os.path.isdir(os.path.join(run_dir, "checkpoints")):
                raise FileNotFoundError(
                    f"no checkpoints for {cfg.name} in {run_dir}; train it first, e.g. "
                    f"python -m experiments.study --config=... --workdir={workdir}"
                )
            t0 = time.perf_counter()
            trained = get_trainer(cfg.trainer)(cfg, run_dir)
            timing[f"train-or-load {cfg.name} (seed {seed})"] = time.perf_counter() - t0
            cache = _eval_cache(config, trained, cfg, run_dir)
            variants: tuple[Classifier, ...] = ()
            note, spec = None, None
            if cfg.trainer == "ep" and seed == seeds[0]:  # depth analysis on the first seed only
                variants = tuple(ep_gradient_variants(trained, config.ep_analysis, cfg.name, data))
                note = _ep_note(trained, data, cfg.name, cache)
                t0 = time.perf_counter()
                spec = _ep_spectrum(trained, data, config, cache)
                timing[f"spectrum at s* {cfg.name}"] = time.perf_counter() - t0
            clf = dataclasses.replace(trained.classifier, name=cfg.name)
            cache_dir, cache_id = (cache.directory, cache.model_id) if cache else (None, None)
            runs.append(_Run(key, seed, clf, variants, note, cache_dir, cache_id, spec))
    return runs


# Free JAX's compiled programs before a model's evaluation above this fraction of the process's
# memory-map limit (`host.memory_map_fraction`): one model's programs fit in the rest.
_MAP_FRACTION = 0.4


def run_study(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    out_dir: str | None = None,
    only: Sequence[str] | None = None,
    require_trained: bool = False,
) -> StudyResults:
    """Trains (or loads finished runs of) every model of a study, evaluates them, writes the report.

    Args:
      config: see eqrobust/configs/study.py (models, model_order, seeds, ep_analysis, eval).
      workdir: model runs go to workdir/<model key> (workdir/<key>-seed<s> with several seeds).
      out_dir: report.md, results.json, plots and galleries go here (default: workdir).
      only: model keys to include (default: config.model_order).
      require_trained: raise FileNotFoundError instead of training a model without checkpoints
        (experiments/evaluate.py).

    Returns:
      The results (also written to results.json next to report.md).
    """
    t_start, c_start = time.perf_counter(), compile_seconds()
    timing: dict[str, float] = {}
    keys = list(config.model_order) if only is None else list(only)
    unknown = [k for k in keys if k not in config.models]
    if unknown:
        raise ValueError(f"model_order names {unknown} not in config.models {list(config.models)}")
    data = _common_test_split(config, keys)
    runs = _train_or_load(config, workdir, keys, data, timing, require_trained)
    t0 = time.perf_counter()
    overrides = config.get("eval_overrides", None) or {}
    models = []
    for run in runs:
        if host.memory_map_fraction() > _MAP_FRACTION:  # before LLVM runs out of mappings
            logging.warning("freeing JAX's compiled programs before %s (memory maps)", run.key)
            jax.clear_caches()
            compile_once.clear()
        ecfg = _merged(config.eval, overrides[run.key]) if run.key in overrides else config.eval
        models.append(
            evaluate_classifier(
                run.classifier,
                data.x_test,
                data.y_test,
                ecfg,
                seed=run.seed,
                gradient_variants=run.variants,
                cache_dir=run.cache_dir,
                cache_id=run.cache_id,
            )
        )
    timing["evaluate all models"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    costs = _inference_costs(config, runs, data)
    if costs is not None:
        timing["inference cost"] = time.perf_counter() - t0
    trainers = ", ".join(f"{config.models[k].name} ({config.models[k].trainer})" for k in keys)
    dataset = config.models[keys[0]].dataset
    meta = dict(
        title=config.get("title", "Robustness study"),
        dataset=dataset,
        scale=config.get("scale", "?"),
        num_test=len(data.x_test),
        notes=[f"models (trainer): {trainers}"]
        + ([_CACHE_NOTE] if any(r.cache_id for r in runs) else []),
        training=[describe_training(config.models[k]) for k in keys]
        + [r.note for r in runs if r.note],
        timing=timing,
        eval_config=config.eval.to_dict(),
        class_names=CLASS_NAMES.get(dataset),
    )
    if costs is not None:
        meta["inference_cost"] = costs
    spectra = [r.spectrum for r in runs if r.spectrum]
    if spectra:
        meta["spectrum"] = spectra[0]
    results = StudyResults(models=tuple(models), meta=meta)
    timing["total before report"] = time.perf_counter() - t_start
    timing["of which compilation"] = compile_seconds() - c_start
    report.write_report(results, workdir if out_dir is None else out_dir)
    return results
