"""Tests for the evaluation suite: analytic robust accuracy, health checks (a)-(d), EP analyses."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqrobust import evaluation, report
from eqrobust.evaluation.stages import worst_cases
from eqrobust.models import Classifier, GradientPath
from eqrobust.results import Accuracy, GradientInfo, StudyResults, wilson

H = W = 8
# L2 distances of the test points to the decision boundary; chosen away from every eps of the
# grids below (PGD-L2 with a random start reaches ~0.93 eps along the gradient in 20 steps).
DISTANCES = np.array([0.02, 0.06, 0.13, 0.2, 0.35, 0.7])
L2_EPS = (0.07, 0.31, 0.49, 1.0)
LINF_EPS = (1 / 255, 3 / 255, 5 / 255, 8 / 255)


def _direction():
    """w with |w_j| = 1/8 on the 64 pixels: ||w||_2 = 1, ||w||_1 = 8."""
    signs = np.where(np.random.default_rng(0).uniform(size=(H, W, 1)) < 0.5, -1.0, 1.0)
    return (signs / 8.0).astype(np.float32)


def _linear_logits(w):
    wj = jnp.asarray(w)

    def logits_fn(x):
        s = jnp.sum((x - 0.5) * wj, axis=(1, 2, 3))
        return jnp.stack([-s, s], axis=-1)

    return logits_fn


def _linear_data(w, copies=4):
    """Points at known L2 distance d from the hyperplane w.(x - 0.5) = 0, both classes."""
    rng = np.random.default_rng(1)
    xs, ys, ds = [], [], []
    for _ in range(copies):
        for d in DISTANCES:
            for label in (0, 1):
                noise = rng.uniform(-0.05, 0.05, size=w.shape)
                noise -= np.sum(noise * w) * w  # orthogonal to w (||w|| = 1)
                sign = 1.0 if label == 1 else -1.0
                xs.append(0.5 + noise + sign * d * w)
                ys.append(label)
                ds.append(d)
    return np.asarray(xs, np.float32), np.asarray(ys, np.int32), np.asarray(ds)


def _config(attacks, **kw):
    c = evaluation.default_config()
    c.attacks = attacks
    c.progress = False
    c.batch_size = 24
    c.pgd_l2.grid = L2_EPS
    c.pgd_linf.grid = LINF_EPS
    c.square_linf.grid = LINF_EPS
    c.square_linf.settings.queries = 300
    c.corruptions.enabled = False
    c.health.more_restarts_factor = 1
    c.gallery.num_images = 2
    for k, v in kw.items():
        c[k] = v
    return c


def test_linear_model_analytic_accuracy_and_healthy():
    w = _direction()
    x, y, d = _linear_data(w)
    clf = Classifier(logits_fn=_linear_logits(w), name="linear")
    res = evaluation.evaluate_classifier(clf, x, y, _config(("pgd_l2", "pgd_linf", "square_linf")))
    assert res.clean == Accuracy(accuracy=1.0, n=len(x))
    # Evaluation order is a fixed permutation; all examples are used, so the analytic
    # accuracy is the fraction of distances beyond eps (L2: d; Linf: d / ||w||_1 = d / 8).
    want_l2 = [float(np.mean(d > e)) for e in L2_EPS]
    want_linf = [float(np.mean(d / 8 > e)) for e in LINF_EPS]
    np.testing.assert_allclose(res.attacks["pgd_l2"].accuracy, want_l2)
    np.testing.assert_allclose(res.attacks["pgd_linf"].accuracy, want_linf)
    # Black-box Square cannot beat the optimal white-box attack on a linear model.
    sq = np.asarray(res.attacks["square_linf"].accuracy)
    assert np.all(sq >= np.asarray(want_linf) - 1e-9)
    checks = {(c.id, c.attack, c.value): c for c in res.health}
    assert all(c.passed for c in res.health), [c.message for c in res.health]
    assert {c.id for c in res.health} == {"a", "b", "c", "d", "e", "f"}
    assert checks[("a", "pgd_l2", None)].message.startswith("PGD-L2 at ε=10")
    assert res.mean_robustness == pytest.approx(np.mean(want_l2 + want_linf + list(sq)))
    # Worst case over attacks: PGD is optimal on a linear model, so per eps it is PGD's value.
    wc = {(w.norm, w.value): w for w in res.worst_case}
    assert sorted(wc) == sorted([("l2", e) for e in L2_EPS] + [("linf", e) for e in LINF_EPS])
    for e, want in zip(LINF_EPS, want_linf):
        assert wc[("linf", e)].attacks == ("pgd_linf", "square_linf")
        assert wc[("linf", e)].accuracy == pytest.approx(want) and wc[("linf", e)].n == len(x)
    for e, want in zip(L2_EPS, want_l2):
        assert wc[("l2", e)].attacks == ("pgd_l2",) and wc[("l2", e)].accuracy == pytest.approx(
            want
        )
    g = res.gallery
    assert g.clean.shape == g.adversarial.shape == (2, H, W, 1)
    assert g.eps == 1.0 and len(g.labels) == 2
    delta = np.linalg.norm((g.adversarial - g.clean).reshape(2, -1), axis=1)
    assert np.all(delta <= 1.0 + 1e-5)
    assert g.pred_adversarial == tuple(1 - v for v in g.labels)  # eps 1.0 breaks every point


def _quantised_logits(x):
    """Zero input gradients everywhere: a 4-level quantisation of the pixels."""
    q = jnp.round(x * 4.0) / 4.0
    f = jnp.mean(q, axis=(1, 2, 3)) - 0.5
    return 10.0 * jnp.stack([-f, f], axis=-1)


def test_quantised_model_flags_gradient_masking():
    rng = np.random.default_rng(0)
    y = np.arange(32) % 2
    x = (
        np.where(y == 1, 0.7, 0.3)[:, None, None, None]
        + rng.uniform(-0.05, 0.05, size=(32, H, W, 1))
    ).astype(np.float32)
    clf = Classifier(logits_fn=_quantised_logits, name="quantised")
    c = _config(("pgd_linf", "square_linf"))
    c.pgd_linf.grid = c.square_linf.grid = (0.4,)
    res = evaluation.evaluate_classifier(clf, x, y, c)
    assert res.clean.accuracy == 1.0
    assert res.attacks["pgd_linf"].accuracy == (1.0,)  # zero gradients: PGD goes nowhere
    assert res.attacks["square_linf"].accuracy[0] <= 0.1  # queries still work
    b = [c for c in res.health if c.id == "b"]
    assert len(b) == 1 and not b[0].passed
    assert "possible gradient masking" in b[0].message
    # (c): more steps change nothing because the gradients are zero; (d): zero, measured.
    assert res.cell_flags("pgd_linf", 0.4) == ["a", "b", "c", "d"]
    assert res.cell_flags("square_linf", 0.4) == []


def test_shallow_gradient_flags_d():
    w = _direction()
    x, y, _ = _linear_data(w, copies=1)
    clf = Classifier(
        logits_fn=_linear_logits(w),
        name="shallow",
        prediction_depth=10,
        gradient=GradientPath("unrolled", 3),
    )
    c = _config(("pgd_l2",))
    c.pgd_l2.grid, c.pgd_l2.large, c.gallery.num_images = (0.31,), None, 0
    res = evaluation.evaluate_classifier(clf, x, y, c)
    # The gradient itself is honest (measured (d) passes); the declaration is not ((e) fails).
    assert [c.passed for c in res.health if c.id == "d"] == [True]
    d = [c for c in res.health if c.id == "e"]
    assert len(d) == 1 and not d[0].passed and "MISMATCH" in d[0].message
    assert "gradient depth 3, prediction depth 10" in d[0].message
    assert res.gradient == GradientInfo(
        mode="unrolled(3)", gradient_depth=3, prediction_depth=10, matches_prediction=False
    )
    assert "e" in res.cell_flags("pgd_l2", 0.31)
    # Same classifier with matching depths passes (e).
    ok = dataclasses.replace(clf, gradient=GradientPath("unrolled", 10))

    def check_e(info):
        checks = evaluation.health_checks(
            dataclasses.replace(res, gradient=info), evaluation.default_config()
        )
        return next(c for c in checks if c.id == "e")

    assert check_e(evaluation.gradient_info(ok)).passed
    # A declared randomised forward fails (e): its white-box numbers would need EOT.
    e = check_e(evaluation.gradient_info(dataclasses.replace(ok, randomized=True)))
    assert not e.passed and "RANDOMISED" in e.message


def test_ep_analyses_judge_with_prediction():
    """Gradient variants are attacked with their own gradient but judged by the prediction."""
    w = _direction()
    x, y, d = _linear_data(w, copies=1)
    pred = _linear_logits(w)
    T = 6

    def trajectory_fn(xb):  # readout is informative from step 3 on
        lg = pred(xb)
        return jnp.stack([lg * (t >= 2) for t in range(T)])

    clf = Classifier(
        logits_fn=pred,
        name="ep-like",
        trajectory_fn=trajectory_fn,
        prediction_depth=T,
        gradient=GradientPath("unrolled", T),
    )
    # A variant whose gradient is orthogonal to w: the attack moves but cannot change s.
    w_orth = np.roll(w, 1, axis=0)
    w_orth -= np.sum(w_orth * w) * w
    g = _linear_logits(w_orth)
    blind = Classifier(
        logits_fn=lambda xb: jax.lax.stop_gradient(pred(xb)) + g(xb) - jax.lax.stop_gradient(g(xb)),
        name="ep-like",
        prediction_depth=T,
        gradient=GradientPath("unrolled", 2),
    )
    c = _config(("pgd_l2",))
    c.pgd_l2.settings.random_start = False  # the blind variant then cannot move along w at all
    c.dynamics.grid = (0.31, 1.0)
    res = evaluation.evaluate_classifier(clf, x, y, c, gradient_variants=[clf, blind])
    fp = res.dynamics.trajectory
    assert fp.steps == tuple(range(1, T + 1))
    assert fp.accuracy[:2] == (0.5, 0.5) and fp.accuracy[2:] == (1.0,) * (T - 2)
    rows = res.dynamics.attack_depth.variants
    np.testing.assert_allclose(rows[0].accuracy, [np.mean(d > 0.31), np.mean(d > 1.0)])
    assert rows[1].accuracy == (1.0, 1.0)
    assert [r.matches_prediction for r in rows] == [True, False]


def test_subsets_are_recorded_and_inputs_checked():
    w = _direction()
    x, y, _ = _linear_data(w)
    clf = Classifier(logits_fn=_linear_logits(w), name="linear")
    c = _config(("pgd_l2",))
    c.pgd_l2.num_examples = 10
    c.pgd_l2.grid, c.pgd_l2.large, c.gallery.num_images = (0.31,), None, 0
    c.corruptions.enabled = True
    c.corruptions.severities = (1, 5)
    identity = lambda xb, name, severity, *, seed: xb
    res = evaluation.evaluate_classifier(
        clf, x, y, c, corrupt=identity, corruption_names=("fake_a", "fake_b")
    )
    assert res.attacks["pgd_l2"].n == 10 and res.clean.n == len(x)
    assert res.attacks["pgd_l2"].large is None
    assert res.corruptions.accuracy == {"fake_a": (1.0, 1.0), "fake_b": (1.0, 1.0)}
    assert res.corruptions.mean == 1.0
    with pytest.raises(ValueError, match="unknown attack"):
        evaluation.evaluate_classifier(clf, x, y, _config(("pgd_l3",)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluation.evaluate_classifier(clf, x * 3, y, c)
    with pytest.raises(ValueError, match="num_examples"):
        evaluation.evaluate_classifier(clf, x, y, _config(("pgd_l2",), num_examples=0))


def test_convergence_check_compares_counts_not_floats():
    from eqrobust.evaluation import health
    from eqrobust.results import ConvergenceRun

    def run(a, b):
        r = ConvergenceRun("pgd_l2", 0.31, 20, 1, 100, 5, a, b, n=100)
        return health.check_convergence(r, "PGD-L2", tolerance=0.01).passed

    assert 0.51 - 0.50 > 0.01  # the float comparison this replaces failed here
    assert run(0.50, 0.51) and run(0.51, 0.50)
    assert not run(0.50, 0.52) and not run(0.52, 0.50)


def test_worst_case_is_the_per_example_minimum_on_the_common_prefix():
    t, f = True, False
    correct = {
        ("pgd_linf", 0.1): np.array([t, t, f, t, t, f]),
        ("square_linf", 0.1): np.array([t, f, t, t]),  # a nested prefix of 4 examples
        ("pgd_linf", 0.2): np.array([f, t, f, f, f, f]),
        ("pgd_l2", 0.1): np.array([t, t]),
        ("cw_l2", 0.1): np.array([f, f]),  # C&W's constant, not an eps: left out
    }
    norms = {"pgd_linf": "linf", "square_linf": "linf", "pgd_l2": "l2"}
    got = {(w.norm, w.value): w for w in worst_cases(correct, norms)}
    assert sorted(got) == [("l2", 0.1), ("linf", 0.1), ("linf", 0.2)]
    w = got[("linf", 0.1)]
    assert (w.n, w.accuracy, w.attacks) == (4, 0.5, ("pgd_linf", "square_linf"))  # [t, f, f, t]
    assert (got[("linf", 0.2)].n, got[("linf", 0.2)].accuracy) == (6, 1 / 6)
    assert got[("l2", 0.1)].attacks == ("pgd_l2",) and got[("l2", 0.1)].accuracy == 1.0


def test_report_headline_is_the_worst_case(tmp_path):
    w = _direction()
    x, y, _ = _linear_data(w)
    clf = Classifier(logits_fn=_linear_logits(w), name="linear")
    res = evaluation.evaluate_classifier(clf, x, y, _config(("pgd_linf", "square_linf")))
    results = StudyResults(models=(res,))
    head, rows = report.summary_rows(results)
    mean_wc = np.mean([v.accuracy for v in res.worst_case])
    n = res.worst_case[0].n
    # The cell carries its interval: the means of the per-eps 95 % Wilson bounds.
    lo, hi = np.mean([wilson(v.accuracy, v.n) for v in res.worst_case], axis=0)
    cell = rows[0][head.index(f"**Worst case L∞** (mean, n={n})")]
    assert cell == f"{mean_wc:.3f} [{lo:.2f}, {hi:.2f}]"
    assert lo < mean_wc < hi
    # Two models on different numbers of examples: the column says so instead of a bare n.
    fewer = dataclasses.replace(
        res,
        name="fewer",
        attacks={k: dataclasses.replace(a, n=a.n - 1) for k, a in res.attacks.items()},
    )
    head2, _ = report.summary_rows(StudyResults(models=(res, fewer)))
    label = res.attacks["pgd_linf"].label
    assert f"{label} (mean; ⚠ n differs between models: {n - 1}/{n})" in head2
    paths = report.write_report(results, str(tmp_path))
    md = open(paths["report"]).read()
    assert "## Worst case over attacks" in md and "pgd_linf, square_linf" in md
    assert StudyResults.from_json(results.to_json()).models[0].worst_case == res.worst_case


def test_l2_attacks_have_a_black_box_counterpart():
    """Square-L2 is registered and check (b) compares PGD-L2 with it on the same examples; on a
    linear model it cannot beat the optimal white-box attack."""
    w = _direction()
    x, y, d = _linear_data(w)
    cfg = _config(("pgd_l2", "square_l2"))
    cfg.square_l2.grid = L2_EPS
    cfg.square_l2.settings.queries = 300
    res = evaluation.evaluate_classifier(Classifier(_linear_logits(w), name="linear"), x, y, cfg)
    want = np.asarray([float(np.mean(d > e)) for e in L2_EPS])
    sq = np.asarray(res.attacks["square_l2"].accuracy)
    assert res.attacks["square_l2"].box == "black" and np.all(sq >= want - 1e-9)
    assert sq[-1] < 1.0  # it does find adversarial examples
    cmp = {(c.attack, c.value) for c in res.masking_comparisons}
    assert cmp == {("pgd_l2", e) for e in L2_EPS}
    b = [c for c in res.health if c.id == "b"]
    assert len(b) == len(L2_EPS) and all(c.passed for c in b)


def test_paper_protocol_cw_is_left_out_of_the_headline():
    """The papers' C&W (registered with headline=False) fails (a) but neither enters the mean
    robustness nor replaces it with a flag; the same failure of a headline attack does."""
    from eqrobust.evaluation.health import with_verdicts
    from eqrobust.report import sections
    from eqrobust.results import AttackResult, LargeRun

    w = _direction()
    x, y, _ = _linear_data(w, copies=1)
    cfg = _config(("pgd_l2",))
    cfg.pgd_l2.grid = (0.31,)
    res = evaluation.evaluate_classifier(Classifier(_linear_logits(w), name="linear"), x, y, cfg)
    paper = AttackResult(
        "C&W-L2 (paper protocol)", "l2", "white", "c", (0.01,), (0.0,), 8, {},
        large=LargeRun(100.0, 0.5, 8), headline=False,
    )  # fmt: skip

    def summary(name, a):
        r = with_verdicts(dataclasses.replace(res, attacks={**res.attacks, name: a}), cfg)
        head, rows = sections.summary_rows(StudyResults(models=(r,)))
        return r, dict(zip(head, rows[0], strict=True))

    r, row = summary("cw_l2", paper)
    assert r.mean_robustness == res.mean_robustness
    assert [c.id for c in r.health if not c.passed] == ["a"]
    assert not row["Mean robustness"].startswith("⚠")
    assert row["Failed health checks"] == "(a) C&W-L2 (paper protocol)"
    r, row = summary("cw_l2_strong", dataclasses.replace(paper, headline=True))
    assert row["Mean robustness"] == "⚠a" and r.mean_robustness < res.mean_robustness
