"""Tests for eqrobust.ops: conv formulations, the max-pool tie rule, input checks, chunked runs."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from eqrobust import ops


@pytest.mark.parametrize("padding", [0, 1, 2])
def test_patches_conv_matches_xla_in_value_and_gradient(padding):
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)))
        w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)))
        a, b = ops.conv(x, w, padding, "patches"), ops.conv(x, w, padding, "xla")
        assert a.dtype == jnp.float64 and a.shape == b.shape == (
            2,
            5 + 2 * padding,
            4 + 2 * padding,
            4,
        )
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        check_grads(lambda x: ops.conv(x, w, padding, "patches"), (x,), order=1, modes=["rev"])
        check_grads(lambda w: ops.conv(x, w, padding, "patches"), (w,), order=1, modes=["rev"])
        ga = jax.grad(lambda x: jnp.sum(jnp.sin(ops.conv(x, w, padding, "patches"))))(x)
        gb = jax.grad(lambda x: jnp.sum(jnp.sin(ops.conv(x, w, padding, "xla"))))(x)
        np.testing.assert_allclose(ga, gb, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="conv impl"):
        ops.conv(x, w, 1, "fft")


def test_auto_formulations_follow_the_backend_and_layer(monkeypatch):
    assert ops.resolve_impl("conv", "xla") == "xla" and ops.resolve_impl("pool", "reshape") == (
        "reshape"
    )
    assert jax.default_backend() == "cpu"  # the test suite runs on CPU (CI has no GPU)
    # On CPU: patches for thin first layers, unpadded convs and tiny inputs; the flipped
    # lax.conv for same-padded convs from FLIP_MIN_CIN channels and FLIP_MIN_SIZE pixels on.
    shape = ops.ConvShape(c_in=16, kernel=3, padding=1, size=14)
    assert ops.resolve_impl("conv", "auto", shape) == "xla_flip"
    assert ops.resolve_impl("conv", "auto", shape._replace(c_in=ops.FLIP_MIN_CIN)) == "xla_flip"
    assert ops.resolve_impl("conv", "auto", shape._replace(size=ops.FLIP_MIN_SIZE)) == "xla_flip"
    assert ops.resolve_impl("conv", "auto", shape._replace(kernel=5, padding=2)) == "xla_flip"
    for thin in (
        shape._replace(c_in=1),
        shape._replace(c_in=3),
        shape._replace(padding=0),  # the paper networks' last conv (512 -> 512 at 4 x 4)
        shape._replace(kernel=5, padding=1),
        shape._replace(size=4),
    ):
        assert ops.resolve_impl("conv", "auto", thin) == "patches", thin
    assert ops.resolve_impl("pool", "auto") == "reshape"
    with pytest.raises(ValueError, match="ConvShape"):
        ops.resolve_impl("conv", "auto")
    # ops.conv hands its own shape to the rule.
    calls = []
    flip = ops._conv_flip
    monkeypatch.setattr(ops, "_conv_flip", lambda *a: calls.append(a[2]) or flip(*a))
    w16 = jnp.ones((3, 3, 16, 4))
    for side, padding, flipped in ((8, 1, True), (8, 0, False), (4, 1, False)):
        calls.clear()
        ops.conv(jnp.ones((2, side, side, 16)), w16, padding, "auto")
        assert bool(calls) == flipped, (side, padding)
    monkeypatch.undo()
    # The EP energy keeps patches on CPU for every layer (energy.conv_impl).
    from eqrobust import energy

    assert energy.conv_impl("auto") == "patches" and energy.conv_impl("xla_flip") == "xla_flip"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert (ops.resolve_impl("conv", "auto", shape), ops.resolve_impl("pool", "auto")) == (
        "xla",
        "reshape",
    )
    assert energy.conv_impl("auto") == "auto"  # ops.conv resolves it: cuDNN's conv
    monkeypatch.undo()
    # "auto" is the same function whichever formulation it resolves to.
    x = jax.random.uniform(jax.random.key(0), (2, 6, 6, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    np.testing.assert_allclose(ops.conv(x, w, 1, "auto"), ops.conv(x, w, 1, "patches"), atol=1e-5)
    np.testing.assert_array_equal(ops.max_pool_2x2(x, "auto"), ops.max_pool_2x2(x, "reshape"))


@pytest.mark.parametrize("k,padding", [(3, 0), (3, 1), (3, 2), (5, 2), (3, 3)])
def test_flipped_conv_matches_lax_conv_in_value_and_gradients(k, padding):
    """ "xla_flip" is lax.conv with a hand-written input gradient (the cotangent convolved with the
    flipped, channel-transposed kernel): float64 values and both gradients equal lax.conv's, and
    its gradients pass finite differences to second order (EP differentiates the energy's
    gradient). Padding 3 > k - 1 takes the plain lax.conv path."""
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)))
        w = jnp.asarray(rng.standard_normal((k, k, 3, 4)))
        r = jnp.asarray(rng.standard_normal(ops.conv(x, w, padding, "xla").shape))
        np.testing.assert_allclose(
            ops.conv(x, w, padding, "xla_flip"), ops.conv(x, w, padding, "xla"), rtol=1e-12
        )
        for argnum in (0, 1):
            loss = lambda x, w, i: jnp.sum(jnp.sin(ops.conv(x, w, padding, i)) * r)  # noqa: E731
            ga, gb = (jax.grad(loss, argnum)(x, w, i) for i in ("xla_flip", "xla"))
            np.testing.assert_allclose(ga, gb, rtol=1e-10, atol=1e-12)
        f = lambda x, w: jnp.sin(ops.conv(x, w, padding, "xla_flip"))  # noqa: E731
        check_grads(f, (x, w), order=2, modes=["rev"])


def test_flipped_conv_gradient_inside_a_loop_and_no_forward_mode():
    """Where the attacks run it: the input gradient inside a fori_loop (each step reading the
    last) equals lax.conv's; forward mode is refused loudly rather than silently wrong."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.uniform(size=(4, 10, 10, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 16)) * 0.2, jnp.float32)

    def descend(impl):
        g = jax.grad(lambda z: jnp.sum(jnp.tanh(ops.conv(z, w, 1, impl)) ** 2))
        return jax.jit(lambda z: jax.lax.fori_loop(0, 5, lambda i, z: z - 0.01 * g(z), z))(x)

    np.testing.assert_allclose(descend("xla_flip"), descend("xla"), rtol=1e-5, atol=1e-6)
    assert not np.allclose(descend("xla_flip"), x)  # the loop moved the input
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda z: ops.conv(z, w, 1, "xla_flip"), (x,), (x,))


@pytest.mark.parametrize("shape", [(2, 7, 6, 3), (1, 5, 9, 2), (3, 2, 3, 1)])
@pytest.mark.parametrize("impl", ops.POOL_IMPLS)
def test_pool_values_match_flax_on_odd_sizes(shape, impl):
    h = jax.random.normal(jax.random.key(2), shape)
    ref = nnx.max_pool(h, (2, 2), strides=(2, 2))
    out = ops.max_pool_2x2(h, impl)
    assert out.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(ValueError, match="max pool impl"):
        ops.max_pool_2x2(h, "avg")


@pytest.mark.parametrize("impl", ops.POOL_IMPLS)
def test_pool_gradient_goes_to_first_maximum_in_row_major_order(impl):
    # Windows: all tied; tie between bottom entries; tie top-right/bottom-right; a unique max.
    u = np.zeros((1, 2, 8, 1), np.float32)
    u[0, :, 0:2, 0] = [[1, 1], [1, 1]]
    u[0, :, 2:4, 0] = [[0, 0], [2, 2]]
    u[0, :, 4:6, 0] = [[0, 3], [0, 3]]
    u[0, :, 6:8, 0] = [[0, 0], [0, 5]]
    g = jax.grad(lambda u: jnp.sum(ops.max_pool_2x2(u, impl) * jnp.arange(1.0, 5.0)[:, None]))(
        jnp.asarray(u)
    )
    want = np.zeros_like(u)
    want[0, 0, 0, 0] = 1  # top-left of four ties
    want[0, 1, 2, 0] = 2  # bottom-left before bottom-right
    want[0, 0, 5, 0] = 3  # top-right before bottom-right
    want[0, 1, 7, 0] = 4
    np.testing.assert_array_equal(g, want)
    # Odd trailing rows/cols get zero gradient.
    g = jax.grad(lambda u: jnp.sum(ops.max_pool_2x2(u, impl)))(jnp.ones((1, 3, 3, 1)))
    np.testing.assert_array_equal(g[0, :, :, 0], [[1, 0, 0], [0, 0, 0], [0, 0, 0]])


def test_pool_impls_agree_under_jit_vmap_and_second_order():
    rng = np.random.default_rng(1)
    u = jnp.asarray(np.round(rng.standard_normal((3, 2, 6, 4, 2))), jnp.float32)  # many ties
    outs = [
        jax.jit(jax.vmap(jax.grad(lambda u, i=i: jnp.sum(ops.max_pool_2x2(u, i) ** 2))))(u)
        for i in ops.POOL_IMPLS
    ]
    np.testing.assert_array_equal(outs[0], outs[1])


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 7), w=st.integers(2, 7), seed=st.integers(0, 2**16), ties=st.booleans())
def test_routed_pool_is_the_pool_and_unpool_its_transpose(h, w, seed, ties):
    # The routes' pool equals max_pool_2x2 bitwise (ties included), the routed read is the
    # transpose of unpool (<P u, g> = <u, P^T g>), and unpool is max_pool_2x2's VJP.
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((2, 2 * h + (w % 2), w, 3))
    u = jnp.asarray(np.round(u) if ties else u, jnp.float32)
    pooled, routes = ops.max_pool_2x2_routes(u)
    np.testing.assert_array_equal(pooled, ops.max_pool_2x2(u, "reshape"))
    np.testing.assert_array_equal(ops.pool_by_routes(u, routes), pooled)
    g = jnp.asarray(rng.standard_normal(pooled.shape), u.dtype)
    v = jnp.asarray(rng.standard_normal(u.shape), u.dtype)
    up = ops.unpool_2x2(routes, g, u.shape)
    # Both sides hold the same float32 products; summed in float64 they differ by the order of
    # the sum only (a float32 sum can cancel to ~1e-4 and lose its relative precision).
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    np.testing.assert_allclose(
        np.sum(f64(ops.pool_by_routes(v, routes)) * f64(g)), np.sum(f64(v) * f64(up)),
        rtol=1e-12, atol=1e-12,
    )  # fmt: skip
    _, vjp = jax.vjp(lambda a: ops.max_pool_2x2(a, "reduce_window"), u)
    np.testing.assert_array_equal(vjp(g)[0], up)


def test_normalize():
    x = jnp.full((1, 2, 2, 3), 0.5, jnp.float32)
    out = ops.normalize(x, (0.5, 0.25, 0.0), (1.0, 0.5, 2.0))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out[0, 0, 0], [0.0, 0.5, 0.25])


def test_check_images_errors():
    x = jnp.full((2, 4, 4, 1), 0.5)
    assert ops.check_images(x, (4, 4, 1), who="m") is not None
    ops.check_images(np.zeros((2, 4, 4, 3), np.float32))  # no shape constraint
    with pytest.raises(ValueError, match=r"Expected images \[B, 4, 4, 1\] .* for m; got shape"):
        ops.check_images(jnp.zeros((2, 4, 4, 3)), (4, 4, 1), who="m")
    with pytest.raises(ValueError, match=r"\[B, H, W, C\].*NHWC"):
        ops.check_images(jnp.zeros((4, 4, 1)), who="m")
    with pytest.raises(ValueError, match="float images.*uint8.*to_float"):
        ops.check_images(jnp.zeros((2, 4, 4, 1), jnp.uint8), who="m")
    with pytest.raises(ValueError, match=r"\[0, 1\], got values in \[255, 255\]"):
        ops.check_images(x * 510.0, who="m")
    with pytest.raises(ValueError, match=r"\[0, 1\], got values in \[-0\.5"):
        ops.check_images(x - 1.0, who="m")
    for bad in (jnp.nan, jnp.inf):
        with pytest.raises(ValueError, match="m got 1 NaN/inf"):
            ops.check_images(x.at[1, 2, 3, 0].set(bad), who="m")
    # Traced values are not checked (no concretisation error); shapes and dtypes still are.
    jax.jit(lambda x: ops.check_images(x, (4, 4, 1)))(x + 7.0)
    with pytest.raises(ValueError, match="Expected images"):
        jax.jit(lambda x: ops.check_images(x, (4, 4, 2)))(x)


class _Out(NamedTuple):
    double: jax.Array
    total: jax.Array


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 13),
    batch=st.integers(1, 16),
    keyed=st.booleans(),
)
def test_run_chunked_pads_drops_and_folds_keys(n, batch, keyed):
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    y = np.arange(n, dtype=np.int32)
    shapes = set()
    key = jax.random.key(3) if keyed else None

    def fn(xb, yb, *k):
        shapes.add(xb.shape)
        if keyed:  # a per-chunk random number: equal to fold_in(key, chunk index)
            r = jax.random.uniform(k[0], ())
            return _Out(2 * xb, yb + 0 * r), jnp.full(yb.shape, r)
        return _Out(2 * xb, yb + xb[:, 0].astype(jnp.int32))

    out = ops.run_chunked(fn, x, y, batch_size=batch, key=key)
    bs = min(batch, n)
    assert shapes == {(bs, 2)}  # one shape for every chunk: one compilation
    res = out[0] if keyed else out
    assert isinstance(res, _Out) and isinstance(res.double, np.ndarray)
    np.testing.assert_array_equal(res.double, 2 * x)
    if keyed:
        np.testing.assert_array_equal(res.total, y)
        want = [float(jax.random.uniform(jax.random.fold_in(key, i // bs), ())) for i in range(n)]
        np.testing.assert_allclose(out[1], want)
    else:
        np.testing.assert_array_equal(res.total, y + x[:, 0].astype(np.int32))


def test_run_chunked_plain_array_and_errors():
    out = ops.run_chunked(lambda a: a.sum(axis=1), jnp.ones((5, 3)), batch_size=2)
    np.testing.assert_array_equal(out, np.full(5, 3.0))
    with pytest.raises(ValueError, match="batch_size"):
        ops.run_chunked(lambda a: a, np.ones(3), batch_size=0)
    with pytest.raises(ValueError, match="same length"):
        ops.run_chunked(lambda a, b: a, np.ones(3), np.ones(4), batch_size=2)
    with pytest.raises(ValueError, match="N > 0"):
        ops.run_chunked(lambda a: a, np.ones((0, 2)), batch_size=2)


def test_check_images_on_a_constant_inside_jit():
    x = jnp.full((1, 2, 2, 1), 0.5)
    jax.jit(lambda s: ops.check_images(x, (2, 2, 1)) * s)(1.0)
    bad = x * jnp.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        jax.jit(lambda s: ops.check_images(bad, (2, 2, 1)) * s)(1.0)
