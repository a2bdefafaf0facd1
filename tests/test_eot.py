"""EOT for randomised classifiers (issue 15 item 2): PGD/APGD `eot_iter`, AutoAttack "rand".

Measured on the noisy linear model below (64 examples, 8x8x1 images, weight noise sigma = 4,
10 PGD steps of eps / 4 from x, margin loss, eps at which the exact-gradient attack breaks every
example); numbers from `python -m pytest -q tests/test_eot.py -s`:

    PGD robust accuracy: exact expected gradient 0.00, EOT-20 0.02, single draw 0.30
    gradient cosine to the exact one at x: EOT-20 0.77, single draw 0.27
"""

from __future__ import annotations

import importlib
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqrobust import attacks, evaluation
from eqrobust.attacks import _common as C
from eqrobust.attacks import losses, registry
from eqrobust.classifier import Classifier

aa_mod = importlib.import_module("eqrobust.attacks.autoattack")

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "attacks_before_eot.npz"

# ----------------------------------------------------------------------------- (b) old path


def tiny_model():
    """A ReLU MLP on 4x4x1 images with 5 classes, weights and images on dyadic grids.

    Returns:
        (f, x [8, 4, 4, 1], y [8]): y is f's prediction except y[0] (a clean error).
    """
    rng = np.random.default_rng(7)
    w1 = jnp.asarray(rng.integers(-8, 9, size=(16, 12)) / 8, jnp.float32)
    w2 = jnp.asarray(rng.integers(-8, 9, size=(12, 5)) / 8, jnp.float32)
    b2 = jnp.asarray(rng.integers(-4, 5, size=(5,)) / 8, jnp.float32)

    def f(x):
        return jax.nn.relu(x.reshape(x.shape[0], -1) @ w1) @ w2 + b2

    x = jnp.asarray(rng.integers(0, 257, size=(8, 4, 4, 1)) / 256, jnp.float32)
    y = jnp.argmax(f(x), -1).astype(jnp.int32).at[0].set(0)
    return f, x, y


def fixture_outputs() -> dict[str, np.ndarray]:
    """PGD, APGD and AutoAttack outputs on `tiny_model`; `attacks_before_eot.npz` holds them as
    the code before EOT produced them (this function run on the eqrobust of commit 26b7315)."""
    f, x, y = tiny_model()
    key = jax.random.key(3)
    runs = {
        "pgd_linf": attacks.pgd(f, x, y, key=key, eps=0.125, steps=10, restarts=2),
        "pgd_l2": attacks.pgd(f, x, y, key=key, eps=0.5, norm="l2", steps=10),
        "apgd_ce": attacks.apgd(f, x, y, key=key, eps=0.125, steps=20),
        "apgd_dlr_l2": attacks.apgd(f, x, y, key=key, eps=0.5, norm="l2", steps=20, loss="dlr"),
        "apgd_t": attacks.apgd(
            f, x, y, key=key, eps=0.125, steps=20, targeted=True, n_target_classes=3
        ),
        # APGD-CE breaks 6 points, APGD-T 1 (FAB-T and Square do not run); compact=False and
        # steps=20 reuse the two APGD programs above, so this costs no compilation.
        "aa": attacks.autoattack(
            f, x, y, key=key, eps=0.25, steps=20, queries=50, targets=3, compact=False
        ),
    }
    out = {}
    for name, r in runs.items():
        for field, v in r._asdict().items():
            out[f"{name}.{field}"] = np.asarray(v)
    return out


def test_eot_iter_1_without_sampler_reproduces_the_code_before_eot_bit_for_bit():
    """(b) eot_iter = 1 and no sampler: the same outputs, bit for bit, as before EOT.

    (The jaxprs of `_pgd` and `_apgd` with sample_fn=None, eot_iter=1 were also compared with
    those of the code before EOT once, by hand: identical text.)
    """
    want = np.load(FIXTURE)
    got = fixture_outputs()
    assert sorted(got) == sorted(want.files)
    assert 0 < want["pgd_linf.success"].sum() < 8  # the fixture is not trivial
    for k in want.files:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ----------------------------------------------------------------------------- (a) EOT-PGD


def noisy_linear(seed: int = 0, n: int = 64, sigma: float = 4.0):
    """A two-class linear model whose weights get Gaussian noise at every draw.

    logits = [0, x . (w + sigma * noise) + b], noise ~ N(0, I) per example and draw, so the
    input gradient of the margin is w + sigma * noise and its expectation is exactly w: the
    noise-free model (the judged `logits_fn`) is the exact-expectation model.

    Returns:
        (logits_fn, sample_logits_fn, w [64], x [n, 8, 8, 1], y [n]).
    """
    rng = np.random.default_rng(seed)
    w_np = rng.choice([-1.0, 1.0], 64) * rng.uniform(0.5, 1.5, 64)
    w = jnp.asarray(w_np, jnp.float32)
    x = jnp.asarray(rng.uniform(0.3, 0.7, (n, 8, 8, 1)), jnp.float32)
    b = -float(np.median(np.asarray(x).reshape(n, -1) @ w_np))

    def two(z):
        return jnp.stack([jnp.zeros_like(z), z], axis=-1)

    def logits_fn(xa):
        return two(xa.reshape(xa.shape[0], -1) @ w + b)

    def sample_logits_fn(xa, key):
        xf = xa.reshape(xa.shape[0], -1)
        noise = jax.random.normal(key, xf.shape, xf.dtype)
        return two(jnp.sum(xf * (w + sigma * noise), axis=-1) + b)

    y = jnp.argmax(logits_fn(x), -1).astype(jnp.int32)
    return logits_fn, sample_logits_fn, w, x, y


def test_eot_pgd_beats_single_draw_and_approaches_the_exact_expectation():
    """(a) single-draw PGD is much weaker than EOT-PGD (20 draws), which is close to PGD with
    the exact expected gradient (numbers in the module docstring)."""
    f, sample, w, x, y = noisy_linear()
    margins = np.abs(np.asarray(f(x)[:, 1]))
    eps = float(1.02 * margins.max() / np.abs(np.asarray(w)).sum())  # exact PGD breaks all
    kw = dict(key=jax.random.key(1), eps=eps, steps=10, step_size=eps / 4, random_start=False)
    kw["loss"] = "margin"

    def robust(r):
        wrong = np.asarray(jnp.argmax(f(r.x_adv), -1) != y)
        np.testing.assert_array_equal(np.asarray(r.success), wrong)  # judged by logits_fn
        assert np.all(np.asarray(C.linf(r.x_adv - x)) <= eps + 1e-6)
        return float(np.mean(~wrong))

    exact = robust(attacks.pgd(f, x, y, **kw))
    single = robust(attacks.pgd(f, x, y, sample_logits_fn=sample, **kw))
    eot = robust(attacks.pgd(f, x, y, sample_logits_fn=sample, eot_iter=20, **kw))

    # The exact expected gradient of the objective -margin: -w for class 1, +w for class 0.
    exact_g = np.where(np.asarray(y)[:, None] == 1, -1.0, 1.0) * np.asarray(w)[None]

    def cosine(n_draws):
        obj = lambda z: losses.objective("margin", z, y, None)  # noqa: E731
        vg = C.eot_loss_and_grad(f, sample, obj, n_draws)
        g = np.asarray(vg(x, jax.random.key(2))[2]).reshape(len(x), -1)
        cos = np.sum(g * exact_g, 1) / np.linalg.norm(g, axis=1) / np.linalg.norm(exact_g, axis=1)
        return float(np.mean(cos))

    cos1, cos20 = cosine(1), cosine(20)
    print(f"\nPGD robust accuracy: exact {exact:.2f}, EOT-20 {eot:.2f}, single draw {single:.2f}")
    print(f"gradient cosine to the exact one: EOT-20 {cos20:.2f}, single draw {cos1:.2f}")
    assert exact == 0.0
    assert single - eot >= 0.25
    assert eot - exact <= 0.1
    assert cos20 > 0.6 > 0.35 > cos1


# ----------------------------------------------------------------------------- (c) AutoAttack rand


def noisy_multiclass(seed: int = 0, n: int = 16, k: int = 5, sigma: float = 2.0):
    """A K-class linear model with Gaussian weight noise per draw (x . (W + sigma N) + b).

    Returns:
        (logits_fn: the noise-free forward, sample_logits_fn, x [n, 6, 6, 1], y [n]).
    """
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(36, k)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(k,)) * 0.1, jnp.float32)
    x = jnp.asarray(rng.uniform(0.2, 0.8, (n, 6, 6, 1)), jnp.float32)

    def logits_fn(xa):
        return xa.reshape(xa.shape[0], -1) @ w + b

    def sample_logits_fn(xa, key):
        xf = xa.reshape(xa.shape[0], -1)
        noise = jax.random.normal(key, (*xf.shape, k), xf.dtype)
        return jnp.einsum("bd,bdk->bk", xf, w + sigma * noise) + b

    y = jnp.argmax(logits_fn(x), -1).astype(jnp.int32).at[0].set(0)
    return logits_fn, sample_logits_fn, x, y


def test_autoattack_rand_reports_only_real_successes():
    """(c) version="rand" runs APGD-CE then APGD-DLR with EOT; every reported success is a
    misclassification by the judged forward inside the eps-ball, and robust points are not."""
    f, sample, x, y = noisy_multiclass()
    eps = 0.05
    res = attacks.autoattack(
        f, x, y, key=jax.random.key(0), eps=eps, version="rand", steps=10,
        sample_logits_fn=sample,
    )  # fmt: skip
    wrong = np.asarray(jnp.argmax(f(res.x_adv), -1) != y)
    succ, robust = np.asarray(res.success), np.asarray(res.robust)
    assert np.all(wrong[succ]) and not np.any(wrong[robust])
    np.testing.assert_array_equal(succ, ~robust)
    assert np.all(np.asarray(C.linf(res.x_adv - x)) <= eps + 1e-6)
    assert np.all((np.asarray(res.x_adv) >= 0) & (np.asarray(res.x_adv) <= 1))
    assert set(np.asarray(res.broken_by).tolist()) <= {-1, 0, 1, 2}
    assert res.broken_by[0] == 0 or bool(res.clean_correct[0])
    clean = float(np.mean(res.clean_correct))
    print(f"\nAutoAttack-rand robust accuracy {robust.mean():.2f} (clean {clean:.2f})")
    assert 0 < succ.sum() < len(succ)


def test_eot_arguments_are_checked_and_versions_have_their_budgets():
    f, sample, x, y = noisy_multiclass(n=4)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="sample_logits_fn"):
        attacks.pgd(f, x, y, key=key, eps=0.1, eot_iter=5)
    with pytest.raises(ValueError, match="eot_iter"):
        attacks.apgd(f, x, y, key=key, eps=0.1, eot_iter=0, sample_logits_fn=sample)
    with pytest.raises(ValueError, match="rand"):
        attacks.autoattack(f, x, y, key=key, eps=0.1, sample_logits_fn=sample)
    with pytest.raises(ValueError, match="version"):
        attacks.autoattack(f, x, y, key=key, eps=0.1, version="plus")
    assert aa_mod.VERSIONS["rand"] == ("apgd-ce", "apgd-dlr")
    kw = aa_mod.component_kwargs("apgd-dlr", eps=0.1, norm="l2", num_classes=5, eot_iter=20)
    assert kw == dict(eps=0.1, norm="l2", steps=100, loss="dlr", restarts=1, eot_iter=20)
    spec = evaluation.ATTACKS["autoattack_rand_linf"]
    assert spec.eot and not spec.is_reduced({}) and spec.is_reduced({"eot_iter": 5})
    assert spec.is_reduced({"steps": 10}) and not evaluation.ATTACKS["autoattack_linf"].eot
    assert Classifier(f, "m").sample_logits_fn is None  # backwards compatible


def test_evaluation_passes_the_classifiers_sampler_to_eot_attacks(monkeypatch):
    """The suite hands `Classifier.sample_logits_fn` to EOT-capable attacks (AutoAttack-rand;
    PGD only when its settings ask for eot_iter > 1; other specs have eot=False), never to
    another gradient path, and judges with `logits_fn` (attacks stubbed: they record calls)."""
    f, sample, x, y = noisy_multiclass(n=8)
    calls = []

    def recorder(fn, x_, y_, **kw):
        calls.append(kw)
        return types.SimpleNamespace(x_adv=x_)

    monkeypatch.setattr(registry, "pgd", recorder)
    monkeypatch.setattr(registry, "autoattack", recorder)
    clf = Classifier(f, "noisy", randomized=True, sample_logits_fn=sample)
    config = evaluation.default_config()
    config.progress, config.batch_size = False, 8
    ctx = evaluation.Context(clf, config, np.asarray(x), np.asarray(y), 8, jax.random.key(0))
    ctx.clean_correct = np.asarray(jnp.argmax(f(x), -1) == y)
    runs = [
        ("pgd_linf", {"steps": 2}, None),
        ("pgd_linf", {"steps": 2, "eot_iter": 3}, None),
        ("autoattack_rand_l2", {"steps": 5}, None),
        ("autoattack_rand_linf", {}, f),  # another gradient path: no sampler
    ]
    for name, settings, attack_fn in runs:
        correct = ctx.robust_correct(
            name, 0.05, settings, 8, key=jax.random.key(1), attack_logits_fn=attack_fn
        )
        np.testing.assert_array_equal(correct, ctx.clean_correct)  # judged at x_adv = x
    got = [c.get("sample_logits_fn") for c in calls]
    assert got == [None, sample, sample, None]
    assert calls[2]["version"] == "rand" and calls[2]["steps"] == 5 and calls[2]["norm"] == "l2"


def test_a_randomised_classifier_also_gets_autoattack_rand_on_the_same_points(monkeypatch):
    """The attacks stage adds AutoAttack's rand version (EOT, its own settings) beside the
    configured standard AutoAttack for a classifier with a sampler, on the standard entry's grid
    and examples; a deterministic classifier gets none (attacks stubbed: they record calls)."""
    from eqrobust.evaluation import stages

    f, sample, x, y = noisy_multiclass(n=8)
    calls = []

    def recorder(fn, x_, y_, **kw):
        calls.append(dict(kw, n=len(x_)))
        return types.SimpleNamespace(x_adv=x_)

    monkeypatch.setattr(registry, "autoattack", recorder)
    config = evaluation.default_config()
    config.progress, config.batch_size, config.attacks = False, 8, ("autoattack_linf",)
    config.autoattack_linf.update(dict(grid=(0.03, 0.05), num_examples=6, large=None))
    config.autoattack_rand_linf.settings.update(dict(steps=7, eot_iter=3))
    got = {}
    for name, clf in (
        ("noisy", Classifier(f, "noisy", randomized=True, sample_logits_fn=sample)),
        ("plain", Classifier(f, "plain")),
    ):
        calls.clear()
        ctx = evaluation.Context(clf, config, np.asarray(x), np.asarray(y), 8, jax.random.key(0))
        ctx.clean_correct = np.asarray(jnp.argmax(f(x), -1) == y)
        got[name] = (stages.attacks(ctx, {})["attacks"], list(calls))
    res, calls = got["noisy"]
    assert list(res) == ["autoattack_linf", "autoattack_rand_linf"]
    std, rand = res["autoattack_linf"], res["autoattack_rand_linf"]
    assert rand.values == std.values == (0.03, 0.05) and rand.n == std.n == 6
    # only the rand version is stubbed (the standard spec binds autoattack at import and runs)
    assert [(c["version"], c["n"], c["eps"]) for c in calls] == [
        ("rand", 6, 0.03),
        ("rand", 6, 0.05),
    ]
    assert all(c["sample_logits_fn"] is sample for c in calls)
    assert calls[0]["steps"] == 7 and calls[0]["eot_iter"] == 3
    res, calls = got["plain"]
    assert list(res) == ["autoattack_linf"] and calls == []
