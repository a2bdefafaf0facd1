"""Tests for the evaluation cache: reruns reuse attack cells, a changed setting reruns only its
cells, other models or examples miss, broken entries are recomputed, and no cache writes nothing."""

import collections
import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqrobust import evaluation
from eqrobust.attacks import registry
from eqrobust.evaluation import cache as cache_lib
from eqrobust.models import Classifier

H = W = 8


def _model_and_data(n=24):
    """A linear classifier on 8x8 images and points at several distances from its boundary."""
    rng = np.random.default_rng(0)
    w = np.where(rng.uniform(size=(H, W, 1)) < 0.5, -1.0, 1.0).astype(np.float32) / 8.0
    wj = jnp.asarray(w)

    def logits_fn(x):
        s = jnp.sum((x - 0.5) * wj, axis=(1, 2, 3))
        return jnp.stack([-s, s], axis=-1)

    y = (np.arange(n) % 2).astype(np.int32)
    d = np.linspace(0.02, 0.8, n)
    x = 0.5 + (2 * y - 1)[:, None, None, None] * d[:, None, None, None] * w
    x = np.clip(x + rng.uniform(-0.02, 0.02, x.shape), 0, 1).astype(np.float32)
    return Classifier(logits_fn=logits_fn, name="linear"), x, y


def _config():
    c = evaluation.default_config()
    c.attacks = ("pgd_l2", "pgd_linf")
    c.progress = False
    c.batch_size = 12
    c.pgd_l2.grid, c.pgd_l2.large = (0.1, 0.5), None
    c.pgd_linf.grid = (2 / 255, 8 / 255)
    for name in c.attacks:
        c[name].settings.steps = 5
    c.health.more_steps_factor = 2
    c.health.more_restarts_factor = 1
    c.corruptions.names = ("gaussian_noise",)
    c.corruptions.severities = (1, 3)
    c.dynamics.grid = (0.5,)
    c.gallery.attack, c.gallery.eps, c.gallery.num_images = "pgd_l2", 0.5, 2
    return c


@pytest.fixture
def calls(monkeypatch):
    """Counts the attack runs (one per chunk of examples) per attack name."""
    counts = collections.Counter()
    for name in ("pgd_l2", "pgd_linf"):
        spec = registry.ATTACKS[name]

        def run(*args, _run=spec.run, _name=name, **kwargs):
            counts[_name] += 1
            return _run(*args, **kwargs)

        monkeypatch.setitem(registry.ATTACKS, name, dataclasses.replace(spec, run=run))
    return counts


def _evaluate(clf, x, y, config, cache_dir, cache_id="model-a"):
    return evaluation.evaluate_classifier(
        clf, x, y, config, gradient_variants=[clf], cache_dir=cache_dir, cache_id=cache_id
    )


def _same(a, b):
    assert a.attacks == b.attacks and a.worst_case == b.worst_case
    assert a.convergence_runs == b.convergence_runs and a.corruptions == b.corruptions
    assert a.dynamics == b.dynamics and a.health == b.health
    np.testing.assert_array_equal(a.gallery.adversarial, b.gallery.adversarial)


def test_rerun_reuses_every_cell_and_changed_settings_rerun_only_theirs(tmp_path, calls):
    clf, x, y = _model_and_data()
    d = str(tmp_path / "eval_cache")
    first = _evaluate(clf, x, y, _config(), d)
    assert calls["pgd_l2"] > 0 and calls["pgd_linf"] > 0
    entries = sorted(os.listdir(d))
    # grid cells, PGD-Linf's large-eps run (check (a)), the (c) runs, the dynamics variant's
    # cell; the corruption per severity
    assert sum(e.startswith("attack-") for e in entries) == 2 + 2 + 1 + 2 + 1
    assert sum(e.startswith("corruption-") for e in entries) == 2
    # and the cheap stages' results (the gallery's prediction at its adversarials)
    kinds = {e.rsplit("-", 1)[0] for e in entries}
    assert kinds == {"attack", "corruption", "clean", "probes", "zero_gradients", "predict"}
    calls.clear()
    again = _evaluate(clf, x, y, _config(), d)
    assert sum(calls.values()) == 0
    _same(first, again)

    # One attack's setting changes: only that attack's cells (grid and its (c) run) rerun.
    c = _config()
    c.pgd_linf.settings.steps = 7
    changed = _evaluate(clf, x, y, c, d)
    assert calls["pgd_l2"] == 0 and calls["pgd_linf"] > 0
    assert changed.attacks["pgd_l2"] == first.attacks["pgd_l2"]
    assert changed.attacks["pgd_linf"].settings["steps"] == 7
    assert not any(e.startswith(".tmp") for e in os.listdir(d))


def test_interrupted_evaluation_continues_from_its_finished_cells(tmp_path, calls, monkeypatch):
    clf, x, y = _model_and_data()
    d = str(tmp_path / "c")
    spec = registry.ATTACKS["pgd_linf"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(registry.ATTACKS, "pgd_linf", dataclasses.replace(spec, run=killed))
    with pytest.raises(KeyboardInterrupt):  # after PGD-L2's grid, in PGD-Linf's first cell
        _evaluate(clf, x, y, _config(), d)
    assert sum(e.startswith("attack-") for e in os.listdir(d)) == 2
    assert not any(e.startswith(".tmp") for e in os.listdir(d))
    monkeypatch.setitem(registry.ATTACKS, "pgd_linf", spec)
    calls.clear()
    _evaluate(clf, x, y, _config(), d)
    # PGD-L2's 2 grid cells are reused; its (c) run and dynamics cell run (2 chunks each).
    assert calls["pgd_l2"] == 2 * 2 and calls["pgd_linf"] > 0


def test_other_model_or_examples_miss(tmp_path, calls):
    clf, x, y = _model_and_data()
    d = str(tmp_path / "c")
    cells = lambda: sum(e.startswith("attack-") for e in os.listdir(d))
    _evaluate(clf, x, y, _config(), d)
    base, base_cells = len(os.listdir(d)), cells()
    calls.clear()
    _evaluate(clf, x, y, _config(), d, cache_id="model-b")
    assert calls["pgd_l2"] > 0 and calls["pgd_linf"] > 0
    assert len(os.listdir(d)) == 2 * base
    calls.clear()
    x2 = x.copy()
    x2[0, 0, 0, 0] = 1.0 - x2[0, 0, 0, 0]  # one pixel of one example
    _evaluate(clf, x2, y, _config(), d)
    # Every attack cell covers that example (a probe or prediction on others may be reused).
    assert calls["pgd_l2"] > 0 and calls["pgd_linf"] > 0
    assert cells() == 3 * base_cells


def test_broken_entry_is_ignored_and_recomputed(tmp_path, calls, caplog):
    clf, x, y = _model_and_data()
    d = tmp_path / "c"
    first = _evaluate(clf, x, y, _config(), str(d))
    broken = sorted(p for p in d.iterdir() if p.name.startswith("attack-"))[:2]
    broken[0].write_bytes(broken[0].read_bytes()[:50])  # truncated
    broken[1].write_bytes(b"not an npz")
    calls.clear()
    with caplog.at_level(logging.WARNING):
        again = _evaluate(clf, x, y, _config(), str(d))
    assert sum(calls.values()) == 2 * 2  # two cells, two chunks of 12 examples each
    assert sum("ignoring unreadable entry" in r.getMessage() for r in caplog.records) == 2
    _same(first, again)
    calls.clear()
    _evaluate(clf, x, y, _config(), str(d))  # the rewritten entries are whole again
    assert sum(calls.values()) == 0


def test_no_cache_dir_writes_nothing(tmp_path, monkeypatch, calls):
    monkeypatch.chdir(tmp_path)
    clf, x, y = _model_and_data()
    _evaluate(clf, x, y, _config(), None, cache_id=None)
    n = sum(calls.values())
    calls.clear()
    _evaluate(clf, x, y, _config(), None, cache_id=None)
    assert sum(calls.values()) == n > 0
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="fingerprint"):
        _evaluate(clf, x, y, _config(), str(tmp_path / "c"), cache_id=None)


def test_keys_and_fingerprints(tmp_path):
    params = {"w": np.ones((2, 3), np.float32), "step": jax.random.key(0)}
    fp = cache_lib.model_fingerprint(params, {"lr": 0.1}, "m")
    assert fp == cache_lib.model_fingerprint(dict(params), {"lr": 0.1}, "m")
    other = {**params, "w": params["w"] * 2}
    assert fp != cache_lib.model_fingerprint(other, {"lr": 0.1}, "m")
    assert fp != cache_lib.model_fingerprint(params, {"lr": 0.2}, "m")
    assert fp != cache_lib.model_fingerprint(params, {"lr": 0.1}, "m2")
    # Settings order does not matter; a function in the settings is never keyed by its repr.
    c = cache_lib.EvalCache(str(tmp_path), fp)
    assert c.key("attack", {"a": 1, "b": (2, 3)}) == c.key("attack", {"b": [2, 3], "a": 1})
    with pytest.raises(cache_lib.Uncacheable):
        c.key("attack", {"loss": lambda z: z})
    with pytest.raises(cache_lib.Uncacheable):
        c.key("attack", {"weights": {1: 0.5, "a": 0.5}})
    out = c.get_or_compute("attack", {"loss": print}, lambda: {"ok": np.ones(3, bool)}, {})
    assert out["ok"].all() and os.listdir(tmp_path) == [] and c.misses == 0
    assert cache_lib.key_digest(jax.random.key(1)) != cache_lib.key_digest(jax.random.key(2))
