"""Tests for eqrobust.ep and EP training: EP gradient vs implicit gradient, phases, classifiers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from eqrobust import energy, ep, solvers
from eqrobust.classifier import GradientPath
from eqrobust.energy import EnergyConfig, Layer


def _params(seed, cfg: EnergyConfig, dtype=np.float64, scale=0.5):
    """Small weights, positive biases: a contractive free phase with units off the clamp kinks."""
    rng = np.random.default_rng(seed)
    return tuple(
        Layer(
            jnp.asarray(scale * rng.standard_normal(ws) / np.sqrt(np.prod(ws[:-1])), dtype),
            jnp.asarray(0.5 + 0.5 * rng.uniform(size=bs), dtype),
        )
        for ws, bs in cfg.param_shapes
    )


def _cos(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _rel(a, b):
    return float(np.linalg.norm(np.ravel(a) - np.ravel(b)) / np.linalg.norm(np.ravel(b)))


@pytest.mark.parametrize("output", ["softmax", "mse"])
def test_ep_gradient_matches_implicit_gradient(output):
    """On a converged network, EP -> d loss(s*) / d theta as beta -> 0 (symmetric: O(beta^2))."""
    e = EnergyConfig(
        in_shape=(6, 6, 1), num_classes=3, channels=(3, 4), paddings=(1, 1), fc=(5,), output=output
    )
    cfg = ep.EPConfig(energy=e, t1=80, t2=80, beta=0.1, free_tol=1e-14)
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        params = _params(1, e)
        x = jnp.asarray(rng.uniform(size=(4, 6, 6, 1)))
        y = jnp.asarray(rng.integers(0, 3, 4))

        @jax.jit
        def grads(params, betas):
            g_imp = jax.grad(lambda p: ep.loss_at_fixed_point(p, x, y, cfg, grad="implicit"))(
                params
            )
            g_ep = {
                est: jax.vmap(
                    lambda b, est=est: ep.ep_gradient(params, x, y, cfg, beta=b, estimator=est)
                )(betas)
                for est in ep.ESTIMATORS
            }
            return g_imp, g_ep

        betas = (0.2, 0.05)
        g_imp, g_ep = grads(params, jnp.asarray(betas))
        assert float(g_ep["symmetric"][1].residual.max()) < 1e-12  # free phase converged
        for est, order in (("symmetric", 2), ("one_sided", 1)):
            for layer in range(len(params)):
                for leaf in ("w", "b"):
                    ref = getattr(g_imp[layer], leaf)
                    errs = []
                    for i in range(len(betas)):
                        got = getattr(g_ep[est][0][layer], leaf)[i]
                        assert _cos(got, ref) >= 0.99, (est, layer, leaf, betas[i])
                        errs.append(_rel(got, ref))
                    # error shrinks like beta^order (beta ratio 4); allow slack, and a float floor
                    assert errs[1] < max(errs[0] / (4**order) * 2.0, 1e-9), (est, layer, leaf, errs)
        assert max(_rel(a.w[1], b.w) for a, b in zip(g_ep["symmetric"][0], g_imp)) < 1e-2


def _tiny(output="softmax", t1=6):
    e = EnergyConfig(in_shape=(6, 6, 1), num_classes=3, channels=(3,), paddings=(1,), fc=(4,))
    e = dataclasses.replace(e, output=output)
    return ep.EPConfig(energy=e, t1=t1, t2=3, beta=0.5)


def test_free_phase_is_t1_picard_steps_and_trajectory():
    cfg = _tiny(t1=7)
    params = ep.init(jax.random.PRNGKey(0), cfg)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 6, 6, 1)), jnp.float32)

    @jax.jit
    def run(params, x):
        sol = ep.free_phase(params, x, cfg)
        s = energy.zero_states(cfg.energy, 3)
        loop = []
        for _ in range(cfg.t1):
            s = energy.step(params, x, s, config=cfg.energy)
            loop.append(energy.readout(params, s, cfg.energy))
        return sol, s, jnp.stack(loop), ep.trajectory(params, x, cfg), ep.predict(params, x, cfg)

    sol, s_loop, loop_logits, traj, pred = run(params, x)
    assert np.all(np.asarray(sol.steps) == cfg.t1)
    for a, b in zip(sol.z, s_loop, strict=True):
        np.testing.assert_array_equal(a, b)
    assert traj.shape == (cfg.t1, 3, 3)
    np.testing.assert_allclose(traj, loop_logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(traj[-1], pred, rtol=1e-6, atol=1e-6)


def test_anderson_and_convergence_stop_reach_the_picard_fixed_point():
    e = EnergyConfig(in_shape=(6, 6, 1), num_classes=3, channels=(3, 4), paddings=(1, 1), fc=(5,))
    with jax.enable_x64(True):
        params = _params(2, e, scale=0.7)
        x = jnp.asarray(np.random.default_rng(3).uniform(size=(5, 6, 6, 1)))
        ref_cfg = ep.EPConfig(energy=e, t1=150)
        fast = ep.EPConfig(energy=e, t1=150, free_stop="converged", free_tol=1e-9)
        anderson = ep.EPConfig(
            energy=e, t1=150, free_method="anderson", free_stop="converged", free_tol=1e-9
        )

        @jax.jit
        def run(params, x):
            return tuple(ep.free_phase(params, x, c) for c in (ref_cfg, fast, anderson))

        ref, conv, anders = run(params, x)
        for sol in (conv, anders):
            assert bool(jnp.all(sol.converged))
            for a, b in zip(sol.z, ref.z, strict=True):
                np.testing.assert_allclose(a, b, atol=1e-8)
        assert int(conv.steps.max()) < 150
        assert int(anders.steps.max()) <= int(conv.steps.max())


def test_async_updates_are_gauss_seidel_and_reach_the_sync_fixed_point():
    e = EnergyConfig(in_shape=(6, 6, 1), num_classes=3, channels=(3, 4), paddings=(1, 1), fc=(5,))
    with jax.enable_x64(True):
        params = _params(4, e, scale=0.7)
        x = jnp.asarray(np.random.default_rng(5).uniform(size=(5, 6, 6, 1)))
        rng = np.random.default_rng(6)
        s = tuple(jnp.asarray(rng.uniform(size=(5, *shp))) for shp in e.state_shapes)
        y = jnp.asarray([0, 1, 2, 0, 1])
        # One async step by hand: layers 0 and 2 from s, then layer 1 from the updated states;
        # with nudging too (the loss term reaches the last layer).
        sig = energy.get_activation(e.activation)
        for beta in (0.0, 0.7):
            g = energy.state_grad(params, x, s, config=e, beta=beta, y=y)
            half = (sig(g[0]), s[1], sig(g[2]))
            g2 = energy.state_grad(params, x, half, config=e, beta=beta, y=y)
            want = (half[0], sig(g2[1]), half[2])
            got = energy.step_async(params, x, s, config=e, beta=beta, y=y)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        sync = ep.EPConfig(energy=e, t1=300, free_stop="converged", free_tol=1e-10)
        asyn = dataclasses.replace(sync, update="async")
        a, b = ep.free_phase(params, x, sync), ep.free_phase(params, x, asyn)
        assert bool(jnp.all(a.converged)) and bool(jnp.all(b.converged))
        for u, v in zip(a.z, b.z, strict=True):
            np.testing.assert_allclose(u, v, atol=1e-8)
        assert int(b.steps.max()) < int(a.steps.max())  # Gauss-Seidel needs fewer steps
    with pytest.raises(ValueError, match="update must be one of"):
        ep.EPConfig(energy=e, update="sequential")


_ARCHS = [
    EnergyConfig(in_shape=(10, 10, 1), num_classes=3, channels=(3, 4), paddings=(1, 1)),
    EnergyConfig(  # odd sizes (a dropped pool row), fc and output neurons, XLA formulations
        in_shape=(13, 13, 2), num_classes=4, channels=(3, 4, 3), paddings=(1, 1, 1),
        fc=(5,), output="mse", mean=(0.1, 0.2), std=(0.5, 0.6), pool="reduce_window",
        conv="xla",
    ),
    EnergyConfig(
        in_shape=(12, 12, 1), num_classes=3, channels=(3, 4), paddings=(1, 0), fc=(6, 5),
        activation="my_sigmoid",
    ),
]  # fmt: skip


@pytest.mark.parametrize("e", _ARCHS)
def test_run_async_equals_repeated_step_async(e):
    # run_async assembles the drives from carried pre-activations and shifts its loop by half a
    # sweep; it must be step_async (jax.grad of Phi) applied T times, nudged or not.
    with jax.enable_x64(True):
        params = _params(7, e, scale=2.0)
        x = jnp.asarray(np.random.default_rng(8).uniform(size=(4, *e.in_shape)))
        y = jnp.asarray([0, 1, 2, 1])
        s0 = tuple(
            jnp.asarray(np.random.default_rng(9).uniform(size=(4, *shp))) for shp in e.state_shapes
        )
        for beta, t in ((0.0, 1), (0.0, 4), (0.7, 2), (-0.4, 5)):
            want = s0
            for _ in range(t):
                want = energy.step_async(params, x, want, config=e, beta=beta, y=y)
            got = energy.run_async(params, x, s0, t, config=e, beta=beta, y=y)
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        energy.run_async(params, x, s0, 0, config=e)
    # The first update from zero states skips the convs of zeros: bitwise the same (float32).
    p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    x32, z32 = jnp.asarray(x, jnp.float32), energy.zero_states(e, 4)
    for parity, want in ((None, energy.step(p32, x32, z32, config=e)),
                         (0, energy.step_async(p32, x32, z32, config=e))):  # fmt: skip
        if parity == 0:  # step_async's first half only: the odd layers stay zero
            want = tuple(w if i % 2 == 0 else z for i, (w, z) in enumerate(zip(want, z32)))
        for a, b in zip(energy.from_zero(p32, x32, e, parity), want, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("e", _ARCHS)
def test_run_sync_backward_equals_autodiff_of_the_plain_loop(e):
    # run_sync's reverse loop uses the symmetry of the update's Jacobian (the Hessian of Phi)
    # and taped states (slopes read from them) and routes; values and gradients (params, input,
    # initial states; every layer read, or only the readout) must be autodiff of the plain loop.
    with jax.enable_x64(True):
        params = _params(7, e, scale=2.0)
        x = jnp.asarray(np.random.default_rng(8).uniform(size=(4, *e.in_shape)))
        s0 = tuple(
            jnp.asarray(np.random.default_rng(9).uniform(size=(4, *shp))) for shp in e.state_shapes
        )
        w = [jnp.asarray(np.random.default_rng(10 + i).normal(size=a.shape)) for i, a in
             enumerate(s0)]  # fmt: skip

        def plain(p, x, s, t):
            if s is None:
                s, t = energy.from_zero(p, x, e), t - 1
            return jax.lax.fori_loop(0, t, lambda _, z: energy.step(p, x, z, config=e), s)

        def scores(run, t, zero):
            def all_layers(p, x, s):
                z = run(p, x, None if zero else s, t)
                return sum(jnp.sum(a * b) for a, b in zip(z, w, strict=True))

            def readout(p, x, s):  # the other layers' cotangents are symbolic zeros
                return jnp.sum(energy.readout(p, run(p, x, None if zero else s, t), e) ** 2)

            return all_layers, readout

        new = lambda p, x, s, t: energy.run_sync(p, x, s, t, config=e)  # noqa: E731
        for t, zero in ((1, True), (4, True), (3, False)):
            for a, b in zip(new(params, x, None if zero else s0, t),
                            plain(params, x, None if zero else s0, t), strict=True):  # fmt: skip
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
            for f, g in zip(scores(new, t, zero), scores(plain, t, zero), strict=True):
                for argnums in ((0, 1, 2), (1,)):  # with and without the params' cotangent
                    got = jax.grad(f, argnums)(params, x, s0)
                    want = jax.grad(g, argnums)(params, x, s0)
                    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
            dx = jax.grad(scores(new, t, zero)[0], 1)(params, x, s0)
            assert float(jnp.abs(dx).max()) > 1e-3  # the input's cotangent is not vacuous
        if e.activation == "my_sigmoid":  # smooth: the gradient against finite differences
            f = scores(new, 4, True)[0]
            check_grads(lambda x: f(params, x, s0), (x,), 1, modes=["rev"])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        energy.run_sync(params, x, s0, 0, config=e)


def test_run_sync_tapes_the_slopes_of_an_activation_without_slope_of_output(monkeypatch):
    # The reverse loop's fallback for an activation whose slope is not a function of its
    # output (none of the built-in ones): it tapes sigma'(d_t). Same gradients.
    e = _ARCHS[1]
    with jax.enable_x64(True):
        params = _params(7, e, scale=2.0)
        x = jnp.asarray(np.random.default_rng(8).uniform(size=(4, *e.in_shape)))
        s0 = tuple(
            jnp.asarray(np.random.default_rng(9).uniform(size=(4, *shp))) for shp in e.state_shapes
        )

        def score(p, x, s):
            return sum(jnp.sum(jnp.sin(a)) for a in energy.run_sync(p, x, s, 3, config=e))

        want = jax.grad(score, (0, 1, 2))(params, x, s0)
        monkeypatch.setattr(energy, "SLOPE_OF_OUTPUT", {})
        got = jax.grad(score, (0, 1, 2))(params, x, s0)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
        assert float(jnp.abs(got[1]).max()) > 1e-3


@pytest.mark.parametrize("update", ["sync", "async"])
def test_plain_loop_phases_equal_the_engine(update):
    # Picard with stop="never" runs as a plain loop (no per-step residuals, no extra update):
    # same states, residual, steps and BPTT input gradient as the engine's loop (which the
    # recording of a trajectory still uses).
    cfg = dataclasses.replace(_tiny(t1=5), update=update, t2=3)
    with jax.enable_x64(True):
        params = _params(3, cfg.energy, scale=1.5)
        x = jnp.asarray(np.random.default_rng(4).uniform(size=(3, 6, 6, 1)))
        y = jnp.asarray([0, 2, 1])
        plain, engine = ep.free_phase(params, x, cfg), ep.free_phase(params, x, cfg, record=5)
        for a, b in zip(plain.z, engine.z, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(plain.residual, engine.residual, rtol=1e-10)
        assert float(plain.residual.min()) > 1e-6  # unconverged: the residual is informative
        np.testing.assert_array_equal(plain.steps, engine.steps)
        np.testing.assert_array_equal(plain.status, engine.status)

        def score(x, record):
            sol = ep.free_phase(params, x, cfg, grad="unrolled", record=record)
            return jnp.sum(energy.readout(params, sol.z, cfg.energy) * jnp.arange(3.0))

        np.testing.assert_allclose(jax.grad(score)(x, 0), jax.grad(score)(x, 5), rtol=1e-10)
        assert float(jnp.abs(jax.grad(score)(x, 0)).max()) > 0
        nudged = ep._nudged(params, x, y, plain.z, 0.3, cfg, None)
        step = energy.UPDATES[update]
        ref = solvers.solve(
            lambda z, a: step(params, x, z, config=cfg.energy, beta=0.3, y=y),
            plain.z, (), method="picard", max_steps=3, stop="never", grad="none", record=3,
        )  # fmt: skip
        for a, b in zip(nudged.z, ref.z, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(nudged.residual, ref.residual, rtol=1e-10)


def test_classifier_metadata_values_and_gradients():
    cfg = _tiny(t1=6)
    params = ep.init(jax.random.PRNGKey(1), cfg)
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 6, 6, 1)), jnp.float32)
    exact = ep.classifier(params, cfg)
    bptt = ep.classifier(params, cfg, gradient=GradientPath("unrolled", 3))
    bptt_full = ep.classifier(params, cfg, gradient=GradientPath("unrolled", 6))
    implicit = ep.classifier(params, cfg, gradient=GradientPath("implicit"))
    assert (exact.prediction_depth, exact.gradient) == (6, GradientPath("unrolled", 6))
    assert exact.gradient_matches_prediction and implicit.gradient_matches_prediction
    assert bptt.gradient == GradientPath("unrolled", 3)
    assert not bptt.gradient_matches_prediction and bptt_full.gradient_matches_prediction
    assert exact.trajectory_fn is not None

    def unrolled_logits(x, steps):  # the reference: a Python loop of `steps` updates
        s = energy.zero_states(cfg.energy, x.shape[0])
        for _ in range(steps):
            s = energy.step(params, x, s, config=cfg.energy)
        return energy.readout(params, s, cfg.energy)

    w = jnp.asarray([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]])

    @jax.jit
    def check(x):
        out = {}
        for name, c in (("exact", exact), ("bptt", bptt), ("implicit", implicit)):
            out[name] = jax.value_and_grad(lambda x, c=c: jnp.sum(w * c.logits_fn(x)))(x)
        for t in (3, 6):
            out[f"t{t}"] = jax.value_and_grad(lambda x, t=t: jnp.sum(w * unrolled_logits(x, t)))(x)
        return out

    out = check(x)
    for name in ("exact", "bptt", "implicit"):  # forward value: always the T-step prediction
        np.testing.assert_allclose(out[name][0], out["t6"][0], rtol=1e-5)
    np.testing.assert_allclose(out["exact"][1], out["t6"][1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["bptt"][1], out["t3"][1], rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(out["exact"][1])).sum() > 0
    with pytest.raises(ValueError, match="depth"):
        GradientPath("unrolled")
    with pytest.raises(ValueError, match="GradientPath"):
        ep.classifier(params, cfg, gradient="bptt")


def test_paper_configs_are_the_reference_constants_and_take_a_train_step(tmp_path):
    from eqrobust import data as data_lib
    from eqrobust.configs import ep_cnn
    from eqrobust.train import ep as ep_train

    c10, c100 = ep_cnn.get_config("paper"), ep_cnn.get_config("paper_cifar100")
    assert tuple(c10.model.channels) == (128, 256, 512, 512)
    assert tuple(c100.model.channels) == (128, 256, 512, 1024)
    for c in (c10, c100):
        assert tuple(c.model.paddings) == (1, 1, 1, 0) and c.model.kernel_size == 3
        assert (c.model.t1, c.model.t2, c.batch_size, c.num_epochs) == (250, 30, 128, 120)
        assert tuple(c.optimizer.lrs) == (0.25, 0.15, 0.1, 0.08, 0.05)
        assert (c.optimizer.weight_decay, c.optimizer.momentum) == (3e-4, 0.9)
        assert (c.optimizer.schedule, c.optimizer.cosine_epochs, c.optimizer.lr_min) == (
            "cosine",
            100,
            1e-5,
        )
        assert c.model.estimator == "symmetric" and c.model.output == "softmax"
        assert c.trainer == "ep"
    assert (c10.model.beta, c100.model.beta) == (0.5, 1.0)
    assert c10.model.std_scale == 3.0 and c100.model.std is None

    # The paper network on CIFAR-shaped generated data: one EP training step. Only the batch and the
    # phase lengths are cut for CPU; every architectural setting is the paper's.
    c = ep_cnn.get_config("paper")
    c.dataset = "synthetic"
    c.dataset_options = dict(num_train=4, num_test=4, shape=(32, 32, 3), num_classes=10)
    c.batch_size, c.model.t1, c.model.t2 = 2, 3, 2
    ds = data_lib.load("synthetic", **c.dataset_options)
    cfg = ep_train.build_ep_config(c, ds)
    assert cfg.energy.state_shapes[-1] == (1, 1, 512)
    np.testing.assert_allclose(cfg.energy.std, np.array([0.2023, 0.1994, 0.2010]) * 3, rtol=1e-6)
    trained = ep_train.train(c, tmp_path / "paper", stop_at_step=1)
    assert int(trained.state["step"]) == 1
    p0 = ep.init(jax.random.PRNGKey(c.seed), cfg)
    moved = [float(jnp.abs(a.w - b.w).max()) for a, b in zip(trained.state["params"], p0)]
    assert all(m > 0 for m in moved)
    assert trained.classifier.prediction_depth == 3


def test_smoke_training_learns_synthetic_data(tmp_path):
    from eqrobust.configs import ep_cnn
    from eqrobust.train import get_trainer

    c = ep_cnn.get_config("smoke")
    trained = get_trainer(c.trainer)(c, tmp_path / "smoke")
    accs = [r["test_accuracy"] for r in trained.history]
    assert accs[-1] >= 0.6, accs  # chance is 0.1
    assert trained.classifier.gradient_matches_prediction
    # resuming a finished run only loads it
    again = get_trainer(c.trainer)(c, tmp_path / "smoke")
    assert again.history[-1]["test_accuracy"] == accs[-1]


def test_bfloat16_training_step_keeps_float32_weights_and_learns(tmp_path):
    from eqrobust.configs import ep_cnn
    from eqrobust.train import get_trainer

    c = ep_cnn.get_config("smoke")
    c.model.compute_dtype = "bfloat16"
    trained = get_trainer(c.trainer)(c, tmp_path / "bf16")
    leaves = jax.tree.leaves(trained.state["params"]) + jax.tree.leaves(trained.state["opt"])
    assert all(a.dtype in (jnp.float32, jnp.int32) for a in leaves)
    assert trained.history[-1]["test_accuracy"] >= 0.5  # chance is 0.1; float32 reaches >= 0.6
    c.model.compute_dtype = "float16"
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        get_trainer(c.trainer)(c, tmp_path / "f16")


def test_config_validation():
    with pytest.raises(ValueError, match="estimator"):
        ep.EPConfig(estimator="two_sided")
    with pytest.raises(ValueError, match="beta"):
        ep.EPConfig(beta=0.0)
    with pytest.raises(ValueError, match="Unknown EP model fields"):
        ep.config_from_dict({"channels": (2,), "paddings": (1,), "gamma": 1})
    cfg = _tiny()
    params = ep.init(jax.random.PRNGKey(0), cfg)
    with pytest.raises(ValueError, match="Expected images"):
        ep.predict(params, jnp.zeros((2, 5, 5, 1)), cfg)


def test_ep_gradient_reports_whether_the_nudged_phases_settled():
    """EPAux.nudged_residual: [B], the larger of the two nudged phases' residuals; tiny after
    many nudged steps, clearly larger after one (the papers' short T2 leaves them unsettled)."""
    e = EnergyConfig(in_shape=(6, 6, 1), num_classes=3, channels=(3, 4), paddings=(1, 1), fc=(5,))
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        params = _params(1, e)
        x = jnp.asarray(rng.uniform(size=(4, 6, 6, 1)))
        y = jnp.asarray(rng.integers(0, 3, 4))
        res = {}
        for t2 in (1, 80):
            cfg = ep.EPConfig(energy=e, t1=80, t2=t2, beta=0.5, free_tol=1e-14)
            _, aux = ep.ep_gradient(params, x, y, cfg)
            assert aux.nudged_residual.shape == (4,)
            res[t2] = np.asarray(aux.nudged_residual)
            one = ep.ep_gradient(params, x, y, cfg, estimator="one_sided")[1].nudged_residual
            assert np.all(np.asarray(one) <= res[t2] + 1e-15)  # the max over both phases
        assert res[80].max() < 1e-10 and res[1].min() > 1e3 * res[80].max()
