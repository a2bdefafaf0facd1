"""Tests for the fixed-point engine (eqrobust.solvers): float64 maps with known fixed points."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from eqrobust import solvers

METHODS = ("picard", "anderson", "broyden")


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


# ----------------------------------------------------------------------------- test maps


def linear_problem(batch=4, dim=8, top=0.95, seed=0):
    """z = s_b A z + W x_b with symmetric A (eigenvalues in [-0.5, top]); z* known exactly.

    Returns f, args = (A, W, x [B, 3], s [B]) and z* [B, dim] for s = 1.
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    eig = np.linspace(-0.5, top, dim)
    a = (q * eig) @ q.T
    w = rng.normal(size=(dim, 3))
    x = rng.normal(size=(batch, 3))
    args = (jnp.asarray(a), jnp.asarray(w), jnp.asarray(x), jnp.ones((batch,)))
    zstar = np.linalg.solve(np.eye(dim) - a, w @ x.T).T
    return linear_map, args, zstar


def linear_map(z, args):
    a, w, x, s = args
    return s[:, None] * (z @ a.T) + x @ w.T


def conv_map(z, args):
    """A small nonlinear conv fixed point on a two-leaf pytree state.

    z: {"h": [B, 6, 6, 2], "y": [B, 3]}; args = (k [3, 3, 2, 2], m [2, 3], x [B, 6, 6, 2]).
    Contractive: tanh is 1-Lipschitz and sum|k| <= 0.9, ||m|| small.
    """
    k, m, x = args
    conv = jax.lax.conv_general_dilated(
        z["h"], k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jnp.tanh(conv + x)
    y = jnp.tanh(0.3 * z["y"] + jnp.mean(h, axis=(1, 2)) @ m)
    return {"h": h, "y": y}


def conv_problem(batch=3, seed=1, gain=0.98):
    """Kernel: mostly a per-channel identity tap plus a blur and a small random part, so that
    sum|k| <= gain < 1 (a contraction) while smooth modes contract slowly (Picard ~50 steps)."""
    rng = np.random.default_rng(seed)
    k = np.zeros((3, 3, 2, 2))
    k[1, 1] = 0.7 * np.eye(2)
    k += 0.3 / 18
    r = rng.normal(size=(3, 3, 2, 2))
    k = gain * (0.9 * k + 0.1 * r / np.abs(r).sum(axis=(0, 1, 2)).max())
    m = 0.5 * rng.normal(size=(2, 3))
    x = 0.3 * rng.normal(size=(batch, 6, 6, 2))
    args = (jnp.asarray(k), jnp.asarray(m), jnp.asarray(x))
    z0 = {"h": jnp.zeros((batch, 6, 6, 2)), "y": jnp.zeros((batch, 3))}
    return conv_map, z0, args


def reference_fixed_point(f, z0, args, n=600):
    """Plain iteration (not the engine) far past convergence."""
    return jax.jit(lambda z: jax.lax.fori_loop(0, n, lambda _, z: f(z, args), z))(z0)


def tree_max_abs_diff(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def tree_assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- Picard


@pytest.mark.parametrize("problem", ["linear", "conv"])
def test_all_methods_reach_tol_and_accelerate(problem):
    if problem == "linear":
        f, args, zstar = linear_problem()
        z0 = jnp.zeros_like(zstar)
    else:
        f, z0, args = conv_problem()
        zstar = reference_fixed_point(f, z0, args)
    tol, steps = 1e-8, {}
    for method in METHODS:
        sol = solvers.solve(
            f, z0, args, method=method, max_steps=1000, tol=tol, record=3, grad="none"
        )
        assert bool(sol.converged.all()), (method, sol.residual)
        assert float(sol.residual.max()) < tol
        # The reported residual is that of the returned z.
        np.testing.assert_allclose(
            sol.residual, solvers._rel_residual(f(sol.z, args), sol.z), rtol=1e-6
        )
        # ||z - z*|| <= residual * ||f(z)|| / (1 - rate): relative error ~ tol / (1 - 0.95).
        scale = max(float(jnp.max(jnp.abs(t))) for t in jax.tree.leaves(zstar))
        assert tree_max_abs_diff(sol.z, zstar) < 1e-6 * scale, method
        # Every method's first step is the plain step f(z0) (pytree trajectory layout).
        tree_assert_equal(jax.tree.map(lambda t: t[0], sol.trajectory.z), f(z0, args))
        assert sol.steps.dtype == jnp.int32
        steps[method] = int(sol.steps.max())
    assert steps["anderson"] < 0.5 * steps["picard"], steps
    assert steps["broyden"] < 0.5 * steps["picard"], steps
    if problem == "conv":  # limited memory: Broyden restarts from B = -I every 4 steps
        sol = solvers.solve(f, z0, args, method="broyden", tol=tol, grad="none", memory=4)
        assert bool(sol.converged.all()) and int(sol.steps.max()) > 4
        assert tree_max_abs_diff(sol.z, zstar) < 1e-6


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_picard_record_matches_python_loop(damping):
    f, args, _ = linear_problem()
    z0 = jnp.asarray(np.random.default_rng(3).normal(size=(4, 8)))
    n = 12
    sol = solvers.solve(
        f, z0, args, max_steps=n, damping=damping, record=n, stop="never", grad="none"
    )
    fj = jax.jit(f)
    z, iterates = z0, []
    for _ in range(n):
        z = (1 - damping) * fj(z, args) + damping * z if damping else fj(z, args)
        iterates.append(z)
    iterates = np.stack(iterates)
    assert sol.trajectory.z.shape == (n, 4, 8) and sol.trajectory.residual.shape == (n, 4)
    if damping == 0.0:
        np.testing.assert_array_equal(sol.trajectory.z, iterates)  # the EP free phase, bitwise
    else:
        np.testing.assert_allclose(sol.trajectory.z, iterates, rtol=1e-14, atol=1e-14)
    np.testing.assert_array_equal(sol.z, sol.trajectory.z[-1])
    np.testing.assert_array_equal(sol.residual, sol.trajectory.residual[-1])


def test_stop_never_runs_exactly_max_steps():
    f, args, zstar = linear_problem()
    t = 250
    sol = solvers.solve(f, jnp.zeros_like(zstar), args, max_steps=t, stop="never", grad="none")
    np.testing.assert_array_equal(sol.steps, t)
    z = jax.jit(lambda z: jax.lax.fori_loop(0, t, lambda _, z: f(z, args), z))(
        jnp.zeros_like(zstar)
    )
    np.testing.assert_allclose(sol.z, z, rtol=1e-13, atol=1e-13)
    # With stopping enabled the same problem takes fewer steps.
    early = solvers.solve(f, jnp.zeros_like(zstar), args, max_steps=t, tol=1e-4, grad="none")
    assert int(early.steps.max()) < t


@pytest.mark.parametrize("method", METHODS)
def test_per_example_masking_freezes_converged_examples(method):
    f, args, zstar = linear_problem(batch=4)
    a, w, x, _ = args
    s = jnp.array([0.1, 1.0, 0.2, 1.0])  # easy, hard, easy, hard
    n, tol = 500, 1e-8
    sol = solvers.solve(
        f,
        jnp.zeros_like(zstar),
        (a, w, x, s),
        method=method,
        max_steps=n,
        tol=tol,
        record=n,
        grad="none",
    )
    assert bool(sol.converged.all())
    steps = np.asarray(sol.steps)
    assert steps[0] < steps[1] and steps[2] < steps[3], steps
    traj = np.asarray(sol.trajectory.z)
    for b in range(4):
        k = steps[b]
        # Bitwise frozen from the step it converged on, and that iterate is what is returned.
        np.testing.assert_array_equal(
            traj[k - 1 :, b], np.broadcast_to(traj[k - 1, b], traj[k - 1 :, b].shape)
        )
        np.testing.assert_array_equal(np.asarray(sol.z)[b], traj[k - 1, b])
        assert sol.trajectory.residual[k - 1, b] < tol
        if k > 1:
            assert sol.trajectory.residual[k - 2, b] >= tol
    # Recording does not change results.
    plain = solvers.solve(
        f, jnp.zeros_like(zstar), (a, w, x, s), method=method, max_steps=n, tol=tol, grad="none"
    )
    assert plain.trajectory is None
    tree_assert_equal((plain.z, plain.steps, plain.residual), (sol.z, sol.steps, sol.residual))
    # Easy examples reach the same fixed point as when solved alone.
    alone = solvers.solve(
        f,
        jnp.zeros((1, 8)),
        (a, w, x[:1], s[:1]),
        method=method,
        max_steps=n,
        tol=tol,
        grad="none",
    )
    assert int(alone.steps[0]) == steps[0]
    np.testing.assert_allclose(alone.z[0], sol.z[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["anderson", "broyden"])
def test_lowest_residual_iterate_per_example_and_batch(method):
    """Broyden/Anderson residuals are not monotone: the returned iterate is the lowest one."""
    f, args, zstar = linear_problem(batch=4, dim=16, top=0.99, seed=2)
    z0 = jnp.zeros_like(zstar)
    n = 10
    kw = dict(method=method, max_steps=n, tol=1e-12, record=n, stop="never", grad="none")
    ex = solvers.solve(f, z0, args, lowest="example", **kw)
    bat = solvers.solve(f, z0, args, lowest="batch", **kw)
    traj_z, traj_r = np.asarray(ex.trajectory.z), np.asarray(ex.trajectory.residual)
    np.testing.assert_array_equal(traj_z, bat.trajectory.z)  # same iterates, different choice
    best = traj_r.argmin(axis=0)  # z0 = 0 has residual 1, never the lowest here
    np.testing.assert_array_equal(ex.residual, traj_r.min(axis=0))
    np.testing.assert_array_equal(ex.z, traj_z[best, np.arange(4)])
    np.testing.assert_array_equal(ex.converged, False)
    # Batch-global choice (DEQ reference): one step for all, by ||F(Z)-Z|| / ||F(Z)|| over B.
    glob = [
        float(
            jnp.linalg.norm(f(jnp.asarray(zk), args) - zk)
            / jnp.linalg.norm(f(jnp.asarray(zk), args))
        )
        for zk in traj_z
    ]
    k = int(np.argmin(glob))
    np.testing.assert_array_equal(bat.z, traj_z[k])
    np.testing.assert_array_equal(bat.residual, traj_r[k])
    assert np.all(np.asarray(bat.residual) >= np.asarray(ex.residual))
    if method == "broyden":  # this problem makes both choices non-trivial for Broyden
        assert np.any(best != n - 1) and np.any(best != k), (best, k)


def test_check_converged_reports_unconverged(caplog):
    f, args, zstar = linear_problem()
    a, w, x, _ = args
    s = jnp.array([0.1, 1.0, 0.1, 0.1])
    sol = solvers.solve(
        f, jnp.zeros_like(zstar), (a, w, x, s), max_steps=20, tol=1e-10, grad="none"
    )
    np.testing.assert_array_equal(sol.converged, [True, False, True, True])
    assert not solvers.check_converged(sol)
    with pytest.raises(solvers.ConvergenceError, match=r"25\.0% of 4 examples unconverged"):
        solvers.check_converged(sol, raise_error=True)
    good = solvers.solve(f, jnp.zeros_like(zstar), args, max_steps=2000, tol=1e-6, grad="none")
    assert solvers.check_converged(good, raise_error=True)


# ----------------------------------------------------------------------------- gradients


def _loss(problem, method, grad, **kw):
    """A scalar loss of the fixed point as a function of args (jitted), and those args."""
    if problem == "conv":
        f, z0, args = conv_problem()
        scale = 1.0
    else:
        # Milder conditioning (top eigenvalue 0.8) and a smooth loss, for finite differences.
        f, args, zstar = linear_problem(batch=3, top=0.8)
        z0 = jnp.zeros_like(zstar)
        scale = 0.1

    def loss(args):
        z = solvers.solve(f, z0, args, method=method, grad=grad, **kw).z
        return sum(jnp.sum(jnp.sin(scale * t)) for t in jax.tree.leaves(z))

    return jax.jit(loss), args  # solve retraces its loop on every eager call; jit once


# Picard on the conv pytree map; Anderson/Broyden on the linear map (cheaper to compile).
GRAD_CASES = [("conv", "picard"), ("linear", "anderson"), ("linear", "broyden")]


@pytest.mark.parametrize("problem,method", GRAD_CASES)
def test_implicit_gradient_matches_finite_differences(problem, method):
    loss, args = _loss(problem, method, "implicit", max_steps=1000, tol=1e-12)
    check_grads(loss, (args,), order=1, modes=["rev"], atol=1e-5, rtol=1e-5, eps=1e-5)
    if problem == "linear":  # closed form z* = (I - s A)^-1 W x: the gradient is exact to ~1e-10

        def exact(args):
            a, w, x, s = args
            solve = lambda xb, sb: jnp.linalg.solve(jnp.eye(a.shape[0]) - sb * a, w @ xb)
            return jnp.sum(jnp.sin(0.1 * jax.vmap(solve)(x, s)))

        for g, ge in zip(jax.grad(loss)(args), jax.grad(exact)(args), strict=True):
            assert float(jnp.linalg.norm(g - ge) / jnp.linalg.norm(ge)) < 1e-8


@pytest.mark.parametrize("problem,method", GRAD_CASES)
def test_implicit_matches_unrolled_on_converged_map(problem, method):
    kw = dict(method=method, max_steps=1000, tol=1e-12)
    loss_i, args = _loss(problem, grad="implicit", **kw)
    loss_u, _ = _loss(problem, grad="unrolled", **kw)
    gi, gu = jax.grad(loss_i)(args), jax.grad(loss_u)(args)
    for a, b in zip(jax.tree.leaves(gi), jax.tree.leaves(gu), strict=True):
        rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
        assert rel < 1e-4, rel


@pytest.mark.parametrize("grad", ["implicit", "unrolled"])
def test_gradient_reaches_values_closed_over_by_f(grad):
    f, args, zstar = linear_problem(batch=3, top=0.8)

    def loss(c):
        fc = lambda z, a: c * f(z, a)  # c is closed over, not in args
        z = solvers.solve(fc, jnp.zeros_like(zstar), args, grad=grad, max_steps=1000, tol=1e-12).z
        return jnp.sum(jnp.sin(0.1 * z))

    def exact(c):  # z* = (I - c A)^-1 c W x  (s = 1)
        a, w, x, _ = args
        return jnp.sum(jnp.sin(0.1 * jnp.linalg.solve(jnp.eye(8) - c * a, c * w @ x.T).T))

    np.testing.assert_allclose(jax.jit(jax.grad(loss))(0.9), jax.grad(exact)(0.9), rtol=1e-8)


def test_phantom_approaches_implicit():
    loss, args = _loss("conv", "picard", "implicit", max_steps=1000, tol=1e-12)
    gi = jax.grad(loss)(args)
    errs = []
    for k in (1, 8, 64):
        loss, _ = _loss("conv", "picard", "phantom", max_steps=1000, tol=1e-12, grad_steps=k)
        gp = jax.grad(loss)(args)
        errs.append(
            max(
                float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
                for a, b in zip(jax.tree.leaves(gi), jax.tree.leaves(gp), strict=True)
            )
        )
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:], strict=False)), errs
    assert errs[-1] < 1e-3, errs


def test_phantom_forward_value_is_fixed_point():
    f, z0, args = conv_problem()
    a = solvers.solve(f, z0, args, grad="phantom", tol=1e-8, max_steps=100)
    b = solvers.solve(f, z0, args, grad="none", tol=1e-8, max_steps=100)
    tree_assert_equal(a.z, b.z)


@pytest.mark.parametrize("grad", ["implicit", "unrolled", "phantom"])
def test_jit_and_vmap(grad):
    """vmap over examples (each solved with B=1) agrees with the batched solve, values and grads."""
    f, z0, (k, m, x) = conv_problem()
    z1 = jax.tree.map(lambda t: t[:1], z0)
    kw = dict(max_steps=200, tol=1e-10, grad=grad)

    def readout(z):
        return jnp.sum(jnp.tanh(z["h"])) + jnp.sum(z["y"])

    def one(xb):  # xb: [6, 6, 2]
        z = solvers.solve(f, z1, (k, m, xb[None]), **kw).z
        return readout(z), z

    def batched(xx):  # xx: [B, 6, 6, 2]
        z = solvers.solve(f, z0, (k, m, xx), **kw).z
        return readout(z), z

    (_, vz), gx = jax.jit(jax.vmap(jax.value_and_grad(one, has_aux=True)))(x)
    (_, bz), gb = jax.jit(jax.value_and_grad(batched, has_aux=True))(x)
    assert tree_max_abs_diff(jax.tree.map(lambda t: t[:, 0], vz), bz) < 1e-9
    # Examples are independent, so the batched gradient holds the per-example gradients.
    np.testing.assert_allclose(gx, gb, rtol=1e-6, atol=1e-9)


def test_invalid_inputs_raise():
    f, args, zstar = linear_problem()
    z0 = jnp.zeros_like(zstar)
    with pytest.raises(ValueError, match="unknown method"):
        solvers.solve(f, z0, args, method="newton")
    with pytest.raises(ValueError, match="unknown grad"):
        solvers.solve(f, z0, args, grad="adjoint")
    with pytest.raises(ValueError, match="unknown option"):
        solvers.solve(f, z0, args, method="picard", memory=3)
    with pytest.raises(ValueError, match="damping"):
        solvers.solve(f, z0, args, method="anderson", damping=0.5)
    with pytest.raises(ValueError, match="batch size"):
        solvers.solve(f, {"a": z0, "b": jnp.zeros((3, 2))}, args)
    with pytest.raises(ValueError, match="floating"):
        solvers.solve(f, jnp.zeros((4, 8), jnp.int32), args)


# ----------------------------------------------------------------------------- status


def _blowup_map(z, args):
    """z <- s z + 1 (+ 0 * sqrt(c - z)): converges to 1 / (1 - s) for s < 1; for s = 1 there
    is no fixed point and the iterates grow past c, where f(z) becomes NaN."""
    s, c = args
    return s[:, None] * z + 1.0 + 0.0 * jnp.sqrt(c[:, None] - z)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stop", ["converged", "never"])
def test_status_success_max_steps_and_nonfinite(method, stop):
    # Converges; becomes NaN after z passes 3; no fixed point but finite for 60 steps.
    s = (jnp.array([0.5, 1.0, 1.0]), jnp.array([3.0, 3.0, 1e9]))
    z0 = jnp.zeros((3, 4))
    sol = jax.jit(
        lambda z0, s: solvers.solve(
            _blowup_map, z0, s, method=method, max_steps=60, tol=1e-8, stop=stop, grad="none"
        )
    )(z0, s)
    S = solvers.Status
    assert sol.status.dtype == jnp.int8
    np.testing.assert_array_equal(sol.status, [S.SUCCESS, S.NONFINITE, S.MAX_STEPS])
    np.testing.assert_array_equal(sol.converged, [True, False, False])
    # The failed example is frozen at its last finite iterate (<= 3, where f is still finite).
    assert bool(jnp.all(jnp.isfinite(sol.z))) and bool(jnp.all(sol.z[1] <= 3.0))
    assert bool(jnp.all(jnp.isfinite(sol.residual)))
    assert int(sol.steps[1]) < 60
    with pytest.raises(solvers.ConvergenceError, match="MAX_STEPS: 1, NONFINITE: 1"):
        solvers.check_converged(sol, raise_error=True)


def test_nonfinite_start_is_never_converged():
    z0 = jnp.zeros((2, 3)).at[1, 0].set(jnp.nan)
    args = (jnp.array([0.5, 0.5]), jnp.array([3.0, 3.0]))
    sol = solvers.solve(_blowup_map, z0, args, tol=1e-6, grad="none")
    np.testing.assert_array_equal(sol.status, [solvers.Status.SUCCESS, solvers.Status.NONFINITE])
    assert int(sol.steps[1]) == 0 and not bool(sol.converged[1])


# ----------------------------------------------------------------------------- backward report


def _implicit_grad(top, **kw):
    f, (a, w, x, s), _ = linear_problem(batch=2, dim=4, top=top)

    def loss(x):
        z = solvers.solve(f, jnp.zeros((2, 4)), (a, w, x, s), max_steps=30, grad="implicit", **kw)
        return jnp.sum(z.z)

    return jax.jit(jax.grad(loss)), x


def test_backward_solve_reports_failure(caplog):
    g, x = _implicit_grad(0.5)  # contractive: the backward solve converges silently
    with caplog.at_level("WARNING"):
        jax.block_until_ready(g(x))
    assert "backward linear solve" not in caplog.text
    # Eigenvalue 1.5: the backward fixed point u = g + A^T u diverges under Picard.
    bad = dict(backward_max_steps=3, backward_method="picard")
    g, x = _implicit_grad(1.5, **bad)
    with caplog.at_level("WARNING"):
        jax.block_until_ready(g(x))
    assert "backward linear solve (picard) did not reach tol" in caplog.text
    assert "after 3 of 3 steps" in caplog.text
    g, x = _implicit_grad(1.5, backward_throw=True, **bad)
    with pytest.raises(Exception, match="backward linear solve"):
        jax.block_until_ready(g(x))
    # Under vmap too (the cond becomes a select; the callback checks the flag itself).
    f, (a, w, _, s), _ = linear_problem(batch=2, dim=4, top=1.5)

    def one(xb):
        z0 = jnp.zeros((1, 4))
        sol = solvers.solve(
            f, z0, (a, w, xb[None], s[:1]), max_steps=30, backward_throw=True, **bad
        )
        return jnp.sum(sol.z)

    with pytest.raises(Exception, match="backward linear solve"):
        jax.block_until_ready(jax.jit(jax.vmap(jax.grad(one)))(x))


# ----------------------------------------------------------------------------- remat


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_remat_gives_the_same_unrolled_gradient(method):
    f, z0, args = conv_problem()

    def loss(args, remat):
        sol = solvers.solve(
            f, z0, args, method=method, max_steps=25, tol=1e-10, grad="unrolled", remat=remat
        )
        return sum(jnp.sum(jnp.sin(t)) for t in jax.tree.leaves(sol.z))

    g0 = jax.jit(jax.grad(lambda a: loss(a, False)))(args)
    g1 = jax.jit(jax.grad(lambda a: loss(a, True)))(args)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="unknown option"):
        solvers.solve(f, z0, args, grad="implicit", remat=True)


# ----------------------------------------------------------------------------- continuation


@pytest.mark.parametrize("method", METHODS)
def test_continued_solve_matches_one_long_solve(method):
    f, args, zstar = linear_problem(batch=3, dim=6)
    z0 = jnp.zeros_like(zstar)
    kw = dict(method=method, tol=1e-30, stop="never", lowest="last", grad="none")
    if method == "broyden":
        kw["memory"] = 8  # >= the 8 total steps: no restart, as in the DEQ reference
    full = solvers.solve(f, z0, args, max_steps=8, record=8, **kw)
    run = jax.jit(
        lambda st: solvers.solve(
            f, z0, args, max_steps=2, record=2, init_state=st, return_state=True, **kw
        )
    )
    first = solvers.solve(f, z0, args, max_steps=2, record=2, return_state=True, **kw)
    assert first.state is not None and full.state is None
    parts, st = [first.trajectory.z], first.state
    for _ in range(3):
        sol = run(st)
        parts.append(sol.trajectory.z)
        st = sol.state
    assert int(st.step) == 8
    np.testing.assert_allclose(jnp.concatenate(parts), full.trajectory.z, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(sol.z, full.z, rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(sol.steps, [2, 2, 2])
    if method != "picard":
        with pytest.raises(ValueError, match="init_state does not fit"):
            solvers.solve(f, z0, args, max_steps=2, init_state=st, **{**kw, "memory": 3})
    with pytest.raises(ValueError, match="init_state must be"):
        solvers.solve(f, z0, args, max_steps=2, init_state=(1, 2), **kw)
