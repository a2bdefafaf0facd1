"""Leading eigenvalues of the linearised fixed-point map at s* (ep-distillation eqs. 3-7).

For a fixed-point map s <- f(s, x) (the EP free phase `sigma(dPhi/ds)`, or a DEQ cell) the
linearisation at the fixed point s* is J = df/ds (s*, x); the paper's argument (eqs. 3-7) is that
perturbations decay along eigenvectors with |lambda| < 1 and survive only along |lambda| = 1. We
estimate the leading eigenvalues of J per example with k steps of Arnoldi iteration (full
re-orthogonalisation), each step one Jacobian-vector product (`jax.linearize`/`jax.jvp`, or the
transposed product with `jax.vjp`, which has the same eigenvalues); no dense Jacobian is formed.
The Ritz values (eigenvalues of the small k x k Hessenberg matrix, computed on the host) converge to
the outermost eigenvalues first; with k = state dimension they are all eigenvalues.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from eqrobust import compile_options, ep

Array = jax.Array
# f(z, x) -> z: batched pytree states z (leading batch axis), x [B, ...].
FixedPointMap = Callable[[Any, Array], Any]

MODES = ("jvp", "vjp")


def arnoldi(matvec: Callable[[Array], Array], v0: Array, k: int) -> Array:
    """k steps of Arnoldi on a linear map of R^n.

    Args:
        matvec: v [n] -> A v [n] (linear).
        v0: [n] start vector (nonzero).
        k: Krylov dimension (k <= n).

    Returns:
        H [k, k], the upper Hessenberg projection Q^T A Q; on breakdown (an invariant subspace
        found) the remaining columns are zero (their Ritz values are 0).
    """
    n = v0.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"Krylov dimension k={k} must be in 1..{n} (the state dimension)")
    dtype = v0.dtype
    q = jnp.zeros((k + 1, n), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    h = jnp.zeros((k + 1, k), dtype)
    rows = jnp.arange(k + 1)
    eps = jnp.finfo(dtype).eps

    def body(j: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        q, h = carry
        w = matvec(q[j])
        scale = jnp.linalg.norm(w)
        mask = (rows <= j).astype(dtype)
        coef = jnp.zeros((k + 1,), dtype)
        for _ in range(2):  # classical Gram-Schmidt, twice (re-orthogonalisation)
            c = (q @ w) * mask
            w = w - c @ q
            coef = coef + c
        beta = jnp.linalg.norm(w)
        ok = beta > 100 * eps * jnp.maximum(scale, 1e-30)
        coef = coef.at[j + 1].set(jnp.where(ok, beta, 0.0))
        q = q.at[j + 1].set(jnp.where(ok, w / jnp.where(ok, beta, 1.0), 0.0))
        return q, h.at[:, j].set(coef)

    _, h = jax.lax.fori_loop(0, k, body, (q, h))
    return h[:k]


def _single(f: FixedPointMap) -> Callable[[Any, Array], Any]:
    """f on one example (no batch axis) by adding and removing a batch axis of 1."""

    def g(z: Any, x: Array) -> Any:
        out = f(jax.tree.map(lambda a: a[None], z), x[None])
        return jax.tree.map(lambda a: a[0], out)

    return g


def hessenberg_batch(
    f: FixedPointMap, z_star: Any, x: Array, *, k: int, key: Array, mode: str = "jvp"
) -> Array:
    """Per-example Arnoldi projections of J = df/dz at (z*, x), vmapped over the batch.

    Args:
        f: batched fixed-point map.
        z_star: batched fixed point (pytree, leading axis B).
        x: [B, ...] inputs.
        k: Krylov dimension.
        key: PRNG key for the random start vectors.
        mode: "jvp" (J v) or "vjp" (J^T v; same eigenvalues).

    Returns:
        H [B, k, k].
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    g = _single(f)
    b = x.shape[0]

    def one(z: Any, xi: Array, ki: Array) -> Array:
        zf, unravel = ravel_pytree(z)
        flat = lambda v: ravel_pytree(g(unravel(v), xi))[0]  # noqa: E731
        if mode == "jvp":
            _, matvec = jax.linearize(flat, zf)
        else:
            _, pullback = jax.vjp(flat, zf)
            matvec = lambda v: pullback(v)[0]  # noqa: E731
        v0 = jax.random.normal(ki, zf.shape, zf.dtype)
        return arnoldi(matvec, v0, k)

    return jax.vmap(one)(z_star, x, jax.random.split(key, b))


def ritz_values(h: np.ndarray | Array, top: int | None = None) -> np.ndarray:
    """Eigenvalues of each H [B, k, k] (host, NumPy), sorted by decreasing magnitude: [B, top]."""
    eig = np.linalg.eigvals(np.asarray(h, np.float64))
    order = np.argsort(-np.abs(eig), axis=-1)
    eig = np.take_along_axis(eig, order, axis=-1)
    return eig if top is None else eig[:, :top]


def leading_eigenvalues(
    f: FixedPointMap,
    z_star: Any,
    x: Array,
    *,
    k: int = 20,
    top: int | None = None,
    key: Array | None = None,
    mode: str = "jvp",
) -> np.ndarray:
    """Leading eigenvalues (complex, by decreasing |lambda|) of df/dz at each example's z*.

    Args:
        f, z_star, x: as in `hessenberg_batch`.
        k: Arnoldi steps (Jacobian-vector products per example).
        top: how many to return (default k).
        key: PRNG key (default PRNGKey(0)).
        mode: "jvp" or "vjp".

    Returns:
        [B, top] complex128; column 0's magnitude is the spectral-radius estimate.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    h = compile_options.jit(hessenberg_batch, static_argnums=0, static_argnames=("k", "mode"))(
        f, z_star, x, k=k, key=key, mode=mode
    )
    return ritz_values(h, top)


def ep_map(params: Any, config: ep.EPConfig) -> FixedPointMap:
    """The EP free-phase map f(s, x) = sigma(dPhi/ds (x, s)) of a trained EP-CNN.

    The max pool is switched to "reduce_window" (the same function and first-maximum gradient as
    the default "reshape" formulation, whose custom VJP cannot be pushed forward by `jvp`), and
    an "xla_flip" conv (custom VJP too) to "xla".
    """
    conv = "xla" if config.energy.conv == "xla_flip" else config.energy.conv
    cfg = dataclasses.replace(config.energy, pool="reduce_window", conv=conv)
    return lambda s, x: ep.energy.step(params, x, s, config=cfg)


class SpectrumComparison(NamedTuple):
    """Leading eigenvalues at the fixed points of clean and adversarial inputs."""

    clean: np.ndarray  # [N, top] complex, by decreasing magnitude
    adversarial: np.ndarray  # [N, top]
    summary: dict[str, float]  # radius mean/median/quantiles, fraction with radius >= 1 - tol


def _summary(radius: np.ndarray, prefix: str, tol: float) -> dict[str, float]:
    q = np.quantile(radius, [0.1, 0.5, 0.9])
    return {
        f"{prefix}_radius_mean": float(np.mean(radius)),
        f"{prefix}_radius_q10": float(q[0]),
        f"{prefix}_radius_median": float(q[1]),
        f"{prefix}_radius_q90": float(q[2]),
        f"{prefix}_frac_unit": float(np.mean(radius >= 1.0 - tol)),
    }


def spectrum_clean_vs_adversarial(
    f: FixedPointMap,
    fixed_point: Callable[[Array], Any],
    x: Array,
    x_adv: Array,
    *,
    k: int = 20,
    top: int = 5,
    batch_size: int = 64,
    key: Array | None = None,
    unit_tol: float = 1e-3,
    mode: str = "jvp",
) -> SpectrumComparison:
    """The distribution of leading eigenvalues at s*(x) vs s*(x_adv).

    Args:
        f: batched fixed-point map f(z, x).
        fixed_point: x [B, ...] -> z* (e.g. `lambda x: ep.free_phase(params, x, cfg).z`).
        x, x_adv: [N, H, W, C] clean and adversarial images in [0, 1].
        k: Arnoldi steps; top: eigenvalues kept per example.
        batch_size: examples per compiled call.
        key: PRNG key for the start vectors (same per example for x and x_adv).
        unit_tol: |lambda| >= 1 - unit_tol counts as a unit eigenvalue in the summary.
        mode: "jvp" (J v) or "vjp" (J^T v, same eigenvalues; for maps that are not
            forward-mode differentiable, e.g. with the "xla_flip" conv).

    Returns:
        `SpectrumComparison`.
    """
    if x.shape != x_adv.shape:
        raise ValueError(f"x {x.shape} and x_adv {x_adv.shape} must have the same shape")
    key = jax.random.PRNGKey(0) if key is None else key
    fp = compile_options.jit(fixed_point)
    out = []
    for xs in (x, x_adv):
        eigs = []
        for i in range(0, xs.shape[0], batch_size):
            xb = jnp.asarray(xs[i : i + batch_size])
            kb = jax.random.fold_in(key, i)
            eigs.append(leading_eigenvalues(f, fp(xb), xb, k=k, top=top, key=kb, mode=mode))
        out.append(np.concatenate(eigs))
    summary = _summary(np.abs(out[0][:, 0]), "clean", unit_tol)
    summary.update(_summary(np.abs(out[1][:, 0]), "adversarial", unit_tol))
    return SpectrumComparison(out[0], out[1], summary)
