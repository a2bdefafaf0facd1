"""Tests for eqrobust.energy: Phi, activations, and the autodiff update vs equations of motion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqrobust import energy, ep
from eqrobust.energy import EnergyConfig, Layer


def _params(seed, cfg: EnergyConfig, dtype=np.float64, scale=0.5):
    # NumPy draws: cheaper than eager jax.random compiles in a test.
    rng = np.random.default_rng(seed)
    return tuple(
        Layer(
            jnp.asarray(scale * rng.standard_normal(ws), dtype),
            jnp.asarray(0.3 * rng.standard_normal(bs), dtype),
        )
        for ws, bs in cfg.param_shapes
    )


def _random_states(seed, cfg, batch, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.uniform(size=(batch, *s)), dtype) for s in cfg.state_shapes)


# ---- explicit equations of motion (test-only second derivation of dPhi/ds) -------------------


def _unpool_mask(c):
    """One-hot argmax of each 2x2 window of c [B,Hc,Wc,C] (zeros on dropped odd rows/cols)."""
    b, hc, wc, ch = c.shape
    h, w = hc // 2, wc // 2
    win = c[:, : 2 * h, : 2 * w].reshape(b, h, 2, w, 2, ch).transpose(0, 1, 3, 5, 2, 4)
    win = win.reshape(b, h, w, ch, 4)
    onehot = jax.nn.one_hot(jnp.argmax(win, -1), 4, dtype=c.dtype)
    mask = (
        onehot.reshape(b, h, w, ch, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, 2 * h, 2 * w, ch)
    )
    return jnp.pad(mask, ((0, 0), (0, hc - 2 * h), (0, wc - 2 * w), (0, 0)))


def _upsample(s, hc, wc):
    up = jnp.repeat(jnp.repeat(s, 2, axis=1), 2, axis=2)
    return jnp.pad(up, ((0, 0), (0, hc - up.shape[1]), (0, wc - up.shape[2]), (0, 0)))


def _conv_transpose(g, w, padding):
    """Adjoint of the stride-1 conv w.r.t. its input: full conv with the flipped kernel."""
    k = w.shape[0]
    wt = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    return jax.lax.conv_general_dilated(
        g,
        wt,
        (1, 1),
        [(k - 1 - padding, k - 1 - padding)] * 2,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _eom_pre(params, x, states, cfg, beta=0.0, y=None):
    """dPhi/ds written out layer by layer: bottom-up pooled conv + top-down unpooled transpose."""
    s_prev = [energy.normalize(x, cfg), *states]
    nc, n = cfg.num_conv, len(states)
    pre = []
    for i in range(n):
        if i < nc:
            w, b = params[i]
            pre_i = energy.maxpool2(energy.conv(s_prev[i], w, cfg.paddings[i]) + b)
        else:
            w, b = params[i]
            pre_i = s_prev[i].reshape(x.shape[0], -1) @ w + b
        # Top-down feedback from layer i+1 (if it is a neuron layer).
        if i + 1 < n:
            w1, b1 = params[i + 1]
            if i + 1 < nc:
                c = energy.conv(states[i], w1, cfg.paddings[i + 1]) + b1
                g = _unpool_mask(c) * _upsample(states[i + 1], c.shape[1], c.shape[2])
                pre_i = pre_i + _conv_transpose(g, w1, cfg.paddings[i + 1])
            else:
                pre_i = pre_i + (states[i + 1] @ w1.T).reshape(pre_i.shape)
        pre.append(pre_i)
    if y is not None:
        onehot = jax.nn.one_hot(y, cfg.num_classes, dtype=x.dtype)
        if cfg.output == "mse":
            pre[-1] = pre[-1] - beta * (states[-1] - onehot)
        else:
            w, b = params[-1]
            p = jax.nn.softmax(states[-1].reshape(x.shape[0], -1) @ w + b)
            pre[-1] = pre[-1] - beta * ((p - onehot) @ w.T).reshape(pre[-1].shape)
    return tuple(pre)


CONFIGS = {
    "conv_odd_pool_softmax_xla": EnergyConfig(
        pool="reduce_window",
        conv="xla",
        in_shape=(9, 9, 2),
        num_classes=4,
        channels=(3, 5),
        paddings=(1, 0),
        fc=(),
        mean=(0.5, 0.4),
        std=(0.3, 0.2),
    ),
    "conv_fc_mse": EnergyConfig(
        in_shape=(8, 8, 1),
        num_classes=3,
        channels=(4, 3),
        paddings=(1, 1),
        fc=(6,),
        output="mse",
    ),
    "conv_fc_softmax_reshape_pool": EnergyConfig(
        in_shape=(8, 8, 3),
        num_classes=5,
        channels=(4,),
        paddings=(2,),
        fc=(7, 6),
        mean=(0.1, 0.2, 0.3),
        std=(1.0, 2.0, 0.5),
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_autodiff_update_equals_equations_of_motion(name, beta):
    cfg = CONFIGS[name]
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        params = _params(1, cfg)
        x = rng.uniform(size=(3, *cfg.in_shape))
        x[0, :, : cfg.in_shape[1] // 2 + 1] = 0.0  # constant background: tied max-pool windows
        x = jnp.asarray(x)
        states = _random_states(2, cfg, 3)
        y = jnp.asarray(rng.integers(0, cfg.num_classes, 3))
        got, want, upd = jax.jit(
            lambda p, x, s, y: (
                energy.state_grad(p, x, s, config=cfg, beta=beta, y=y),
                _eom_pre(p, x, s, cfg, beta=beta, y=y),
                energy.step(p, x, s, config=cfg, beta=beta, y=y),
            )
        )(params, x, states, y)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)
        # and the update is the activation of it
        for u, w in zip(upd, want, strict=True):
            np.testing.assert_allclose(u, energy.my_hard_sig(w), rtol=1e-10, atol=1e-12)


def test_phi_value_matches_definition_by_hand():
    cfg = EnergyConfig(in_shape=(4, 4, 1), num_classes=2, channels=(2,), paddings=(1,), fc=(3,))
    with jax.enable_x64(True):
        params = _params(1, cfg)
        x = jnp.asarray(np.random.default_rng(2).uniform(size=(2, 4, 4, 1)))
        states = _random_states(3, cfg, 2)
        y = jnp.array([0, 1])
        beta = 0.3
        phi = jax.jit(lambda p, x, s, y: energy.Phi(p, x, s, config=cfg, beta=beta, y=y))(
            params, x, states, y
        )
        xn = np.asarray(x)
        w0, b0 = (np.asarray(a) for a in params[0])
        padded = np.pad(xn, ((0, 0), (1, 1), (1, 1), (0, 0)))
        c = np.zeros((2, 4, 4, 2))
        for i in range(4):
            for j in range(4):
                c[:, i, j] = np.einsum("bhwc,hwco->bo", padded[:, i : i + 3, j : j + 3], w0) + b0
        pooled = c.reshape(2, 2, 2, 2, 2, 2).max(axis=(2, 4))
        s1, s2 = (np.asarray(s) for s in states)
        w1, b1 = (np.asarray(a) for a in params[1])
        w2, b2 = (np.asarray(a) for a in params[2])
        want = (pooled * s1).sum((1, 2, 3)) + ((s1.reshape(2, -1) @ w1 + b1) * s2).sum(-1)
        logits = s2 @ w2 + b2
        lse = np.log(np.exp(logits).sum(-1))
        ce = lse - logits[np.arange(2), np.asarray(y)]
        np.testing.assert_allclose(phi, want - beta * ce, rtol=1e-12)


def test_activations():
    u = jnp.array([-3.0, -0.25, 0.0, 0.5, 1.0, 1.5, 2.5, 5.0])
    np.testing.assert_allclose(energy.my_hard_sig(u), np.clip(u / 2, 0, 1))
    np.testing.assert_allclose(energy.hard_sigmoid(u), np.clip(u, 0, 1))
    np.testing.assert_allclose(energy.ctrd_hard_sig(u), np.clip(u, -0.5, 0.5))
    np.testing.assert_allclose(energy.my_sigmoid(u), 1 / (1 + np.exp(-4 * (u - 0.5))), rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown activation"):
        energy.get_activation("relu6")


@pytest.mark.parametrize("name", sorted(energy.SLOPE_OF_OUTPUT))
def test_slope_of_output_is_the_activations_derivative(name):
    # run_sync's reverse loop reads sigma'(u) from s = sigma(u): it must be autodiff's
    # derivative everywhere but exactly at a hard sigmoid's kinks (there autodiff takes half
    # the slope, the table zero).
    sigma, slope = energy.get_activation(name), energy.SLOPE_OF_OUTPUT[name]
    with jax.enable_x64(True):
        u = jnp.asarray(np.random.default_rng(0).uniform(-6.0, 6.0, 10_000))
        want = jax.vmap(jax.grad(sigma))(u)
        got = slope(sigma(u))
        assert got.dtype == u.dtype
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
        assert float(jnp.min(want)) == 0.0 or name == "my_sigmoid"  # both sides of the clip
        kinks = {"my_hard_sig": (0.0, 2.0), "hard_sigmoid": (0.0, 1.0),
                 "ctrd_hard_sig": (-0.5, 0.5)}.get(name, ())  # fmt: skip
        for k in kinks:
            half = float(jax.grad(sigma)(jnp.float64(k)))
            assert float(slope(sigma(jnp.float64(k)))) == 0.0 and half > 0.0


def test_paper_state_shapes():
    cfg = EnergyConfig(
        in_shape=(32, 32, 3),
        channels=(128, 256, 512, 512),
        paddings=(1, 1, 1, 0),
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
    )
    assert cfg.state_shapes == ((16, 16, 128), (8, 8, 256), (4, 4, 512), (1, 1, 512))
    assert cfg.param_shapes[-1] == ((512, 10), (10,))


@pytest.mark.parametrize("ties", [False, True])
def test_pool_and_conv_formulations_agree(ties):
    rng = np.random.default_rng(0)
    u = rng.standard_normal((2, 7, 6, 3))
    if ties:  # integer values: many tied windows; both must route the gradient to the first max
        u = np.round(u)
    u = jnp.asarray(u, jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 3, 3, 3)), jnp.float32)
    outs = {}
    for impl in energy.POOL_IMPLS:
        val, vjp = jax.vjp(lambda u, impl=impl: energy.maxpool2(u, impl), u)
        outs[impl] = (val, vjp(g)[0])
    np.testing.assert_array_equal(outs["reduce_window"][0], outs["reshape"][0])
    np.testing.assert_array_equal(outs["reduce_window"][1], outs["reshape"][1])
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
    np.testing.assert_allclose(
        energy.conv(u, w, 1, "xla"), energy.conv(u, w, 1, "patches"), rtol=1e-5, atol=1e-5
    )


def test_input_validation():
    cfg = EnergyConfig(in_shape=(8, 8, 1), channels=(2,), paddings=(1,))
    params = _params(0, cfg, np.float32)
    states = energy.zero_states(cfg, 2)
    with pytest.raises(ValueError, match="Expected images"):
        energy.Phi(params, jnp.zeros((2, 8, 8, 3)), states, config=cfg)
    with pytest.raises(ValueError, match="labels y are required"):
        energy.Phi(params, jnp.zeros((2, 8, 8, 1)), states, config=cfg, beta=0.5)
    with pytest.raises(ValueError, match="same length"):
        EnergyConfig(channels=(2, 3), paddings=(1,))
    with pytest.raises(ValueError, match="shrink"):
        EnergyConfig(in_shape=(4, 4, 1), channels=(2, 2, 2), paddings=(0, 0, 0))


@pytest.mark.parametrize(
    "cfg",
    [
        EnergyConfig(in_shape=(28, 28, 1), channels=(16, 32), paddings=(1, 1), conv="patches"),
        EnergyConfig(
            in_shape=(32, 32, 3),
            channels=(8, 16, 16, 16),
            paddings=(1, 1, 1, 0),
            mean=(0.5,) * 3,
            std=(0.5,) * 3,
            conv="patches",
        ),
    ],
)
def test_step_flops_matches_xla_cost_analysis(cfg):
    # The patches formulation is all matmuls: XLA's FLOP count is the multiply-adds plus a few
    # elementwise ops (activations, bias adds, pooling compares), i.e. slightly above ours.
    params = ep.init(jax.random.PRNGKey(0), cfg)
    x = jnp.zeros((4, *cfg.in_shape))
    s = energy.zero_states(cfg, 4)
    cost = jax.jit(lambda p, x, s: energy.step(p, x, s, config=cfg)).lower(params, x, s)
    cost = cost.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    ours = energy.step_flops(cfg, 4)
    assert ours <= cost["flops"] <= 1.1 * ours, (ours, cost["flops"])
