"""Evaluation chunks on several host devices (`ops.run_chunked(devices=...)`, `host.split_cpu`):
the same results as one chunk after another with the same chunking, both devices used."""

import os
import subprocess
import sys
import textwrap

import pytest

from eqrobust import host

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh process: the device count is fixed when JAX starts.
_SCRIPT = textwrap.dedent(
    """
    import dataclasses
    import jax, jax.numpy as jnp, numpy as np
    from jax.tree_util import Partial
    from eqrobust import evaluation, ops
    from eqrobust.evaluation import stages
    from eqrobust.evaluation.runner import make_context
    from eqrobust.models import Classifier

    devs = jax.devices()
    assert len(devs) == 2, devs

    # run_chunked: every chunk on its device, results in order, the same as serial.
    seen = set()
    def fn(xb, k):
        seen.add(ops.device_of(xb).id)
        return xb * 2 + jax.random.uniform(k, ())
    x = np.arange(14, dtype=np.float32)[:, None]
    par = ops.run_chunked(fn, x, batch_size=250, key=jax.random.key(1), devices=devs)
    ser = ops.run_chunked(fn, x, batch_size=ops.chunk_size(14, 250, 2), key=jax.random.key(1))
    np.testing.assert_array_equal(par, ser)
    assert seen == {0, 1} and ops.chunk_size(14, 250, 2) == 7 and ops.chunk_size(14, 4, 2) == 4

    # An attack through a model whose weights are committed to device 0 (as loaded checkpoints
    # are): each chunk runs with its device's copy; the same verdicts as the serial evaluation.
    rng = np.random.default_rng(0)
    w = jax.device_put(jnp.asarray(rng.normal(size=(8 * 8, 3)), jnp.float32), devs[0])
    def logits(w, x):
        return jnp.tanh(x.reshape(x.shape[0], -1) @ w) * 4.0
    clf = Classifier(logits_fn=Partial(logits, w), name="lin")
    xs = rng.uniform(size=(20, 8, 8, 1)).astype(np.float32)
    ys = np.array(jnp.argmax(logits(w, jnp.asarray(xs)), -1))
    ys[:4] = (ys[:4] + 1) % 3  # a few wrong clean predictions
    c = evaluation.default_config()
    c.progress = False
    ctx = make_context(clf, xs, ys, c)
    assert len(ctx.devices) == 2
    stages.clean(ctx, {})
    settings = dict(steps=5, step_size=None, random_start=True, restarts=1)
    key = jax.random.key(7)
    par = ctx.robust_correct("pgd_linf", 0.1, settings, 20, key=key)
    c2 = evaluation.default_config()
    c2.progress = False
    c2.batch_size = ops.chunk_size(20, c.batch_size, 2)
    ctx2 = dataclasses.replace(ctx, devices=(), config=c2)
    ser = ctx2.robust_correct("pgd_linf", 0.1, settings, 20, key=key)
    np.testing.assert_array_equal(par, ser)
    assert 0 < par.sum() < 16, par  # some broken, some robust: a real comparison
    print("OK")
    """
)


@pytest.mark.parametrize("count", [2])
def test_two_host_devices_match_the_serial_evaluation(count):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_split_cpu_sets_the_flag_once(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    host.split_cpu(3)
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=3"
    host.split_cpu(5)  # a count already chosen is kept
    assert os.environ["XLA_FLAGS"].count("device_count") == 1
    monkeypatch.setenv("XLA_FLAGS", "")
    host.split_cpu(1)  # one device: nothing to split
    assert os.environ["XLA_FLAGS"] == ""


def test_memory_map_fraction_counts_this_process_and_grows_with_compiled_programs():
    import jax
    import jax.numpy as jnp

    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc (not Linux): the fraction is 0.0 there")
    before = host.memory_map_fraction()
    fns = [jax.jit(lambda x, k=k: x * k + k) for k in range(40)]  # 40 distinct programs
    for f in fns:
        f(jnp.ones(3)).block_until_ready()
    after = host.memory_map_fraction()
    assert 0.0 < before < after < 1.0, (before, after)
