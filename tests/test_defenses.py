"""Test-time defences of DEQs: early state, ensemble state, entropy reduction and their attacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eqrobust import defenses as D
from eqrobust.attacks import _common as C
from eqrobust.evaluation import default_config
from eqrobust.evaluation.health import check_gradient_probe
from eqrobust.evaluation.probes import (
    gradient_path_probe,
    gradient_path_probes,
    gradient_probe,
    prediction_with_gradient,
)
from eqrobust.models.deq import DEQNet, DEQSolver, deq_classifier, deq_compiler_options


def _model(max_iter: int = 4, branches: int = 2, **kw) -> DEQNet:
    m = DEQNet(
        in_shape=(12, 12, 1),
        num_classes=3,
        channels=(4, 8)[:branches],
        expansion=2,
        num_groups=2,
        dropout=0.0,
        head_channels=(2, 4)[:branches],
        final_channels=8,
        stem_strides=(2,),
        solver=DEQSolver(f_max_iter=max_iter, f_tol=1e-3, **kw),
        rngs=nnx.Rngs(0),
    )
    m.eval()
    return m


def _x(b: int = 4, seed: int = 1, dtype=jnp.float32) -> jax.Array:
    return jax.random.uniform(jax.random.PRNGKey(seed), (b, 12, 12, 1), dtype)


def _forward(m, cfg, **kw):
    graphdef, state = nnx.split(m)
    run = jax.jit(lambda st, x: D.entropy_reduction_forward(nnx.merge(graphdef, st), x, cfg, **kw))
    return lambda x: run(state, x)


def _to64(model):
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, state)
    return nnx.merge(graphdef, state)


def test_entropy_reduction_lowers_prediction_entropy():
    m = _model(max_iter=4)
    x = _x(6)
    cfg = D.EntropyReduction(eps=0.1, alpha=0.02, t_f=2, r=10)
    out = _forward(m, cfg)(x)
    base = _forward(m, D.EntropyReduction(eps=0.1, alpha=0.02, t_f=2, r=0))(x)
    h, h0 = D.prediction_entropy(out.logits), D.prediction_entropy(base.logits)
    assert float(jnp.mean(h)) < float(jnp.mean(h0))
    # each intervention lowers the objective it optimises, and stays in the eps-ball and [0, 1]
    assert np.all(np.mean(out.entropy_after, 1) < np.mean(out.entropy_before, 1))
    assert float(jnp.max(jnp.abs(out.x_purified - x))) <= 0.1 + 1e-6
    assert float(jnp.min(out.x_purified)) >= 0.0 and float(jnp.max(out.x_purified)) <= 1.0
    np.testing.assert_array_equal(base.x_purified, x)
    # examples are independent: the batched forward is the per-example (vmapped) one
    one = _forward(m, cfg)
    for i in (0, 5):
        np.testing.assert_allclose(one(x[i : i + 1]).logits[0], out.logits[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t_f", [1, 4])
def test_warm_continuation_without_input_change_is_the_plain_solve(x64, t_f):
    # N = 6: t_f = 4 leaves a 2-step remainder; lowest="last" makes the forwards comparable.
    m = _to64(_model(max_iter=6, lowest="last"))
    m.eval()
    x = _x(3, dtype=jnp.float64)
    out = _forward(m, D.EntropyReduction(t_f=t_f, r=0), record=True)(x)
    graphdef, state = nnx.split(m)
    plain = jax.jit(lambda st, x: nnx.merge(graphdef, st).equilibrium(x, record=True))(state, x)
    for a, b in zip(out.trajectory, plain.trajectory.z, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(out.logits, plain.logits, rtol=1e-9, atol=1e-11)


def test_patch_is_the_broyden_update_with_the_new_residual(x64):
    """reinject(patch=True) equals a dense inverse-Jacobian Broyden whose last rank-1 update
    uses delta_g = g_new(z) - g_old(z_prev) (the reference's patch), for a linear f."""
    from eqrobust import solvers

    d, b = 5, 2
    ka, kb, kc = jax.random.split(jax.random.PRNGKey(0), 3)
    a = 0.5 * jax.random.normal(ka, (d, d), jnp.float64) / np.sqrt(d)
    c_old = jax.random.normal(kb, (b, d), jnp.float64)
    c_new = c_old + 0.3 * jax.random.normal(kc, (b, d), jnp.float64)
    f = lambda z, c: z @ a.T + c
    run = lambda c, st, k: solvers.solve(
        f, jnp.zeros((b, d)), c, method="broyden", max_steps=k, tol=1e-14, grad="none",
        memory=4, init_state=st, return_state=True, lowest="last",
    ).state  # fmt: skip
    s2 = run(c_old, None, 2)  # solve(init_state=None) takes 2 steps from z0 = 0
    s3 = run(c_old, s2, 1)
    st = D.reinject(s2, s3, f(s3.z, c_new), patch=True)
    z4 = run(c_new, st, 1).z
    for i in range(b):  # dense reference
        z, binv = np.zeros(d), -np.eye(d)
        g = np.asarray(f(z, c_old[i]))
        zs = [z]
        for k in range(3):
            dz = -binv @ g
            zn = z + dz
            c = c_new[i] if k == 2 else c_old[i]
            gn = np.asarray(f(zn, c)) - zn  # k == 2: the patched delta_g uses the new input
            vt = dz @ binv
            binv = binv + np.outer(dz - binv @ (gn - g), vt) / (vt @ (gn - g))
            z, g = zn, gn
            zs.append(z)
        np.testing.assert_allclose(s3.z[i], zs[3], rtol=1e-10)
        np.testing.assert_allclose(z4[i], z - binv @ g, rtol=1e-9, atol=1e-12)


def test_ensemble_and_early_state_read_the_trajectory():
    m = _model(max_iter=4)
    x = _x(3)
    traj = jax.jit(deq_classifier(m).trajectory_fn)(x)  # [N, B, K] readouts of z_1..z_N
    ens = jax.jit(D.ensemble_state(m).logits_fn)(x)
    np.testing.assert_allclose(
        jax.nn.softmax(ens), jnp.mean(jax.nn.softmax(traj), axis=0), rtol=1e-5, atol=1e-6
    )
    ens_c = jax.jit(D.ensemble_state(deq_classifier(m)).logits_fn)(x)
    np.testing.assert_allclose(jax.nn.softmax(ens_c), jax.nn.softmax(ens), rtol=1e-5, atol=1e-6)
    for i in (1, 3):
        c = D.early_state(m, i)
        assert c.gradient_matches_prediction
        np.testing.assert_allclose(jax.jit(c.logits_fn)(x), traj[i - 1], rtol=1e-4, atol=1e-5)
    g = jax.jit(jax.grad(lambda x: jnp.sum(D.early_state(m, 2).logits_fn(x)[:, 0])))(x)
    assert float(jnp.sum(jnp.abs(g))) > 0.0  # BPTT through the steps: a real input gradient
    with pytest.raises(ValueError, match="index must be"):
        D.early_state(m, 5)


def test_select_early_state_picks_the_most_robust_state():
    m = _model(max_iter=3)
    x = _x(6, seed=4)
    y = jnp.argmax(jax.jit(deq_classifier(m).logits_fn)(x), -1)
    sel = D.select_early_state(
        m, x, y, key=jax.random.PRNGKey(0), eps=0.05, step_size=0.02, steps=3
    )
    assert sel.robust_accuracy.shape == (3,) and 1 <= sel.index <= 3
    assert sel.robust_accuracy[sel.index - 1] == sel.robust_accuracy.max()
    assert sel.classifier.prediction_depth == sel.index


def _centre_readout(m: DEQNet, logits: jax.Array) -> None:
    """Rescale and centre the readout of a random DEQ on a batch, so that its predictions vary
    across inputs and small perturbations flip them (a smoke model)."""
    m.head.fc.kernel[...] = 10.0 * m.head.fc.kernel[...]
    m.head.fc.bias[...] = 10.0 * (m.head.fc.bias[...] - jnp.mean(logits, 0))


def test_adaptive_attack_is_at_least_as_strong_as_transfer():
    m = _model(max_iter=3, branches=1)  # one branch: a smaller program, faster compiles
    x = _x(8, seed=2)
    cfg = D.EntropyReduction(eps=0.05, alpha=0.01, t_f=1, r=3)
    defended = D.entropy_reduction(m, cfg)  # its params are traced: one compile for any values
    _centre_readout(m, C.logits(defended.logits_fn, x))
    defended = D.entropy_reduction(m, cfg)
    assert defended.test_time_optimization and defended.prediction_depth == 3
    y = jnp.argmax(C.logits(D.entropy_reduction_logits_fn(m, cfg), x), -1)
    res = D.attack_entropy_reduction(
        m, x, y, key=jax.random.PRNGKey(0), cfg=cfg, variants=("transfer", "full"),
        eps=0.05, steps=4, step_size=0.0125,
    )  # fmt: skip
    acc = res.accuracy
    assert acc["clean"] == 1.0
    assert acc["transfer"] < 1.0  # the smoke model is attackable at all
    assert acc["full"] <= acc["transfer"]
    assert acc["worst"] <= min(acc["full"], acc["transfer"])


def test_gradient_path_check_flags_a_defence_attacked_through_another_function():
    """Check (d) of the DEQ study: a defence (early state z_3) attacked with its own BPTT gradient
    passes; attacked through the gradient of another function (the readout of z_1, the DEQ's
    phantom gradient) it is flagged, although every forward value is the defence's prediction."""
    m = _model(max_iter=3, branches=1, grad=2)
    x = _x(3, seed=2)
    early = D.early_state(m, 3).logits_fn
    y = jnp.asarray([0, 1, 2])  # any labels: the margin is smooth away from ties
    paths = {
        "own": early,
        "z_1": D.early_state(m, 1).logits_fn,  # the same compiled program (index is traced)
        "phantom": deq_classifier(m).logits_fn,
    }
    probes = gradient_path_probes(early, paths, x, y, key=jax.random.PRNGKey(0), directions=2)
    h = default_config().health
    passed = {k: check_gradient_probe(p, h).passed for k, p in probes.items()}
    assert passed == {"own": True, "z_1": False, "phantom": False}, probes
    assert probes["own"].correlation > 0.999 and probes["own"].relative_error < 1e-4
    assert probes["own"].dtype == "float64" and probes["own"].n == 3


def test_prediction_with_gradient_is_the_prediction_forward_and_the_path_backward(x64):
    w1, w2 = (jax.random.normal(jax.random.PRNGKey(i), (12, 3), jnp.float64) for i in (1, 2))
    predict = jax.tree_util.Partial(lambda w, x: jnp.tanh(x.reshape(x.shape[0], -1) @ w), w1)
    other = jax.tree_util.Partial(lambda w, x: x.reshape(x.shape[0], -1) @ w, w2)
    x = jax.random.uniform(jax.random.PRNGKey(3), (4, 2, 2, 3), jnp.float64)
    st = prediction_with_gradient(predict, other)
    np.testing.assert_array_equal(st(x), predict(x))
    ct = jax.random.normal(jax.random.PRNGKey(4), (4, 3), jnp.float64)
    np.testing.assert_allclose(jax.vjp(st, x)[1](ct)[0], jax.vjp(other, x)[1](ct)[0], rtol=1e-12)
    # the split probe measures what the generic probe measures on the straight-through function
    key = jax.random.PRNGKey(5)
    y = jnp.asarray([0, 1, 2, 0])
    for grad in (predict, other):
        split = gradient_path_probe(predict, grad, x, y, key=key, directions=3)
        whole = gradient_probe(prediction_with_gradient(predict, grad), x, y, key=key, directions=3)
        assert split.correlation == pytest.approx(whole.correlation, abs=1e-9)
        assert split.relative_error == pytest.approx(whole.relative_error, abs=1e-9)
    assert gradient_path_probe(predict, predict, x, y, key=key).correlation > 0.9999


def test_deq_classifiers_and_their_defences_carry_the_deq_compiler_options():
    want = (("xla_backend_optimization_level", 1),) if jax.default_backend() == "cpu" else ()
    assert deq_compiler_options() == want
    m = _model()
    clf = deq_classifier(m)
    assert clf.compiler_options == want
    for c in (
        D.early_state(m, 1),
        D.early_state(clf, 1),
        D.ensemble_state(m),
        D.ensemble_state(clf),
        D.entropy_reduction(m, D.EntropyReduction(t_f=2, r=1)),
    ):
        assert c.compiler_options == want, c.name
