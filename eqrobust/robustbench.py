"""RobustBench-style records: `evaluate(classifier, dataset, threat_model)` -> one JSON-ready dict.

The record carries RobustBench's model-info fields (`clean_acc`, `autoattack_acc`,
`corruptions_acc` in percent, `dataset`, `threat_model`, `eps`) plus what RobustBench leaves
implicit and a reduced run must state: the number of test points (`n_ex` of `num_test`), the
attack budget, and whether the run was reduced (a subset, or a budget below standard AutoAttack).
It is built on `eqrobust.evaluation.evaluate_classifier` (stages clean, probes, attacks,
corruptions) and the attacks registry, so numbers equal those of the full suite.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from eqrobust import data as data_lib
from eqrobust.attacks import registry
from eqrobust.classifier import Classifier
from eqrobust.evaluation import default_config, evaluate_classifier, stages
from eqrobust.results import SCHEMA_VERSION, ModelResult

# RobustBench threat model -> (attack of the suite, RobustBench's standard eps).
THREAT_MODELS: dict[str, tuple[str | None, float | None]] = {
    "Linf": ("autoattack_linf", 8 / 255),
    "L2": ("autoattack_l2", 0.5),
    "corruptions": (None, None),
}
RECORD_FORMAT = "eqrobust-robustbench/1"


def _percent(acc: float | None) -> float | None:
    return None if acc is None else round(100.0 * float(acc), 2)


def _test_split(dataset: data_lib.Dataset | str, data_dir: str | None) -> tuple[str, Any, Any]:
    if isinstance(dataset, str):
        dataset = data_lib.load(dataset, data_dir=data_dir)
    if not isinstance(dataset, data_lib.Dataset):
        raise ValueError(
            f"dataset must be a name ({data_lib.DATASETS}) or an eqrobust.data.Dataset, "
            f"got {type(dataset).__name__}"
        )
    return dataset.name, dataset.x_test, dataset.y_test


def _config(
    attack: str | None,
    eps: float | None,
    num_examples: int | None,
    corruptions: bool,
    autoattack: dict[str, Any],
    corruption_names: Sequence[str] | None,
    severities: Sequence[int],
    batch_size: int,
    seed: int,
    progress: bool,
) -> Any:
    c = default_config()
    c.seed, c.batch_size, c.progress = seed, batch_size, progress
    c.num_examples = num_examples
    c.attacks = () if attack is None else (attack,)
    if attack is not None:
        c[attack].grid = (float(eps),)
        c[attack].large = None  # check (a) belongs to the full suite, not to this record
        c[attack].settings.update(autoattack)
    c.corruptions.enabled = corruptions
    c.corruptions.names = None if corruption_names is None else tuple(corruption_names)
    c.corruptions.severities = tuple(int(s) for s in severities)
    c.gallery.num_images = 0
    return c


def record(
    result: ModelResult, dataset: str, threat_model: str, eps: float | None, attack: str | None
) -> dict[str, Any]:
    """The RobustBench-style dict of one `ModelResult` (see `evaluate`)."""
    aa = result.attacks.get(attack) if attack else None
    cr = result.corruptions
    subset = result.clean.n < result.num_test
    reduced_budget = bool(aa.reduced) if aa else False
    budget: dict[str, Any] = {}
    if aa:
        budget["attack"] = attack
        budget["autoattack"] = dict(aa.settings)
        budget["autoattack_n_ex"] = aa.n
    if cr:
        budget["corruptions"] = sorted(cr.accuracy)
        budget["severities"] = list(cr.severities)
        budget["corruptions_n_ex"] = cr.n
    return {
        "format": RECORD_FORMAT,
        "name": result.name,
        "dataset": dataset,
        "threat_model": threat_model,
        "eps": eps,
        "clean_acc": _percent(result.clean.accuracy),
        "autoattack_acc": _percent(aa.accuracy[0]) if aa else None,
        "corruptions_acc": _percent(cr.mean) if cr else None,
        "n_ex": result.clean.n,
        "num_test": result.num_test,
        "budget": budget,
        "reduced": subset or reduced_budget,
        "subset": subset,
        "reduced_budget": reduced_budget,
        "number_forward_passes": 1,
        "gradient": {"mode": result.gradient.mode, "matches": result.gradient.matches_prediction},
        "health": [{"id": h.id, "passed": h.passed, "message": h.message} for h in result.health],
        "schema_version": SCHEMA_VERSION,
    }


def evaluate(
    classifier: Classifier,
    dataset: data_lib.Dataset | str,
    threat_model: str = "Linf",
    *,
    eps: float | None = None,
    num_examples: int | None = None,
    corruptions: bool = False,
    autoattack: dict[str, Any] | None = None,
    corruption_names: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    data_dir: str | None = None,
    batch_size: int = 250,
    seed: int = 0,
    progress: bool = False,
    path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluates one classifier under one RobustBench threat model -> a RobustBench-style record.

    Example:
      rec = robustbench.evaluate(trained.classifier, "fashion_mnist", "Linf", path="rb.json")

    Args:
      classifier: an `eqrobust.classifier.Classifier`.
      dataset: a dataset name for `eqrobust.data.load` or a loaded `eqrobust.data.Dataset`;
        its test split is used.
      threat_model: "Linf" (AutoAttack at eps 8/255), "L2" (AutoAttack at eps 0.5) or
        "corruptions" (clean + mean accuracy over the corruptions, no attack).
      eps: override the threat model's standard eps (the record then says so by its value).
      num_examples: evaluate a fixed random subset of the test split (None: all of it).
      corruptions: also run the corruptions under an Linf/L2 threat model.
      autoattack: AutoAttack settings (`steps`, `queries`, `targets`); defaults are standard
        AutoAttack; anything smaller marks the record `reduced`.
      corruption_names: default all 15 of `eqrobust.corruptions.CORRUPTIONS`.
      severities: corruption severities.
      data_dir: passed to `eqrobust.data.load` when `dataset` is a name.
      batch_size: examples per compiled call.
      seed: the evaluation seed (subset permutation, attack keys).
      progress: tqdm bars and log lines.
      path: also write the record there as JSON.

    Returns:
      dict: format, name, dataset, threat_model, eps, clean_acc, autoattack_acc, corruptions_acc
      (percent, None when not run), n_ex, num_test, budget, reduced (= subset or reduced_budget),
      subset, reduced_budget, number_forward_passes, gradient, health (checks d, f and those
      that apply), schema_version.
    """
    if threat_model not in THREAT_MODELS:
        raise ValueError(f"unknown threat_model {threat_model!r}; expected one of {THREAT_MODELS}")
    attack, standard_eps = THREAT_MODELS[threat_model]
    eps = standard_eps if eps is None else float(eps)
    if attack is not None:
        registry.get(attack)
    run_corruptions = corruptions or threat_model == "corruptions"
    name, x, y = _test_split(dataset, data_dir)
    cfg = _config(
        attack,
        eps,
        num_examples,
        run_corruptions,
        dict(autoattack or {}),
        corruption_names,
        severities,
        batch_size,
        seed,
        progress,
    )
    wanted = {"clean", "probes", "attacks", "corruptions"}
    stage_list = tuple((n, s) for n, s in stages.STAGES if n in wanted)
    result = evaluate_classifier(
        classifier, np.asarray(x), np.asarray(y), cfg, stage_list=stage_list
    )
    rec = record(result, name, threat_model, eps, attack)
    if path is not None:
        with open(path, "w") as f:
            json.dump(rec, f, indent=2)
    return rec
