"""Tests for the report writer: files, sections, schema, seed aggregation."""

import copy
import json
import math
import os

import numpy as np
import pytest

from eqrobust import evaluation, report
from eqrobust.evaluation import health
from eqrobust.report import plots
from eqrobust.results import ModelResult, StudyResults, from_json


def _model(name, seed, *, ep=False, masked=False, rng=None):
    """A hand-written per-model results dict with the shape `evaluate_classifier` returns."""
    rng = np.random.default_rng(seed) if rng is None else rng
    jitter = lambda: float(rng.uniform(-0.02, 0.02))
    clean = 0.9 + jitter()
    attacks = {}
    for a, spec in evaluation.ATTACKS.items():
        values = (
            [0.07, 0.31, 0.49, 1.0] if spec.norm == "l2" else [1 / 255, 3 / 255, 5 / 255, 8 / 255]
        )
        if spec.param == "c":
            values = [0.005, 0.01, 0.1, 1.0]
        acc = [max(0.0, clean - 0.2 * (i + 1) + jitter()) for i in range(4)]
        if masked and a == "pgd_linf":
            acc = [clean] * 4
        attacks[a] = dict(
            label=spec.label,
            norm=spec.norm,
            box=spec.box,
            param=spec.param,
            values=values,
            accuracy=acc,
            n=500 if a in ("pgd_l2", "pgd_linf") else 200,
            settings=dict(steps=20),
            large=dict(value=10.0, accuracy=0.0, n=200),
            reduced=spec.is_reduced(dict(steps=20)),
        )
    m = dict(
        name=name,
        seed=seed,
        num_test=10000,
        clean=dict(accuracy=clean, n=10000),
        gradient=dict(
            mode="unrolled(30)" if ep else "autodiff",
            gradient_depth=30 if ep else None,
            prediction_depth=30 if ep else None,
            matches_prediction=True,
        ),
        attacks=attacks,
        corruptions=dict(
            n=500,
            severities=[1, 2, 3, 4, 5],
            accuracy={
                c: [clean - 0.05 * s for s in range(1, 6)] for c in ("gaussian_noise", "fog")
            },
            per_severity=[clean - 0.05 * s for s in range(1, 6)],
            mean=clean - 0.15,
        ),
        dynamics=None,
        seconds=dict(clean=1.0, pgd_l2=2.0),
        masking_comparisons=[
            dict(
                attack="pgd_linf",
                value=v,
                white_accuracy=attacks["pgd_linf"]["accuracy"][i],
                black_accuracy=attacks["square_linf"]["accuracy"][i],
                n=200,
            )
            for i, v in enumerate(attacks["pgd_linf"]["values"])
        ],
        convergence_runs=[],
        gallery=dict(
            attack="pgd_l2",
            eps=1.5,
            clean=rng.uniform(size=(3, 8, 8, 1)),
            adversarial=rng.uniform(size=(3, 8, 8, 1)),
            labels=[0, 1, 2],
            pred_clean=[0, 1, 2],
            pred_adversarial=[1, 1, 0],
        ),
    )
    if ep:
        m["dynamics"] = dict(
            prediction_depth=30,
            trajectory=dict(
                steps=list(range(1, 31)),
                accuracy=[min(clean, 0.1 + 0.05 * t) for t in range(30)],
                n=500,
            ),
            attack_depth=dict(
                attack="pgd_l2",
                values=[0.31, 1.0],
                n=100,
                variants=[
                    dict(
                        mode=f"unrolled({t})",
                        gradient_depth=t,
                        prediction_depth=30,
                        matches_prediction=t == 30,
                        accuracy=[0.6 + jitter(), 0.2 + jitter()],
                    )
                    for t in (5, 10, 30)
                ]
                + [
                    dict(
                        mode="implicit",
                        gradient_depth=None,
                        prediction_depth=30,
                        matches_prediction=True,
                        accuracy=[0.5, 0.1],
                    )
                ],
            ),
        )
    return m


def _typed(m: dict) -> ModelResult:
    return health.with_verdicts(from_json(ModelResult, m), evaluation.default_config())


def _results(seeds=(0,), edit=lambda m: None):
    """Typed results of hand-written models; `edit(model_dict)` changes them before typing."""
    models = []
    for s in seeds:
        models += [_model("EP-CNN", s, ep=True), _model("BP-CNN", s, masked=True)]
    for m in models:
        edit(m)
    return StudyResults(
        models=tuple(_typed(m) for m in models),
        meta=dict(
            dataset="fashion_mnist",
            scale="cpu",
            notes=["a note"],
            timing={"train EP-CNN": 300.0},
            spectrum=dict(
                model="EP-CNN",
                num_examples=4,
                krylov=20,
                eps=8 / 255,
                steps=20,
                fooled=0.5,
                radius_clean=[0.9, 1.0, 1.05, 0.95],
                radius_adversarial=[1.0, 1.1, 0.97, 1.02],
            ),  # fmt: skip
        ),
    )


def test_report_files_and_sections(tmp_path):
    paths = report.write_report(_results(), str(tmp_path))
    for key in ("attacks", "corruptions", "trajectory", "attack_depth", "spectrum"):
        assert os.path.getsize(paths[key]) > 1000, key
    galleries = sorted(p for p in os.listdir(tmp_path) if p.startswith("gallery_"))
    assert galleries == ["gallery_bp_cnn_seed0.png", "gallery_ep_cnn_seed0.png"]
    md = open(paths["report"]).read()
    for section in (
        "## Examples evaluated",
        "## Summary",
        "## Adversarial attacks",
        "### PGD-L2",
        "### PGD-Linf",
        "### AutoAttack-Linf",
        "### Square-Linf",
        "### C&W-L2",
        "## Natural corruptions",
        "## Dynamics of the equilibrium models",
        "accuracy along the dynamics",
        "robust accuracy vs attack-gradient path",
        "## Spectrum of the linearised dynamics",
        "| PGD-Linf x_adv | 1.010 | ",
        "## Health checks",
        "## Perturbation gallery",
        "## Time budget",
    ):
        assert section in md, section
    for f in [fname for _, fname, _ in plots.FIGURES.values()] + galleries:
        assert f"]({f})" in md, f
    # Subsets are never silent.
    assert "**subset: 500 of 10000 test images**" in md
    assert "**subset: 200 of 10000 test images**" in md
    # The masked BP-CNN (PGD-Linf == clean, above Square) fails (b), shown beside its cells.
    assert "possible gradient masking" in md
    assert "⚠b" in md and "**FAIL**" in md
    # The EP unrolled rows shallower than T are flagged (e) in the attack-depth table.
    assert md.count("NO ⚠e") == 2


def test_results_json_schema(tmp_path):
    paths = report.write_report(_results(), str(tmp_path))
    js = json.load(open(paths["json"]))
    back = StudyResults.from_json(js)
    assert back.models[1].attacks["pgd_l2"] == _results().models[1].attacks["pgd_l2"]
    assert js["models"][0]["gallery"]["file"] == "gallery_ep_cnn_seed0.png"
    assert js["models"][0]["gallery"]["clean"] is None  # arrays are not in the JSON
    ids = {c["id"] for c in js["models"][1]["health"]}
    assert ids == {"a", "b", "e"}

    broken = copy.deepcopy(js)
    del broken["models"][0]["clean"]
    with pytest.raises(ValueError, match=r"models\[0\]: missing key 'clean'"):
        StudyResults.from_json(broken)
    broken = copy.deepcopy(js)
    broken["models"][1]["attacks"]["pgd_l2"]["accuracy"][0] = 1.5
    with pytest.raises(ValueError, match="outside"):
        StudyResults.from_json(broken)
    broken = copy.deepcopy(js)
    broken["models"][1]["health"] = [c for c in broken["models"][1]["health"] if c["id"] != "e"]
    with pytest.raises(ValueError, match=r"\(e\) missing"):
        StudyResults.from_json(broken)
    broken = copy.deepcopy(js)
    broken["models"][0]["attacks"]["cw_l2"]["values"].pop()
    with pytest.raises(ValueError, match="strengths"):
        StudyResults.from_json(broken)
    broken = copy.deepcopy(js)
    broken["models"][0]["clean"]["n"] = "many"
    with pytest.raises(ValueError, match=r"models\[0\].clean.n: expected int"):
        StudyResults.from_json(broken)
    with pytest.raises(ValueError, match="schema_version"):
        StudyResults.from_json(dict(js, schema_version=1))


def test_mean_ci():
    mean, half = report.mean_ci([0.5, 0.6, 0.7])
    # t_{0.975, 2} = 4.302652729911275 (tables); std = 0.1.
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3))
    assert report.mean_ci([0.4]) == (0.4, None)


def test_several_seeds_show_ci(tmp_path):
    res = _results(seeds=(0, 1, 2))
    report.write_report(res, str(tmp_path))
    md = open(tmp_path / "report.md").read()
    assert "mean ± 95 % CI" in md
    header, rows = report.summary_rows(res)
    assert [r[0] for r in rows] == ["EP-CNN", "BP-CNN"]
    clean = [m.clean.accuracy for m in res.models if m.name == "EP-CNN"]
    m, h = report.mean_ci(clean)
    assert rows[0][1] == f"{m:.3f}±{h:.3f}"
    # One gallery per run.
    assert len([p for p in os.listdir(tmp_path) if p.startswith("gallery_")]) == 6


def test_no_ep_model_says_so(tmp_path):
    res = _results()
    res = StudyResults(models=res.models[1:], meta=res.meta)
    paths = report.write_report(res, str(tmp_path))
    md = open(paths["report"]).read()
    assert "No model with dynamics" in md
    assert "trajectory" not in paths


def test_reduced_autoattack_budget_is_stated(tmp_path):
    marker = "reduced budget: weaker than standard AutoAttack"
    standard = dict(steps=100, queries=5000, targets=9)
    spec = evaluation.ATTACKS["autoattack_linf"]

    def settings(targets):
        def edit(m):
            s = dict(standard, targets=targets)
            for a in ("autoattack_linf", "autoattack_l2"):
                m["attacks"][a].update(settings=s, reduced=spec.is_reduced(s))
            for a in ("autoattack_rand_linf", "autoattack_rand_l2"):  # full 'rand' budget
                rand = evaluation.ATTACKS[a]
                m["attacks"][a].update(settings=s, reduced=rand.is_reduced(s))

        return edit

    md = open(report.write_report(_results(edit=settings(9)), str(tmp_path / "std"))["report"])
    md = md.read()
    assert marker not in md and "full budget of its version" in md
    md = open(report.write_report(_results(edit=settings(3)), str(tmp_path / "red"))["report"])
    md = md.read()
    assert marker in md and "targets=3" in md


def test_wilson_interval_in_attack_tables(tmp_path):
    from eqrobust.report.text import wilson

    lo, hi = wilson(0.5, 100)  # textbook value: [0.404, 0.596]
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    assert wilson(0.0, 20)[0] == 0.0 and wilson(1.0, 20)[1] == 1.0
    res = _results()
    md = open(report.write_report(res, str(tmp_path))["report"]).read()
    acc = res.models[0].attacks["pgd_l2"].accuracy[0]
    lo, hi = wilson(acc, 500)
    assert f"{acc:.3f} [{lo:.2f}, {hi:.2f}]" in md
