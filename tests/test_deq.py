"""DEQ model and trainer: exact/phantom gradients, Broyden trajectory, weight norm, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from eqrobust import solvers
from eqrobust.configs import deq as deq_configs
from eqrobust.models.deq import DEQNet, DEQSolver, WNConv, deq_classifier, group_norm
from eqrobust.train import deq as deq_train
from eqrobust.train import get_trainer


def _model(ift: bool, *, dropout: float = 0.0, max_iter: int = 8, tol: float = 1e-3, **kw):
    return DEQNet(
        in_shape=(12, 12, 1),
        num_classes=3,
        channels=(4, 8),
        expansion=2,
        num_groups=2,
        dropout=dropout,
        head_channels=(2, 4),
        final_channels=8,
        stem_strides=(2,),
        solver=DEQSolver(f_max_iter=max_iter, f_tol=tol, ift=ift, **kw),
        rngs=nnx.Rngs(0),
    )


def _eq(m, **kw):
    """Jitted m.equilibrium(x, key=..., **kw) (eager NNX dispatch is slow)."""
    graphdef, state = nnx.split(m)
    run = jax.jit(lambda st, x, key: nnx.merge(graphdef, st).equilibrium(x, key=key, **kw))
    return lambda x, key=None: run(state, x, key)


def _x(b=2, seed=1, dtype=jnp.float64):
    return jax.random.uniform(jax.random.PRNGKey(seed), (b, 12, 12, 1), dtype)


def _to64(model):
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, state)
    return nnx.merge(graphdef, state)


def _contractive(m):
    """A random-init MDEQ cell is not contractive (training makes it so); scaling the injection
    and the block's second GroupNorm makes the fixed point well defined for exact checks."""
    m.stem[1].scale[...] = m.stem[1].scale[...] * 100.0
    for b in m.cell.blocks:
        b.gn2.scale[...] = b.gn2.scale[...] * 100.0
    return m


def test_exact_gradients_match_finite_differences(x64):
    m = _contractive(_to64(_model(True, max_iter=40, tol=1e-14, b_max_iter=40, b_tol=1e-14)))
    m.eval()
    x = _x()
    w = jax.random.normal(jax.random.PRNGKey(3), (2, 3), jnp.float64)
    out = _eq(m)(x)
    assert float(jnp.max(out.residual)) < 1e-11  # really at the fixed point
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    @jax.jit
    def loss(x, v):
        p = jax.tree.map(lambda a: a, params)
        p["cell"]["blocks"][0]["conv1"]["v"] = nnx.Param(v)
        mm = nnx.merge(graphdef, p, rest, copy=True)
        return jnp.sum(mm.equilibrium(x).logits * w)

    v0 = params["cell"]["blocks"][0]["conv1"]["v"][...]
    check_grads(loss, (x, v0), order=1, modes=["rev"], atol=1e-5, rtol=1e-4, eps=1e-5)


def test_phantom_gradient_is_bptt_through_the_unroll(x64):
    m = _to64(_model(False))
    m.eval()
    x = _x()
    w = jax.random.normal(jax.random.PRNGKey(3), (2, 3), jnp.float64)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)

    def model_loss(p, x):
        return jnp.sum(nnx.merge(graphdef, p, rest, copy=True).equilibrium(x).logits * w)

    def reference_loss(p, x):
        mm = nnx.merge(graphdef, p, rest, copy=True)
        f, cstate = mm.cell_fn()
        args = (cstate, mm.inject(x), None)
        z0 = mm.zeros(x.shape[0], x.dtype)
        sol = solvers.solve(
            f, z0, args, method="broyden", max_steps=8, tol=1e-3, grad="none", memory=8
        )
        z = f(jax.lax.stop_gradient(sol.z), args)
        for _ in range(5):
            z = [0.5 * a + 0.5 * b for a, b in zip(z, f(z, args))]
        return jnp.sum(mm.readout(z) * w)

    v1, g1 = jax.jit(jax.value_and_grad(model_loss, argnums=(0, 1)))(params, x)
    v2, g2 = jax.jit(jax.value_and_grad(reference_loss, argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(v1, v2, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_recorded_broyden_trajectory_matches_hand_written_loop(x64):
    m = _to64(_model(False, tol=1e-14))
    m.eval()
    x = _x()
    out = _eq(m, record=True)(x)
    f, cstate = m.cell_fn()
    f = jax.jit(f)
    args = (cstate, m.inject(x), None)
    shapes = [s for s in m.state_shapes]
    sizes = [int(np.prod(s)) for s in shapes]

    def F(zf):  # [D] -> [D], one example at a time (f acts per example)
        z, i = [], 0
        for s, n in zip(shapes, sizes):
            z.append(zf[i : i + n].reshape(1, *s))
            i += n
        return jnp.concatenate([a.reshape(-1) for a in f(z, args_b)])

    for b in range(2):
        args_b = (cstate, args[1][b : b + 1], None)
        d = sum(sizes)
        z = np.zeros(d)
        binv = -np.eye(d)  # inverse Jacobian estimate of g(z) = f(z) - z
        g = np.asarray(F(jnp.asarray(z))) - z
        for i in range(8):
            dz = -binv @ g
            z_new = z + dz
            g_new = np.asarray(F(jnp.asarray(z_new))) - z_new
            dg = g_new - g
            vt = dz @ binv
            binv = binv + np.outer(dz - binv @ dg, vt) / (vt @ dg)
            z, g = z_new, g_new
            rec = np.concatenate([np.asarray(a[i, b]).reshape(-1) for a in out.trajectory.z])
            np.testing.assert_allclose(rec, z, rtol=1e-8, atol=1e-10)
            r = np.linalg.norm(g) / np.linalg.norm(g + z)
            np.testing.assert_allclose(out.trajectory.residual[i, b], r, rtol=1e-8)


def test_weight_norm():
    conv = WNConv(3, 5, 3, rngs=nnx.Rngs(0))
    conv.g[...] = jnp.arange(1.0, 6.0)
    w = conv.kernel()
    np.testing.assert_allclose(jnp.sqrt(jnp.sum(w * w, axis=(0, 1, 2))), jnp.arange(1.0, 6.0), 1e-5)
    x = jax.random.uniform(jax.random.PRNGKey(0), (1, 6, 6, 3))
    y = conv(x)
    conv.v[...] = conv.v[...] * 7.0  # direction only: the output is unchanged
    np.testing.assert_allclose(conv(x), y, rtol=1e-5, atol=1e-6)


def test_variational_dropout_mask_fixed_across_steps_and_off_at_eval():
    m = _model(False, dropout=0.3)
    x = _x(dtype=jnp.float32)
    key = jax.random.PRNGKey(5)
    m.train()
    with pytest.raises(ValueError, match="dropout key"):
        m.equilibrium(x)
    out = _eq(m, record=True)(x, key)
    masks = m.dropout_masks(key, 2)
    assert masks[0].shape == (2, 1, 1, 8) and not np.array_equal(masks[0][0], masks[0][1])
    f, cstate = m.cell_fn()
    f = jax.jit(f)
    args = (cstate, m.inject(x), masks)
    u = out.unrolled  # f(z*), then 5 damped steps, each with the same mask
    for a, b in zip(f(out.z_star, args), u):
        np.testing.assert_allclose(a, b[0], rtol=1e-5, atol=1e-6)
    for t in range(5):
        nxt = [0.5 * a[t] + 0.5 * b for a, b in zip(u, f([a[t] for a in u], args))]
        for a, b in zip(nxt, u):
            np.testing.assert_allclose(a, b[t + 1], rtol=1e-5, atol=1e-6)
    other = m.dropout_masks(jax.random.PRNGKey(6), 2)
    fo = f(out.z_star, (cstate, args[1], other))
    assert not np.allclose(fo[0], u[0][0], atol=1e-4)
    m.eval()  # dropout off: the forward ignores the key
    ev = _eq(m)
    np.testing.assert_array_equal(ev(x, key).logits, ev(x, jax.random.PRNGKey(9)).logits)


def test_random_intermediate_state_is_lowest_of_first_k():
    m = _model(False, tol=1e-9)
    m.eval()
    x = _x(3, dtype=jnp.float32)
    full = _eq(m, record=True)(x)
    out = _eq(m, k=3)(x)
    res = np.asarray(full.trajectory.residual[:3])
    np.testing.assert_allclose(out.residual, res.min(0), rtol=1e-6)
    np.testing.assert_array_equal(out.steps, res.argmin(0) + 1)


def test_classifier_declares_gradient_paths():
    m = _model(False)
    m.eval()
    x = _x(2, dtype=jnp.float32)
    c = deq_classifier(m)
    assert str(c.gradient) == "phantom(5)" and c.prediction_depth == 8
    assert c.trajectory_fn(x).shape == (8, 2, 3)
    assert c.logits_fn(x).shape == (2, 3)
    assert str(deq_classifier(m, ift=True).gradient) == "implicit"


def test_configs_and_variants():
    c = deq_configs.get_config("paper,trades,rand,exact")
    assert c.objective == "trades" and c.random_intermediate and c.model.ift
    assert c.model.channels == (32, 64, 128, 256) and c.model.final_channels == 1680
    assert c.model.dropout == 0.22 and c.model.expansion == 5 and c.pretrain_steps == 16000
    assert deq_configs.get_config("paper_xl").model.channels == (72, 144, 288, 576)
    assert deq_configs.get_config("cpu,nojac").jac.weight == 0.0
    with pytest.raises(ValueError, match="variant"):
        deq_configs.get_config("cpu,bogus")


def _cifar_like(c, objective):
    c.objective = objective
    c.dataset = "synthetic"
    c.dataset_options = dict(num_train=12, num_test=4, shape=(32, 32, 3), num_classes=10, seed=0)
    c.num_val = 4
    c.batch_size = 4
    c.adv.steps = 1
    c.eval_batch_size = 4
    return c


@pytest.mark.slow  # ~10 min on the loaded 2-core machine (compiles DEQ-Large + PGD)
@pytest.mark.parametrize("arg", ["paper,pgd_at,rand"])
def test_paper_config_one_training_step(arg):
    c = deq_configs.get_config(arg)
    c = _cifar_like(c, c.objective)
    c.pretrain_steps = 0  # the step after pretraining (lax.cond compiles the pretraining step too)
    trained = get_trainer(c.trainer)(c, None, stop_at_step=1)
    assert trained.history[-1]["step"] == 1  # no epoch ended: only the final row
    assert 0.0 <= trained.history[-1]["test_accuracy"] <= 1.0


def test_smoke_training_runs_and_resumes(tmp_path, monkeypatch):
    c = deq_configs.get_config("smoke")
    c.num_epochs = 2
    trainer = get_trainer(c.trainer)
    first = trainer(c, tmp_path, stop_at_step=7)
    assert first.history[-1]["step"] == 7
    done = trainer(c, tmp_path)
    val = [r for r in done.history if "val_clean_accuracy" in r]
    assert len(val) == 2 and "val_pgd_accuracy" in val[0] and val[0]["val_residual"] >= 0
    assert [r["step"] for r in val] == [14, 28]
    assert (tmp_path / "best.json").exists() and done.history[-1]["selected_step"] in (14, 28)
    assert done.history[-1]["selected_by"].startswith("val_")
    # Loaded again: the selected model's test accuracy comes from selected.json, not a new pass.
    monkeypatch.setattr(deq_train, "_accuracy", lambda *a, **k: pytest.fail("test pass rerun"))
    again = trainer(c, tmp_path)
    assert again.history[-1] == done.history[-1]


def test_a_single_candidate_is_selected_without_validation():
    """A run with one epoch end has nothing to select between: no validation pass (its PGD
    costs ~26 s at cpu scale), the final state is the model."""
    c = deq_configs.get_config("smoke")
    c.num_steps = 3
    trained = get_trainer(c.trainer)(c, None)
    assert not [r for r in trained.history if "val_clean_accuracy" in r]
    assert trained.history[-1]["selected_step"] == 3
    assert trained.history[-1]["selected_by"] == "final state (only candidate)"


@pytest.mark.parametrize("shape,groups", [((3, 5, 4, 16), 8), ((2, 7, 7, 6), 3), ((2, 3, 3, 4), 1)])
def test_group_norm_matches_pytorch_definition_in_float64(shape, groups):
    """GroupNorm (reduction order rearranged for speed) against the textbook definition:
    per example and group, (x - mean) / sqrt(biased var + eps) over (H, W, C/G), then affine."""
    r = np.random.RandomState(0)
    x = r.randn(*shape) * 3.0 + 2.0
    scale, bias = r.randn(shape[-1]), r.randn(shape[-1])
    b, h, w, c = shape
    xg = x.reshape(b, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    want = ((xg - mean) / np.sqrt(var + 1e-5)).reshape(shape) * scale + bias
    with jax.enable_x64(True):
        got = group_norm(jnp.asarray(x), groups, jnp.asarray(scale), jnp.asarray(bias))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
        check_grads(
            lambda a: group_norm(a, groups, jnp.asarray(scale), jnp.asarray(bias)),
            (jnp.asarray(x),),
            order=2,
            modes=("rev",),
        )


@pytest.mark.parametrize("impl", ["auto", "xla_flip", "patches"])
def test_conv_formulations_give_the_same_deq(x64, impl):
    """The cpu default "auto" (patches below 8 input channels, else the flipped lax.conv) is
    the same model as lax.conv: logits and input gradients through the Broyden solve and the
    phantom unroll agree in float64 (this model has convs on both sides of the threshold)."""
    x = _x()
    out = {}
    for conv in (impl, "xla"):
        m = DEQNet(
            in_shape=(12, 12, 1), num_classes=3, channels=(4, 8), expansion=2, num_groups=2,
            dropout=0.0, head_channels=(2, 4), final_channels=8, stem_strides=(2,),
            conv_impl=conv, solver=DEQSolver(f_max_iter=8, f_tol=1e-3), rngs=nnx.Rngs(0),
        )  # fmt: skip
        m = _to64(m)
        m.eval()
        graphdef, state = nnx.split(m)
        f = jax.jit(lambda x, st=state, g=graphdef: nnx.merge(g, st).equilibrium(x).logits)
        out[conv] = (f(x), jax.grad(lambda x, f=f: jnp.sum(jnp.sin(f(x))))(x))
    np.testing.assert_allclose(out[impl][0], out["xla"][0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out[impl][1], out["xla"][1], rtol=1e-7, atol=1e-10)
    assert float(jnp.max(jnp.abs(out["xla"][1]))) > 1e-6  # a gradient that can disagree
