"""The RobustBench-style record: fields, values against the attack run directly, reduced flags."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqrobust import data, robustbench
from eqrobust.attacks import autoattack
from eqrobust.classifier import Classifier

H = W = 8


def _linear_classifier() -> Classifier:
    w = jnp.asarray(np.random.default_rng(0).normal(size=(H, W, 1, 4)).astype(np.float32))
    return Classifier(logits_fn=lambda x: jnp.einsum("bhwc,hwck->bk", x - 0.5, w), name="linear")


def _dataset(clf: Classifier) -> data.Dataset:
    # Labels = the classifier's own predictions: clean accuracy is exactly 1.
    x = np.random.default_rng(1).integers(0, 256, (40, H, W, 1)).astype(np.uint8)
    y = np.asarray(jnp.argmax(clf.logits_fn(data.to_float(x)), -1), np.int32)
    return data._make("toy", x, y, x, y, 4)


AA = dict(steps=5, queries=20, targets=2)


def test_linf_record_fields_and_values(tmp_path):
    clf = _linear_classifier()
    ds = _dataset(clf)
    path = tmp_path / "record.json"
    rec = robustbench.evaluate(
        clf, ds, "Linf", num_examples=32, autoattack=AA, batch_size=32, path=path
    )
    assert json.loads(path.read_text()) == rec
    assert rec["dataset"] == "toy" and rec["threat_model"] == "Linf"
    assert rec["eps"] == pytest.approx(8 / 255)
    assert rec["clean_acc"] == 100.0 and rec["n_ex"] == 32 and rec["num_test"] == 40
    assert rec["corruptions_acc"] is None
    assert rec["reduced"] and rec["subset"] and rec["reduced_budget"]
    assert rec["budget"]["autoattack"]["steps"] == 5
    assert {h["id"] for h in rec["health"]} >= {"d", "e", "f"}
    # The robust accuracy is AutoAttack's on the same examples (the suite's fixed permutation).
    order = np.random.default_rng(0).permutation(40)[:32]
    x, y = data.to_float(ds.x_test[order]), jnp.asarray(ds.y_test[order])
    res = autoattack(clf.logits_fn, x, y, key=jax.random.key(7), eps=8 / 255, **AA)
    robust = 100 * float(res.robust.mean())
    assert 0 < robust < 100  # a non-trivial case: some points break, some do not
    assert abs(rec["autoattack_acc"] - robust) <= 100 / 32  # another key: at most one point


def test_full_standard_run_is_not_reduced_and_corruptions_threat_model():
    clf = _linear_classifier()
    ds = _dataset(clf)
    rec = robustbench.evaluate(
        clf, ds, "corruptions", corruption_names=("contrast",), severities=(1, 5)
    )
    assert rec["autoattack_acc"] is None and rec["eps"] is None
    assert 0.0 <= rec["corruptions_acc"] <= 100.0
    assert rec["n_ex"] == rec["num_test"] == 40
    assert not rec["reduced"] and not rec["subset"]
    assert rec["budget"]["corruptions"] == ["contrast"]


def test_unknown_threat_model():
    with pytest.raises(ValueError, match="unknown threat_model"):
        robustbench.evaluate(_linear_classifier(), "synthetic", "L1")
