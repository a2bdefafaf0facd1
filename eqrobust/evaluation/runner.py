"""Runs the evaluation stages on one classifier (or several) and times each stage once."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from eqrobust import compile_options
from eqrobust.attacks._common import num_classes
from eqrobust.classifier import Classifier
from eqrobust.evaluation import health, stages
from eqrobust.evaluation.cache import EvalCache
from eqrobust.evaluation.config import check_config, default_config
from eqrobust.evaluation.context import Context, check_data, eval_devices, gradient_info
from eqrobust.results import ModelResult, StudyResults


def make_context(
    classifier: Classifier,
    x_test: np.ndarray,
    y_test: np.ndarray,
    config: ml_collections.ConfigDict,
    *,
    cache_dir: str | None = None,
    cache_id: str | None = None,
    **kwargs: Any,
) -> Context:
    """The examples of one evaluation: a fixed permutation of the test split (seeded by
    `config.seed`), its prefix of `config.num_examples`; every stage's subset is a prefix of it.

    With `cache_dir`, attack cells and corruption results are stored there and reused
    (`eqrobust.evaluation.cache`); `cache_id` is then required: the model's fingerprint, e.g.
    `cache.model_fingerprint(trained.state, trained.config, name)`.
    """
    check_config(config)
    cache = None if cache_dir is None else EvalCache(cache_dir, cache_id or "")
    k = num_classes(classifier.logits_fn, jnp.asarray(x_test[:1], jnp.float32))
    x_test, y_test = check_data(x_test, y_test, k)
    total = len(x_test)
    order = np.random.default_rng(config.seed).permutation(total)
    n = config.num_examples
    if n is not None and n <= 0:
        raise ValueError(f"num_examples must be positive or None (full split), got {n}")
    idx = order if n is None else order[: min(int(n), total)]
    return Context(
        classifier=classifier,
        config=config,
        x=x_test[idx],
        y=y_test[idx],
        num_test=total,
        key=jax.random.key(config.seed),
        cache=cache,
        devices=eval_devices(),
        **kwargs,
    )


def evaluate_classifier(
    classifier: Classifier,
    x_test: np.ndarray,
    y_test: np.ndarray,
    config: ml_collections.ConfigDict | None = None,
    *,
    seed: int = 0,
    gradient_variants: Sequence[Classifier] = (),
    corrupt: Callable[..., np.ndarray] | None = None,
    corruption_names: Sequence[str] | None = None,
    stage_list: Sequence[tuple[str, stages.Stage]] = stages.STAGES,
    cache_dir: str | None = None,
    cache_id: str | None = None,
) -> ModelResult:
    """Runs every stage of the suite on one classifier, then the health checks.

    Args:
      classifier: an `eqrobust.classifier.Classifier`.
      x_test: `[N, H, W, C]` test images, float in [0, 1] or uint8.
      y_test: `[N]` int labels.
      config: evaluation config (`default_config()` when None).
      seed: the training seed of this model (stored; the report aggregates seeds by name).
      gradient_variants: classifiers with the same prediction but other attack-gradient paths
        (EP: BPTT through t steps, implicit); each is attacked with `config.dynamics.attack` and
        judged by `classifier.logits_fn`.
      corrupt: `corrupt(x, name, severity, *, seed) -> x` (default `eqrobust.corruptions.corrupt`).
      corruption_names: corruptions to run (default: `config.corruptions.names` or all).
      stage_list: the stages to run, in order (default `stages.STAGES`).
      cache_dir: store each attack cell (one attack at one strength) and each corruption result
        here as soon as it is computed, and reuse stored ones: a rerun skips finished work, an
        interrupted run continues, a changed setting reruns only what it enters. None (default):
        nothing is stored.
      cache_id: the model's fingerprint (required with `cache_dir`; part of every key), e.g.
        `eqrobust.evaluation.cache.model_fingerprint(trained.state, trained.config, name)`.

    Returns:
      `ModelResult`; gallery images are NumPy arrays in memory.
    """
    config = default_config() if config is None else config
    ctx = make_context(
        classifier,
        x_test,
        y_test,
        config,
        gradient_variants=tuple(gradient_variants),
        corrupt=corrupt,
        corruption_names=corruption_names,
        cache_dir=cache_dir,
        cache_id=cache_id,
    )
    fields: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with compile_options.options(classifier.compiler_options):
        for name, stage in stage_list:
            t0 = time.perf_counter()
            fields.update(stage(ctx, fields))
            seconds[name] = time.perf_counter() - t0
    seconds.update(ctx.stage_seconds)
    if ctx.cache is not None:
        ctx.log(
            f"evaluation cache {ctx.cache.directory}: {ctx.cache.hits} results reused, "
            f"{ctx.cache.misses} computed"
        )
    result = ModelResult(
        name=classifier.name,
        seed=int(seed),
        num_test=ctx.num_test,
        gradient=gradient_info(classifier),
        seconds=seconds,
        **fields,
    )
    result = health.with_verdicts(result, config)
    for c in result.health:
        ctx.log(f"health ({c.id}) {'PASS' if c.passed else 'FAIL'}: {c.message}")
    return result


def evaluate(
    classifiers: Sequence[Classifier],
    x_test: np.ndarray,
    y_test: np.ndarray,
    config: ml_collections.ConfigDict | None = None,
    *,
    seeds: Sequence[int] | None = None,
    gradient_variants: dict[str, Sequence[Classifier]] | None = None,
    meta: dict[str, Any] | None = None,
    **kwargs: Any,
) -> StudyResults:
    """Runs `evaluate_classifier` on several classifiers -> `StudyResults`."""
    if kwargs.get("cache_id") is not None and len(classifiers) > 1:
        raise ValueError(
            "cache_id is one model's fingerprint; with several classifiers call "
            "evaluate_classifier per model with its own cache_id"
        )
    config = default_config() if config is None else config
    seeds = [0] * len(classifiers) if seeds is None else list(seeds)
    models = tuple(
        evaluate_classifier(
            clf,
            x_test,
            y_test,
            config,
            seed=s,
            gradient_variants=(gradient_variants or {}).get(clf.name, ()),
            **kwargs,
        )
        for clf, s in zip(classifiers, seeds, strict=True)
    )
    m = dict(meta or {})
    m.setdefault("num_test", len(x_test))
    m.setdefault("eval_config", config.to_dict())
    return StudyResults(models=models, meta=m)
