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


# A fresh process with two host devices: `compile_once` compiles a program once and loads it
# onto the other device; the loaded program gives the compiled one's results on its own device.
_COMPILE_ONCE = textwrap.dedent(
    """
    import threading
    import jax, jax.numpy as jnp, numpy as np
    from eqrobust import compile_once
    from eqrobust.evaluation.context import eval_devices

    devs = eval_devices()  # installs compile_once on host devices
    assert len(devs) == 2 and compile_once.install()

    def f(x, w):
        body = lambda i, h: jnp.tanh(h @ w + 0.1 * i)
        return jax.lax.fori_loop(0, 7, body, x).sum(-1)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 6)).astype(np.float32)
    w = rng.normal(size=(6, 6)).astype(np.float32)
    jf = jax.jit(f)
    c0 = compile_once.counts()
    outs = [jf(jax.device_put(x, d), jax.device_put(w, d)) for d in devs]
    c1 = compile_once.counts()
    assert (c1["compiled"] - c0["compiled"], c1["loaded"] - c0["loaded"]) == (1, 1), (c0, c1)
    assert [next(iter(o.devices())).id for o in outs] == [0, 1]
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))
    h = x.astype(np.float64)
    for i in range(7):
        h = np.tanh(h @ w + 0.1 * i)
    np.testing.assert_allclose(np.asarray(outs[1]), h.sum(-1), rtol=1e-4, atol=1e-5)

    # Concurrent first calls (as run_chunked makes them): one compiles, the other waits and loads.
    jg = jax.jit(lambda x, w: f(x, w) * 3.0)
    res = {}
    def call(d):
        res[d.id] = np.asarray(jg(jax.device_put(x, d), jax.device_put(w, d)))
    ths = [threading.Thread(target=call, args=(d,)) for d in devs]
    [t.start() for t in ths]
    [t.join() for t in ths]
    c2 = compile_once.counts()
    assert (c2["compiled"] - c1["compiled"], c2["loaded"] - c1["loaded"]) == (1, 1), (c1, c2)
    np.testing.assert_array_equal(res[0], res[1])

    # Another shape is another program: compiled, not loaded.
    jf(jax.device_put(x[:3], devs[1]), jax.device_put(w, devs[1]))
    c3 = compile_once.counts()
    assert (c3["compiled"] - c2["compiled"], c3["loaded"]) == (1, c2["loaded"]), (c2, c3)

    # Uninstalled: JAX's own per-device compilation again.
    compile_once.uninstall()
    jh = jax.jit(lambda x, w: f(x, w) - 1.0)
    [jh(jax.device_put(x, d), jax.device_put(w, d)) for d in devs]
    assert compile_once.counts() == c3
    print("OK")
    """
)


def test_compile_once_loads_a_program_onto_the_other_host_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_ONCE], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
