"""Inputs that could silently corrupt a result raise clear errors at the public boundary (#15)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqrobust import attacks, ep, evaluation, ops
from eqrobust.energy import EnergyConfig

CFG = ep.EPConfig(energy=EnergyConfig(in_shape=(8, 8, 1), channels=(4,), paddings=(1,)), t1=3)
PARAMS = ep.init(jax.random.PRNGKey(0), CFG)
CLF = ep.classifier(PARAMS, CFG)
X = np.random.default_rng(0).uniform(size=(4, 8, 8, 1)).astype(np.float32)
KEY = jax.random.PRNGKey(0)


@pytest.mark.parametrize(
    "run",
    [
        lambda y: attacks.pgd(CLF.logits_fn, X, y, key=KEY, eps=0.1, steps=1),
        lambda y: attacks.square(CLF.logits_fn, X, y, key=KEY, eps=0.1, queries=2),
        lambda y: attacks.cw_l2(CLF.logits_fn, X, y, steps=1, binary_search_steps=1),
        lambda y: attacks.autoattack(CLF.logits_fn, X, y, key=KEY, eps=0.1, steps=1, queries=2),
        lambda y: ep.ep_gradient(PARAMS, X, y, CFG),
    ],
    ids=["pgd", "square", "cw", "autoattack", "ep_gradient"],
)
@pytest.mark.parametrize("bad", [10, -1])
def test_labels_outside_the_classes_are_rejected(run, bad):
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        run(jnp.array([0, 1, 2, bad]))


def test_evaluation_rejects_bad_labels_empty_sets_unknown_keys_and_zero_batches():
    c = evaluation.default_config()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        evaluation.evaluate_classifier(CLF, X, np.array([0, 1, 2, 10]), c)
    with pytest.raises(ValueError, match="empty test set"):
        evaluation.evaluate_classifier(CLF, X[:0], np.zeros(0, np.int32), c)
    c.num_exmaples = 3
    with pytest.raises(ValueError, match="'num_exmaples' \\(did you mean 'num_examples'\\?\\)"):
        evaluation.evaluate_classifier(CLF, X, np.array([0, 1, 2, 3]), c)
    c = evaluation.default_config()
    c.health.gradient_imagse = 2
    with pytest.raises(ValueError, match="health.gradient_imagse"):
        evaluation.evaluate_classifier(CLF, X, np.array([0, 1, 2, 3]), c)
    c = evaluation.default_config()
    c.batch_size = 0
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        evaluation.evaluate_classifier(CLF, X, np.array([0, 1, 2, 3]), c)


def test_empty_batches_and_wrong_images_are_rejected():
    with pytest.raises(ValueError, match="empty batch"):
        attacks.pgd(CLF.logits_fn, X[:0], np.zeros(0, np.int32), key=KEY, eps=0.1)
    with pytest.raises(ValueError, match="float images"):  # uint8 / [0, 255]
        ep.predict(PARAMS, (X * 255).astype(np.uint8), CFG)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        ep.predict(PARAMS, X * 255, CFG)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        attacks.pgd(CLF.logits_fn, X * 255, np.zeros(4, np.int32), key=KEY, eps=0.1)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        ops.run_chunked(lambda x: x, X, batch_size=0)


def test_check_labels_inside_jit_is_shape_only():
    @jax.jit
    def f(y):
        return ops.check_labels(y, 3, 2)  # traced: values cannot be inspected, shapes can

    assert f(jnp.array([0, 1, 5])).dtype == jnp.int32
    with pytest.raises(ValueError, match="int labels"):
        ops.check_labels(jnp.array([0.0, 1.0]), 2)


@pytest.mark.parametrize(
    "name", ["bp_cnn", "ep_cnn", "adv_cnn", "deq", "resnet18", "vit", "distill"]
)
def test_data_dir_is_settable_from_the_command_line(name, monkeypatch):
    from absl import flags
    from ml_collections import config_flags

    argv = ["prog", f"--config=experiments/configs/{name}.py:smoke", "--config.data_dir=/data/x"]
    monkeypatch.setattr("sys.argv", argv)  # config_flags reads the overrides from sys.argv
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv)
    fv(argv)
    assert fv.config.data_dir == "/data/x"
