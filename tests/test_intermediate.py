"""Intermediate-state attacks: unrolled intermediates, gradient ensemble, simultaneous adjoint."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.tree_util import Partial

from eqrobust import attacks, solvers
from eqrobust.attacks import intermediate as inter
from eqrobust.attacks import losses
from eqrobust.models.deq import DEQNet, DEQSolver, deq_classifier, deq_dynamics

D, K = 6, 3  # state size and classes of the dense test model


# A contractive dense DEQ f(z, a) = tanh(W z + a), a = U flat(x), logits = R z + c.
def _inject(u, x):
    return x.reshape(x.shape[0], -1) @ u.T


def _f(w, z, a):
    return jnp.tanh(z @ w.T + a)


def _readout(r, c, z):
    return z @ r.T + c


def _init(x):
    return jnp.zeros((x.shape[0], D), x.dtype)


def _const(v, x):
    """A 'defended' prediction that is never fooled: always the logits v (label 0)."""
    return jnp.broadcast_to(v, (x.shape[0], v.shape[0])) + 0.0 * jnp.sum(x)


def _params(seed=0, rho=0.8, dtype=jnp.float64):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    w = jax.random.normal(ks[0], (D, D), dtype)
    w = rho * w / jnp.linalg.norm(w, 2)
    u = 2.0 * jax.random.normal(ks[1], (D, 4), dtype)
    r = 2.0 * jax.random.normal(ks[2], (K, D), dtype)
    return w, u, r, jnp.zeros((K,), dtype)


def _dyn(num_states=5, tol=1e-3, seed=0):
    w, u, r, c = _params(seed)
    return inter.broyden_dynamics(
        Partial(_inject, u),
        Partial(_f, w),
        Partial(_readout, r, c),
        Partial(_init),
        num_states=num_states,
        tol=tol,
    ), (w, u, r, c)


def _x(b=3, seed=5):
    return jax.random.uniform(jax.random.PRNGKey(seed), (b, 2, 2, 1), jnp.float64)


def _explicit_states(p, x, n, tol):
    """z_1..z_n of the engine's Broyden (leaves [N, B, D]), computed outside the attack code."""
    w, u, _, _ = p
    sol = solvers.solve(
        lambda z, a: _f(w, z, a),
        _init(x),
        _inject(u, x),
        method="broyden",
        max_steps=n,
        tol=tol,
        record=n,
        grad="none",
        memory=n,
    )
    return sol.trajectory.z


def _explicit_unrolled_readout(p, z_i, x, k, lam):
    """The unrolled-intermediate surrogate written out: z_i constant, f once, k damped steps."""
    w, u, r, c = p
    a = _inject(u, x)
    z = _f(w, z_i, a)
    for _ in range(k):
        z = (1.0 - lam) * z + lam * _f(w, z, a)
    return _readout(r, c, z)


def _explicit_unrolled_loss(p, z_i, x, y, k, lam):
    return jnp.sum(losses.cross_entropy(_explicit_unrolled_readout(p, z_i, x, k, lam), y))


def test_unrolled_gradient_is_the_gradient_of_the_explicit_unroll(x64):
    dyn, p = _dyn()
    x, y = _x(), jnp.array([0, 1, 2])
    zs = _explicit_states(p, x, 5, 1e-3)
    for k, lam in [(1, 0.5), (3, 1.0)]:
        got = inter.unrolled_gradient(dyn, x, y, state=[1, 2, 3, 4, 5], unroll=k, lam=lam)
        assert got.shape == (5, *x.shape)
        want = [jax.grad(_explicit_unrolled_loss, 2)(p, zs[i], x, y, k, lam) for i in range(5)]
        np.testing.assert_allclose(got, jnp.stack(want), rtol=0, atol=1e-10)
        one = inter.unrolled_gradient(dyn, x, y, state=2, unroll=k, lam=lam)
        np.testing.assert_allclose(one, want[1], rtol=0, atol=1e-10)
        if k == 1:
            ens = inter.ensemble_gradient(dyn, x, y, unroll=k, lam=lam)
            np.testing.assert_allclose(ens, sum(want), rtol=0, atol=1e-10)


def test_intermediate_surrogate_predicts_like_the_model_and_has_the_unrolled_gradient(x64):
    dyn, p = _dyn()
    x, y = _x(), jnp.array([0, 1, 2])
    zs = _explicit_states(p, x, 5, 1e-3)
    never = Partial(_const, jnp.array([5.0, 0.0, 0.0]))
    for predict in (None, never):
        fn = inter.intermediate_surrogate(dyn, predict, state=3, unroll=5, lam=0.5)
        want_value = (dyn.predict if predict is None else predict)(x)
        np.testing.assert_array_equal(jax.jit(fn)(x), want_value)  # the value is the model's

        def ce(v, fn=fn):
            return jnp.sum(losses.cross_entropy(fn(v), y))

        # Straight-through: the loss's cotangent is taken at the model's logits, then pulled
        # back through the Jacobian of the explicit unroll (z_3 constant, f once, 5 steps).
        ct = jax.grad(lambda v: jnp.sum(losses.cross_entropy(v, y)))(want_value)
        _, vjp = jax.vjp(lambda v: _explicit_unrolled_readout(p, zs[2], v, 5, 0.5), x)
        (want,) = vjp(ct)
        np.testing.assert_allclose(jax.grad(ce)(x), want, rtol=0, atol=1e-10)
        np.testing.assert_allclose(jax.jit(jax.grad(ce))(x), want, rtol=0, atol=1e-10)
        if predict is None:  # it differs from the final state's gradient (the point of it)
            final = jax.grad(lambda v: jnp.sum(losses.cross_entropy(dyn.predict(v), y)))(x)
            assert not np.allclose(final, want, atol=1e-6)
    for bad in (dict(state=0), dict(state=6), dict(state=[1, 2]), dict(unroll=0)):
        with pytest.raises(ValueError, match="intermediate_surrogate"):
            inter.intermediate_surrogate(dyn, **bad)


def test_autoattack_on_the_intermediate_surrogate_is_judged_on_the_prediction():
    # The dense DEQ with 4 classes (AutoAttack's targeted DLR needs K >= 4), float32.
    w, u, r, c = _params(seed=1, dtype=jnp.float32)
    r4 = jnp.concatenate([r, -r[:1]], axis=0)
    dyn = inter.broyden_dynamics(
        Partial(_inject, u),
        Partial(_f, w),
        Partial(_readout, r4, jnp.zeros((4,))),
        Partial(_init),
        num_states=5,
    )
    x = jax.random.uniform(jax.random.PRNGKey(3), (16, 2, 2, 1), jnp.float32)
    y = jnp.argmax(dyn.predict(x), -1)  # every example clean-correct
    kw = dict(key=jax.random.key(0), eps=0.3, norm="linf", steps=10, queries=20, targets=2)
    res = attacks.autoattack(inter.intermediate_surrogate(dyn, state=3), x, y, **kw)
    assert bool(jnp.all(res.clean_correct))
    broken = ~res.robust
    assert int(broken.sum()) > 0
    # every success is real: the model's own prediction at x_adv is wrong, inside the ball
    assert bool(jnp.all((jnp.argmax(dyn.predict(res.x_adv), -1) != y)[broken]))
    assert float(jnp.max(jnp.abs(res.x_adv - x))) <= 0.3 + 1e-6
    # a prediction that is never fooled stays robust, whatever the surrogate's gradient says
    never = Partial(_const, jnp.array([5.0, 0.0, 0.0, 0.0]))
    zero = jnp.zeros_like(y)
    res = attacks.autoattack(inter.intermediate_surrogate(dyn, never, state=3), x, zero, **kw)
    assert bool(jnp.all(res.robust))


def test_pgd_steps_along_the_surrogate_and_success_is_judged_on_predict_fn(x64):
    dyn, p = _dyn()
    x, y = _x(), jnp.zeros((3,), jnp.int32)
    never = Partial(_const, jnp.array([5.0, 0.0, 0.0]))
    key = jax.random.PRNGKey(0)
    # One step from x (no random start): exactly x + step * sign(surrogate gradient).
    r1 = inter.unrolled_intermediate_pgd(
        dyn,
        x,
        y,
        key=key,
        eps=0.1,
        state=2,
        unroll=3,
        lam=0.5,
        steps=1,
        step_size=0.04,
        random_start=False,
        predict_fn=never,
    )
    g = inter.unrolled_gradient(dyn, x, y, state=2, unroll=3, lam=0.5)
    np.testing.assert_allclose(r1.x_adv, jnp.clip(x + 0.04 * jnp.sign(g), 0, 1), atol=1e-15)
    # A strong attack fools the surrogate (its unrolled readout at x_adv) but not predict_fn:
    # no success is reported.
    r = inter.unrolled_intermediate_pgd(
        dyn, x, y, key=key, eps=0.5, state=2, unroll=3, lam=0.5, steps=10, predict_fn=never
    )
    assert not bool(jnp.any(r.success))
    assert float(jnp.max(jnp.abs(r.x_adv - x))) <= 0.5 + 1e-12
    zs = _explicit_states(p, r.x_adv, 5, 1e-3)
    w, u, rr, c = p
    a = _inject(u, r.x_adv)
    z = _f(w, zs[1], a)
    for _ in range(3):
        z = 0.5 * z + 0.5 * _f(w, z, a)
    assert bool(jnp.any(jnp.argmax(_readout(rr, c, z), -1) != y))
    # With the real prediction, success means predict_fn misclassifies x_adv.
    r = inter.unrolled_intermediate_pgd(dyn, x, y, key=key, eps=0.5, state=2, steps=10)
    assert bool(jnp.any(r.success))
    wrong = jnp.argmax(dyn.predict(r.x_adv), -1) != y
    np.testing.assert_array_equal(r.success, wrong)


def test_ensemble_and_adjoint_pgd_step_along_their_gradients(x64):
    dyn, _ = _dyn()
    x, y = _x(), jnp.zeros((3,), jnp.int32)
    never = Partial(_const, jnp.array([5.0, 0.0, 0.0]))
    kw = dict(key=jax.random.PRNGKey(0), eps=0.1, steps=1, step_size=0.04, random_start=False)
    r = inter.gradient_ensemble_pgd(dyn, x, y, predict_fn=never, **kw)
    g = inter.ensemble_gradient(dyn, x, y)
    np.testing.assert_allclose(r.x_adv, jnp.clip(x + 0.04 * jnp.sign(g), 0, 1), atol=1e-15)
    adj = inter.simultaneous_adjoint(dyn, x, y)
    for state, g in [(3, adj.grads[2]), (None, jnp.sum(adj.grads, 0))]:
        r = inter.adjoint_pgd(dyn, x, y, state=state, predict_fn=never, **kw)
        np.testing.assert_allclose(r.x_adv, jnp.clip(x + 0.04 * jnp.sign(g), 0, 1), atol=1e-15)
        assert not bool(jnp.any(r.success))


def _wild_states(u, x):
    """Stand-in recorded states that swing with x (leaves [5, B, D]), so that where they are
    taken from changes the surrogate's sign."""
    a = _inject(u, x)
    return jnp.stack([jnp.sin(40.0 * (i + 1) * a) for i in range(5)])


def test_states_are_recomputed_from_the_current_iterate(x64):
    dyn, p = _dyn()
    dyn = dataclasses.replace(dyn, trajectory=Partial(_wild_states, p[1]))
    x, y = _x(), jnp.zeros((3,), jnp.int32)
    never = Partial(_const, jnp.array([5.0, 0.0, 0.0]))
    kw = dict(key=jax.random.PRNGKey(0), eps=0.2, state=3, unroll=1, lam=0.5, steps=3)
    kw.update(step_size=0.05, random_start=False, predict_fn=never)

    def manual(states_of):
        xa = x
        for _ in range(3):
            zs = _wild_states(p[1], states_of(xa))
            g = jax.grad(_explicit_unrolled_loss, 2)(p, zs[2], xa, y, 1, 0.5)
            xa = jnp.clip(jnp.clip(xa + 0.05 * jnp.sign(g), x - 0.2, x + 0.2), 0, 1)
        return xa

    moving, fixed = manual(lambda xa: xa), manual(lambda xa: x)
    assert float(jnp.max(jnp.abs(moving - fixed))) > 0.01  # the choice matters here
    r = inter.unrolled_intermediate_pgd(dyn, x, y, **kw)
    np.testing.assert_allclose(r.x_adv, moving, atol=1e-15)
    np.testing.assert_array_equal(r.iterations, [3, 3, 3])
    r = inter.unrolled_intermediate_pgd(dyn, x, y, recompute_states=False, **kw)
    np.testing.assert_allclose(r.x_adv, fixed, atol=1e-15)


def test_clean_errors_and_inactive_examples(x64):
    dyn, _ = _dyn()
    x, y = _x(), jnp.zeros((3,), jnp.int32)
    always = Partial(_const, jnp.array([0.0, 5.0, 0.0]))  # every example already wrong
    kw = dict(key=jax.random.PRNGKey(0), eps=0.1, steps=3, predict_fn=always)
    r = inter.gradient_ensemble_pgd(dyn, x, y, active=jnp.array([True, False, True]), **kw)
    np.testing.assert_array_equal(r.success, [True, False, True])  # broken at x itself
    np.testing.assert_array_equal(r.x_adv, x)
    np.testing.assert_array_equal(r.iterations, [0, 0, 0])


def _implicit_input_gradient(p, x, y):
    """d CE(readout(z*), y) / dx by the implicit function theorem, solved densely."""
    w, u, r, c = p
    a = _inject(u, x)
    z = _init(x)
    for _ in range(300):
        z = _f(w, z, a)
    out = []
    for b in range(x.shape[0]):
        jac = jax.jacobian(lambda zz: _f(w, zz[None], a[b : b + 1])[0])(z[b])
        dl = jax.grad(lambda zz: losses.cross_entropy(_readout(r, c, zz[None]), y[b : b + 1])[0])
        ustar = jnp.linalg.solve(jnp.eye(D) - jac.T, dl(z[b]))
        ga = jax.vjp(lambda aa: _f(w, z[b : b + 1], aa), a[b : b + 1])[1](ustar[None])[0]
        out.append(jax.vjp(lambda xx: _inject(u, xx), x[b : b + 1])[1](ga)[0][0])
    return jnp.stack(out)


def test_simultaneous_adjoint_approaches_the_implicit_gradient(x64):
    n = 30
    dyn, p = _dyn(num_states=n, tol=1e-13)
    x, y = _x(), jnp.array([0, 1, 2])
    exact = _implicit_input_gradient(p, x, y)
    adj = inter.simultaneous_adjoint(dyn, x, y)
    assert adj.grads.shape == (n, *x.shape)
    # The forward iterates are the engine's Broyden iterates.
    np.testing.assert_allclose(adj.z, _explicit_states(p, x, n, 1e-13), rtol=0, atol=1e-12)
    norm = lambda v: jnp.sqrt(jnp.sum(jnp.square(v), axis=(-3, -2, -1)))
    err = np.asarray(norm(adj.grads - exact[None]) / norm(exact)[None])  # [N, B]
    assert np.all(err[0] > 1e-2)  # far from it at the start
    assert np.all(err[-1] < 1e-10)  # exact at the end
    for i in range(n - 3):  # decreasing (over windows of 3 steps) until round-off
        assert np.all((err[i + 3] < err[i]) | (err[i] < 1e-11))
    # u_n -> u* also with B_n as printed in eq. 10 (more slowly).
    lit = inter.simultaneous_adjoint(dyn, x, y, transpose=False)
    err2 = np.asarray(norm(lit.grads - exact[None]) / norm(exact)[None])
    assert np.all(err2[-1] < 1e-7) and np.all(err2[-1] > err[-1])


def test_grid_cells_minimum_and_predict_fn(x64):
    dyn, _ = _dyn(num_states=3)
    x, y = _x(4, seed=7), jnp.array([0, 1, 2, 0])
    key = jax.random.PRNGKey(1)
    res = inter.unrolled_intermediate_grid(dyn, x, y, key=key, eps=0.3, steps=3)
    assert res.accuracy.shape == (3, 9, 2) and res.cell_robust.shape == (3, 9, 2, 4)
    assert res.states == (1, 2, 3) and res.unrolls == tuple(range(1, 10))
    np.testing.assert_allclose(res.accuracy, jnp.mean(res.cell_robust, -1))
    np.testing.assert_array_equal(res.robust, jnp.all(res.cell_robust, axis=(0, 1, 2)))
    assert float(jnp.mean(res.robust)) <= float(jnp.min(res.accuracy))
    si, ki, li = np.unravel_index(int(jnp.argmin(res.accuracy)), res.accuracy.shape)
    assert res.strongest == (res.states[si], res.unrolls[ki], res.lams[li])
    assert float(jnp.min(res.accuracy)) < 1.0  # the attack works on this model
    # x_adv: inside the ball, and fooling predict exactly where the example is not robust.
    assert float(jnp.max(jnp.abs(res.x_adv - x))) <= 0.3 + 1e-12
    wrong = jnp.argmax(dyn.predict(res.x_adv), -1) != y
    np.testing.assert_array_equal(wrong, ~res.robust)
    # The same grid against a prediction that is never fooled: no success anywhere.
    never = Partial(_const, jnp.array([0.0, 9.0, 0.0]))
    y1 = jnp.ones((4,), jnp.int32)
    res = inter.unrolled_intermediate_grid(
        dyn, x, y1, key=key, eps=0.3, steps=2, unrolls=(1, 5), predict_fn=never
    )
    assert res.accuracy.shape == (3, 2, 2)
    assert bool(jnp.all(res.robust)) and float(jnp.min(res.accuracy)) == 1.0
    np.testing.assert_array_equal(res.x_adv, x)


def test_input_checks(x64):
    dyn, _ = _dyn()
    x, y = _x(), jnp.zeros((3,), jnp.int32)
    with pytest.raises(ValueError, match="state indices"):
        inter.unrolled_gradient(dyn, x, y, state=6)
    with pytest.raises(ValueError, match="unroll"):
        inter.unrolled_gradient(dyn, x, y, state=1, unroll=0)
    with pytest.raises(ValueError, match="lam"):
        inter.unrolled_gradient(dyn, x, y, state=1, lam=0.0)
    nopred = inter.Dynamics(**{**dyn.__dict__, "predict": None})
    with pytest.raises(ValueError, match="predict_fn"):
        inter.gradient_ensemble_pgd(nopred, x, y, key=jax.random.PRNGKey(0), eps=0.1)


def _tiny_deqnet():
    """A tiny DEQNet whose parameters are filled from NumPy (its JAX initialisers compile one
    program per shape: ~15 s on a busy CPU)."""

    def make():
        return DEQNet(
            in_shape=(12, 12, 1),
            num_classes=3,
            channels=(4, 8),
            expansion=2,
            num_groups=2,
            dropout=0.2,
            head_channels=(2, 4),
            final_channels=8,
            stem_strides=(2,),
            solver=DEQSolver(f_max_iter=4, f_tol=1e-3),
            rngs=nnx.Rngs(0),
        )

    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = re.findall(r"\['(\w+)'\]", jax.tree_util.keystr(path))[-1]
        if name in ("v", "kernel"):
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(size=leaf.shape).astype(leaf.dtype) / np.sqrt(fan_in)
        if name in ("g", "scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, leaf.dtype)
        raise AssertionError(f"unexpected DEQNet state leaf {jax.tree_util.keystr(path)}")

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


def test_deq_dynamics_integration():
    m = _tiny_deqnet()
    dyn = deq_dynamics(m)
    assert dyn.num_states == 4 and not m.deterministic  # the model itself is untouched
    assert dyn.predict.func is deq_classifier(m).logits_fn.func  # the real prediction
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 12, 12, 1))
    y = jnp.array([0, 1])
    zs = jax.jit(dyn.trajectory)(x)
    want = jax.jit(deq_classifier(m).trajectory_fn)(x)  # readout of each recorded iterate
    np.testing.assert_allclose(jax.vmap(dyn.readout)(zs), want, rtol=1e-5, atol=1e-5)
    r = inter.unrolled_intermediate_pgd(
        dyn, x, y, key=jax.random.PRNGKey(2), eps=8 / 255, state=2, unroll=2, steps=2
    )
    assert r.x_adv.shape == x.shape and float(jnp.max(jnp.abs(r.x_adv - x))) <= 8 / 255 + 1e-6
    wrong = jnp.argmax(jax.jit(dyn.predict)(r.x_adv), -1) != y
    np.testing.assert_array_equal(r.success, wrong)
    adj = inter.simultaneous_adjoint(dyn, x, y)
    assert adj.grads.shape == (4, *x.shape) and bool(jnp.all(jnp.isfinite(adj.grads)))
    flat = jnp.concatenate([a.reshape(4, 2, -1) for a in zs], axis=-1)
    np.testing.assert_allclose(adj.z, flat, rtol=1e-4, atol=1e-5)


def test_ep_dynamics_known_answer(x64):
    """EP-CNN free phase as Dynamics: its trajectory readout is ep.trajectory, and the unrolled
    gradient is jax.grad of one free-phase update of the detached z_i plus K damped updates."""
    import dataclasses as dc

    from eqrobust import energy, ep
    from eqrobust.energy import EnergyConfig

    e = EnergyConfig(in_shape=(6, 6, 1), num_classes=3, channels=(3,), paddings=(1,), fc=(4,))
    cfg = ep.EPConfig(energy=dc.replace(e, output="softmax"), t1=5, t2=3, beta=0.5)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), ep.init(jax.random.PRNGKey(0), cfg))
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 6, 6, 1)))
    y = jnp.array([0, 1, 2])
    dyn = ep.ep_dynamics(params, cfg)
    zs = dyn.trajectory(x)
    readouts = jax.vmap(dyn.readout)(zs)
    np.testing.assert_allclose(readouts, ep.trajectory(params, x, cfg), atol=1e-12)
    i, k, lam = 2, 3, 0.5

    def explicit(xa):
        z_i = jax.tree.map(lambda t: t[i - 1], zs)
        z = energy.step(params, xa, z_i, config=cfg.energy)
        for _ in range(k):
            zn = energy.step(params, xa, z, config=cfg.energy)
            z = jax.tree.map(lambda p, q: (1 - lam) * p + lam * q, z, zn)
        return jnp.sum(losses.cross_entropy(energy.readout(params, z, cfg.energy), y))

    got = inter.unrolled_gradient(dyn, x, y, state=i, unroll=k, lam=lam)
    want = jax.grad(explicit)(x)
    assert float(jnp.max(jnp.abs(want))) > 1e-6  # the input gradient is not trivially zero
    np.testing.assert_allclose(got, want, atol=1e-10)


def _unshared(fn):
    """The same function as a different object: the attacks then solve twice per step."""
    return Partial(fn.func, *fn.args)


def test_predict_trajectory_is_predict_and_trajectory_from_one_solve(x64):
    """`Dynamics.predict_trajectory` equals (predict, trajectory) for the dense Broyden model,
    a DEQNet and an EP-CNN; a custom predict or EP convergence stopping gets none."""
    from eqrobust import ep
    from eqrobust.energy import EnergyConfig

    dense, _ = _dyn()
    deq = deq_dynamics(_tiny_deqnet())
    e = EnergyConfig(in_shape=(6, 6, 1), num_classes=3, channels=(3,), paddings=(1,), fc=(4,))
    cfg = ep.EPConfig(energy=e, t1=5, t2=3, beta=0.5)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), ep.init(jax.random.PRNGKey(0), cfg))
    epd = ep.ep_dynamics(params, cfg)
    cases = [(dense, _x()), (deq, jax.random.uniform(jax.random.PRNGKey(1), (2, 12, 12, 1)))]
    cases.append((epd, jnp.asarray(np.random.default_rng(0).uniform(size=(3, 6, 6, 1)))))
    for dyn, x in cases:
        logits, zs = jax.jit(dyn.predict_trajectory)(x)
        np.testing.assert_allclose(logits, jax.jit(dyn.predict)(x), rtol=1e-5, atol=1e-6)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            zs,
            jax.jit(dyn.trajectory)(x),
        )
    assert ep.ep_dynamics(params, cfg, predict=epd.predict).predict_trajectory is None
    conv = dataclasses.replace(cfg, free_stop="converged", free_tol=1e-3)
    assert ep.ep_dynamics(params, conv).predict_trajectory is None
    w, u, r, c = _params()
    custom = inter.broyden_dynamics(
        Partial(_inject, u), Partial(_f, w), Partial(_readout, r, c), Partial(_init),
        num_states=5, predict=Partial(_const, jnp.array([5.0, 0.0, 0.0])),
    )  # fmt: skip
    assert custom.predict_trajectory is None


def test_shared_solve_gives_the_attacks_of_two_solves(x64):
    """The grid and the ensemble judging dyn.predict (one solve per step) equal the same attacks
    judging a copy of it (two solves); a joint with other states changes them, so it is used."""
    dyn, p = _dyn()
    x, y = _x(b=6), jnp.array([0, 1, 2, 0, 1, 2])
    kw = dict(key=jax.random.PRNGKey(3), eps=0.3, steps=4, step_size=0.1)
    grid_kw = dict(kw, unrolls=(1, 3), lams=(0.5, 1.0))
    shared = inter.unrolled_intermediate_grid(dyn, x, y, **grid_kw)
    two = inter.unrolled_intermediate_grid(dyn, x, y, predict_fn=_unshared(dyn.predict), **grid_kw)
    assert 0 < int(jnp.sum(~shared.cell_robust)) < shared.cell_robust.size  # not vacuous
    np.testing.assert_array_equal(shared.cell_robust, two.cell_robust)
    np.testing.assert_allclose(shared.x_adv, two.x_adv, atol=1e-12)
    ens = inter.gradient_ensemble_pgd(dyn, x, y, **kw)
    ens2 = inter.gradient_ensemble_pgd(dyn, x, y, predict_fn=_unshared(dyn.predict), **kw)
    np.testing.assert_array_equal(ens.success, ens2.success)
    np.testing.assert_allclose(ens.x_adv, ens2.x_adv, atol=1e-12)

    # Judged never fooled (every step taken), once with the true states, once with wild ones.
    never, y0 = jnp.array([5.0, 0.0, 0.0]), jnp.zeros_like(y)
    true_joint = Partial(lambda x: (_const(never, x), dyn.trajectory(x)))
    wild_joint = Partial(lambda x: (_const(never, x), _wild_states(p[1], x)))
    runs = [
        inter.gradient_ensemble_pgd(dataclasses.replace(dyn, predict_trajectory=j), x, y0, **kw)
        for j in (true_joint, wild_joint)
    ]
    assert all(bool(jnp.all(r.iterations == 4)) for r in runs)
    assert float(jnp.max(jnp.abs(runs[0].x_adv - runs[1].x_adv))) > 1e-3
