"""Compiler options per model: `compile_options.jit` follows the `options(...)` context, the
options reach XLA, cross into `run_chunked`'s threads, and the evaluation uses the classifier's."""

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqrobust import compile_options, ops
from eqrobust.classifier import Classifier
from eqrobust.evaluation import evaluate_classifier, stages

LEVEL1 = {"xla_backend_optimization_level": 1}
# An option XLA does not know: compiling with it fails, so an error proves the options arrived.
BOGUS = {"xla_eqrobust_no_such_option": 1}


def _fn(x):
    return jnp.tanh(x @ x.T).sum(-1)


def test_each_option_set_gets_its_own_program_with_the_same_result():
    f = compile_options.jit(_fn)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 5)), jnp.float32)
    ref = np.tanh(np.asarray(x, np.float64) @ np.asarray(x, np.float64).T).sum(-1)
    y0 = f(x)
    with compile_options.options(LEVEL1) as opts:
        assert opts == (("xla_backend_optimization_level", 1),)
        assert compile_options.current() == opts
        y1 = f(x)
        with compile_options.options(None):  # an inner block back to XLA's defaults
            assert compile_options.current() == ()
    assert compile_options.current() == ()
    assert f.variants() == ((), (("xla_backend_optimization_level", 1),))
    assert f._cache_size() == 2  # one program per option set
    f(x)
    assert f._cache_size() == 2  # called again: no recompilation
    np.testing.assert_allclose(y0, ref, rtol=1e-5)
    np.testing.assert_allclose(y1, ref, rtol=1e-5)


def test_the_options_reach_the_compiler():
    f = compile_options.jit(lambda x: x * 2.0 + 1.0)
    with compile_options.options(BOGUS), pytest.raises(Exception, match="no_such_option"):
        f(jnp.ones(3))
    # Explicit options are fixed (the run-once probes): the context does not replace them.
    g = compile_options.jit(lambda x: x + 1.0, compiler_options=LEVEL1)
    with compile_options.options(BOGUS):
        np.testing.assert_array_equal(g(jnp.ones(3)), 2.0)
    with pytest.raises(TypeError, match="bool/int/float/str"):
        compile_options.normalized({"xla_backend_optimization_level": [1]})


def test_run_chunked_threads_compile_with_the_callers_options():
    dev = jax.devices("cpu")[0]
    seen = []
    f = compile_options.jit(lambda x: x - 1.0)

    def fn(x):  # runs in the pool's threads (two "devices": the same one twice)
        seen.append(compile_options.current())
        return f(x)

    x = np.arange(8, dtype=np.float32)
    with compile_options.options(LEVEL1):
        out = ops.run_chunked(fn, x, batch_size=4, devices=[dev, dev])
    np.testing.assert_array_equal(out, x - 1.0)
    assert seen == [(("xla_backend_optimization_level", 1),)] * 2
    with compile_options.options(BOGUS), pytest.raises(Exception, match="no_such_option"):
        ops.run_chunked(lambda x: compile_options.jit(lambda v: v * 3.0)(x), x, batch_size=4,
                        devices=[dev, dev])  # fmt: skip


def test_the_evaluation_runs_under_the_classifiers_options():
    seen = []

    def stage(ctx, fields):
        seen.append(compile_options.current())
        return {"attacks": {}}

    clf = Classifier(logits_fn=lambda x: x.reshape(x.shape[0], -1)[:, :3], name="t",
                     compiler_options=LEVEL1)  # fmt: skip
    assert clf.compiler_options == (("xla_backend_optimization_level", 1),)
    x = np.random.default_rng(0).uniform(size=(4, 2, 2, 1)).astype(np.float32)
    evaluate_classifier(
        clf, x, np.zeros(4, np.int32), stage_list=[("clean", stages.clean), ("probe", stage)]
    )
    assert seen == [(("xla_backend_optimization_level", 1),)]
    assert compile_options.current() == ()


def test_the_package_jits_through_compile_options():
    """A bare `jax.jit` in the package would ignore the model's options."""
    pkg = Path(__file__).resolve().parents[1] / "eqrobust"
    bare = []
    for p in pkg.rglob("*.py"):
        if p.name == "compile_options.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "jit"
                and isinstance(node.value, ast.Name)
                and node.value.id == "jax"
            ):
                bare.append(f"{p.relative_to(pkg.parent)}:{node.lineno}")
    assert not bare, f"use compile_options.jit instead of jax.jit: {bare}"


def test_nested_calls_compile_inside_the_enclosing_program():
    """JAX refuses compiler options on a nested jit: traced calls use the outer program's."""
    inner = compile_options.jit(lambda x: x * 2.0)
    outer = compile_options.jit(lambda x: inner(x) + 1.0)
    plain = jax.jit(lambda x: inner(x) - 1.0)  # a user's own jit around ours
    x = jnp.arange(3.0)
    with compile_options.options(LEVEL1):
        np.testing.assert_array_equal(outer(x), x * 2.0 + 1.0)
        np.testing.assert_array_equal(plain(x), x * 2.0 - 1.0)
        np.testing.assert_array_equal(jax.grad(lambda v: inner(v).sum())(x), 2.0)
    assert inner.variants() == ((),)  # only traced into other programs
    assert outer.variants() == ((), (("xla_backend_optimization_level", 1),))
