"""Tests for adversarial training's adversary, the study configs, and a smoke study end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from eqrobust import study as study_lib
from eqrobust.configs import adv_cnn, study
from eqrobust.profiling import compile_seconds
from eqrobust.report import plots
from eqrobust.results import StudyResults
from eqrobust.train import adversarial

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_perturb_is_l2_pgd_inside_the_ball():
    key = jax.random.key(0)
    w = jax.random.normal(key, (6 * 6 * 1, 3))
    logits_fn = lambda x: x.reshape(x.shape[0], -1) @ w
    x = jax.random.uniform(jax.random.key(1), (16, 6, 6, 1), minval=0.2, maxval=0.8)
    y = jnp.argmax(logits_fn(x), -1)  # correctly classified clean points
    adv = ml_collections.ConfigDict(
        dict(eps=0.5, norm="l2", steps=5, step_size=None, random_start=True)
    )
    x_adv = adversarial.make_perturb(adv)(logits_fn, x, y, jax.random.key(2))
    delta = np.linalg.norm(np.asarray(x_adv - x).reshape(16, -1), axis=1)
    assert np.all(delta <= 0.5 + 1e-5) and np.all(delta > 0)
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    ce = lambda xx: optax.softmax_cross_entropy_with_integer_labels(logits_fn(xx), y)
    assert np.all(np.asarray(ce(x_adv)) > np.asarray(ce(x)))
    with pytest.raises(ValueError, match="eps"):
        adversarial.make_perturb(ml_collections.ConfigDict(dict(eps=0.0, steps=3)))
    with pytest.raises(ValueError, match="config.adv"):
        adversarial.train(ml_collections.ConfigDict(dict(name="x")), None)


@pytest.mark.parametrize("scale", ["smoke", "cpu", "paper"])
def test_configs(scale):
    a = adv_cnn.get_config(scale)
    assert a.trainer == "adversarial" and a.adv.eps == 0.5 and a.adv.norm == "l2"
    s = study.get_config(scale)
    assert list(s.model_order) == ["ep_cnn", "bp_cnn", "adv_cnn_05", "adv_cnn_10"]
    assert [s.models[k].name for k in s.model_order] == [
        "EP-CNN",
        "BP-CNN",
        "Adv-CNN(0.5)",
        "Adv-CNN(1.0)",
    ]
    assert s.models.adv_cnn_10.adv.eps == 1.0 and s.models.adv_cnn_05.adv.eps == 0.5
    assert {s.models[k].dataset for k in s.model_order} == (
        {"synthetic"} if scale == "smoke" else {"fashion_mnist"} if scale == "cpu" else {"cifar10"}
    )
    if scale == "paper":  # the papers' protocol: full test split for the white-box attacks
        assert s.eval.num_examples is None and s.eval.pgd_l2.num_examples is None
        assert s.eval.pgd_l2.grid == (0.07, 0.31, 0.49, 1.0)
    with pytest.raises(ValueError, match="scale"):
        study.get_config("huge")


def test_smoke_study_end_to_end(tmp_path):
    """The study binary at smoke scale: trains four models, evaluates, writes a valid report."""
    workdir = str(tmp_path / "study")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.study",
            "--config=experiments/configs/study.py:smoke",
            f"--workdir={workdir}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| EP-CNN |" in proc.stdout and "| Adv-CNN(1.0) |" in proc.stdout

    js = json.load(open(os.path.join(workdir, "results.json")))
    res = StudyResults.from_json(js)  # schema and invariants
    names = [m.name for m in res.models]
    assert names == ["EP-CNN", "BP-CNN", "Adv-CNN(0.5)", "Adv-CNN(1.0)"]
    for m in res.models:
        assert m.clean.n == 32 and m.num_test == 256
        assert set(m.attacks) >= {"pgd_l2", "pgd_linf", "square_linf"}
        # (g) exists where the model has a fixed-point residual (EP-CNN); (h) only on failure.
        expected = {"a", "b", "c", "d", "e", "f"} | ({"g"} if m.residual is not None else set())
        assert {c.id for c in m.health} == expected
        assert m.corruptions.severities == (1, 5)
        assert os.path.exists(os.path.join(workdir, m.gallery.file))
    assert res.models[0].residual is not None and res.models[1].residual is None
    # EP gradient diagnostics of the trained EP-CNN, in the report's notes.
    (note,) = [n for n in res.meta["training"] if "EP gradient vs the implicit gradient" in n]
    assert any(t.startswith("Adv-CNN(1.0): trainer `adversarial`") for t in res.meta["training"])
    assert "## Models and training" in open(os.path.join(workdir, "report.md")).read()
    cosine = float(note.split("cosine ")[1].split(",")[0])
    assert -1.0 <= cosine <= 1.0 and "nudged phases" in note
    bp = res.models[1]
    assert bp.attacks["autoattack_linf"].n == 8 and bp.attacks["cw_l2"].n == 8
    assert bp.attacks["autoattack_linf"].reduced and not bp.attacks["pgd_l2"].reduced
    ep = res.models[0]
    assert ep.gradient.prediction_depth == ep.dynamics.prediction_depth
    assert len(ep.dynamics.trajectory.accuracy) == ep.dynamics.prediction_depth
    variants = ep.dynamics.attack_depth.variants
    assert [(v.mode, v.matches_prediction) for v in variants] == [
        ("unrolled(3)", False),
        ("implicit", True),
    ]
    # Spectrum of the free phase's Jacobian at s*, clean and PGD points (issue 13 item 3).
    sp = res.meta["spectrum"]
    assert sp["model"] == "EP-CNN" and sp["num_examples"] == 8 and sp["krylov"] == 6
    radii = np.asarray(sp["radius_clean"] + sp["radius_adversarial"])
    assert radii.shape == (16,) and np.all(np.isfinite(radii)) and np.all(radii > 0)
    # Accuracy along the free phase ends at the prediction's clean accuracy (same examples).
    assert ep.dynamics.trajectory.accuracy[-1] == pytest.approx(ep.clean.accuracy)
    _same_numbers_as_before_the_refactor(js)

    md = open(os.path.join(workdir, "report.md")).read()
    for section in (
        "## Examples evaluated",
        "## Summary",
        "### PGD-L2",
        "### AutoAttack-Linf",
        "### Square-Linf",
        "### C&W-L2",
        "## Natural corruptions",
        "## Dynamics of the equilibrium models",
        "## Spectrum of the linearised dynamics",
        "## Health checks",
        "## Perturbation gallery",
        "## Time budget",
        "**subset: 32 of 256 test images**",
        "train-or-load EP-CNN",
    ):
        assert section in md, section
    for _, fname, _ in plots.FIGURES.values():
        assert os.path.getsize(os.path.join(workdir, fname)) > 1000, fname

    # experiments/evaluate.py's path: evaluate finished runs only, into another directory.
    cfg = study.get_config("smoke")
    cfg.eval.attacks = ("pgd_l2",)
    cfg.eval.corruptions.enabled = False
    out = str(tmp_path / "eval_bp")
    again = study_lib.run_study(cfg, workdir, out_dir=out, only=["bp_cnn"], require_trained=True)
    assert [m.name for m in again.models] == ["BP-CNN"]
    # The same trained weights: clean accuracy on the same examples is unchanged.
    assert again.models[0].clean == bp.clean
    assert os.path.exists(os.path.join(out, "report.md"))


def _same_numbers_as_before_the_refactor(js):
    """The smoke study (fixed seeds) gives the numbers the pre-refactor code wrote (schema 1,
    fixtures/smoke_study_v1.json). Accuracies may differ by one example (float reassociation
    across XLA versions); counts, strengths and verdict structure must match exactly."""
    old = json.load(open(os.path.join(REPO, "tests", "fixtures", "smoke_study_v1.json")))
    assert [m["name"] for m in js["models"]] == [m["name"] for m in old["models"]]
    for new, ref in zip(js["models"], old["models"], strict=True):
        n = new["clean"]["n"]
        close = lambda a, b, n=n: abs(a - b) <= 1.0 / n + 1e-9
        assert new["clean"] == ref["clean"]
        assert set(new["attacks"]) == set(ref["attacks"])
        for name, a in new["attacks"].items():
            r = ref["attacks"][name]
            assert (a["values"], a["n"], a["settings"]) == (r["values"], r["n"], r["settings"])
            assert all(close(x, y, a["n"]) for x, y in zip(a["accuracy"], r["accuracy"]))
            assert (a["large"] is None) == (r["large"] is None)
        for key in ("mean", "per_severity"):
            got, want = new["corruptions"][key], ref["corruptions"][key]
            assert np.allclose(got, want, atol=1.0 / new["corruptions"]["n"] + 1e-9), key
        assert len(new["masking_comparisons"]) == len(ref["masking_comparisons"])
        assert [c["value"] for c in new["convergence_runs"]] == [
            c["value"] for c in ref["convergence_runs"]
        ]
        # Schema 1's (d) was the metadata check, now (e); (d), (f) and (g) are new measurements.
        old_ids = sorted("e" if c["id"] == "d" else c["id"] for c in ref["health"])
        assert sorted(c["id"] for c in new["health"] if c["id"] not in "dfg") == old_ids
        if ref["ep"]:
            got, want = new["dynamics"]["trajectory"], ref["ep"]["free_phase"]
            assert got["steps"] == want["steps"]
            assert np.allclose(got["accuracy"], want["accuracy"], atol=1.0 / got["n"] + 1e-9)
            got, want = new["dynamics"]["attack_depth"], ref["ep"]["attack_depth"]
            accs = lambda d: [v["accuracy"] for v in d["variants"]]
            assert np.allclose(accs(got), accs(want), atol=1.0 / got["n"] + 1e-9)


def test_evaluate_binary_requires_trained_runs(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.evaluate",
            "--config=experiments/configs/study.py:smoke",
            f"--workdir={tmp_path}",
            "--models=bp_cnn",
        ],
        cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "FileNotFoundError" in proc.stderr and "no checkpoints for BP-CNN" in proc.stderr


def test_compile_seconds_counts_new_compilations_only():
    """The time budgets' "of which compilation": grows on a new program, not on a cached call."""
    f = jax.jit(lambda v: jnp.tanh(v) @ v.T)
    x, x2 = np.ones((64, 64), np.float32), np.full((64, 64), 2.0, np.float32)
    c0 = compile_seconds()
    f(x).block_until_ready()
    c1 = compile_seconds()
    f(x2).block_until_ready()  # same shapes: the cached executable
    assert c1 > c0
    assert compile_seconds() == c1
