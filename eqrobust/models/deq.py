"""Multiscale deep equilibrium model (MDEQ, the DEQ robustness papers' DEQ-Large) on the engine."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from eqrobust import ops, solvers
from eqrobust.classifier import Classifier, Dynamics, GradientPath
from eqrobust.models.registry import register_model

CONV_IMPLS = ops.CONV_IMPLS


@dataclasses.dataclass(frozen=True)
class DEQSolver:
    """Forward/backward solver settings (torchdeq's names).

    Attributes:
        f_solver: forward solver of the engine ("broyden", "anderson", "picard").
        f_max_iter: forward iterations N (reference 8).
        f_tol: relative-residual stop (reference 1e-3).
        b_solver: backward solver of the implicit gradient (exact mode).
        b_max_iter: backward iterations (reference 7).
        b_tol: backward tolerance (None: f_tol).
        ift: True = exact (implicit) gradient, value f(z*); False = phantom: value and gradient of
            f(z*) followed by `grad` damped steps.
        grad: damped unroll steps after f(z*) in phantom mode (reference 5).
        tau: damping of the unroll, z <- (1 - tau) z + tau f(z) (reference 0.5).
        lowest: "example" (torchdeq) or "batch" (locuslab reference) lowest-residual iterate.
        num_layers: depth of the weight-tied unrolled net used in pretraining (reference 8).
    """

    f_solver: str = "broyden"
    f_max_iter: int = 8
    f_tol: float = 1e-3
    b_solver: str = "broyden"
    b_max_iter: int = 7
    b_tol: float | None = None
    ift: bool = False
    grad: int = 5
    tau: float = 0.5
    lowest: str = "example"
    num_layers: int = 8

    def gradient_path(self, ift: bool | None = None) -> GradientPath:
        """The engine's gradient-path declaration for this mode."""
        ift = self.ift if ift is None else ift
        return GradientPath("implicit") if ift else GradientPath("phantom", self.grad)


class DEQOutput(NamedTuple):
    """What `DEQNet.equilibrium` returns.

    Attributes:
        logits: [B, K] readout of the final state z.
        z: list of branch states [B, H_i, W_i, C_i]: the final state (after the unroll).
        z_star: the solver's state (lowest residual among the iterates it considered).
        residual: [B] relative residual ||f(z*) - z*|| / ||f(z*)|| of z_star.
        steps: [B] solver steps behind z_star (the pretraining net: its depth).
        trajectory: `solvers.Trajectory` of z_1..z_N (leaves [N, B, ...]) when recorded.
        unrolled: list of [grad + 1, B, ...] states f(z*), then each damped step (record only).
        final_residual: [B] relative residual of z (when requested), else None.
        jac_loss: scalar Hutchinson estimate of ||J_f(z*)||_F^2 / dim (when requested), else None.
    """

    logits: jax.Array
    z: list
    z_star: list
    residual: jax.Array
    steps: jax.Array
    trajectory: solvers.Trajectory | None
    unrolled: list | None
    final_residual: jax.Array | None
    jac_loss: jax.Array | None


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1, impl: str = "xla") -> jax.Array:
    """NHWC conv with 'same' padding k // 2 (PyTorch's padding=k//2); w: [k, k, Cin, Cout].

    impl: "xla" (lax.conv) or a formulation of `ops.conv` ("patches", "xla_flip", "auto"),
    used for the stride-1 k > 1 convs (the rest are lax.conv or a matmul)."""
    k = w.shape[0]
    if stride == 1 and impl != "xla" and k > 1:
        return ops.conv(x, w, k // 2, impl)
    if k == 1 and stride == 1:
        return x @ w[0, 0]
    return lax.conv_general_dilated(
        x, w, (stride, stride), [(k // 2, k // 2)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def group_norm(
    x: jax.Array,
    groups: int,
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
    eps: float = 1e-5,
) -> jax.Array:
    """GroupNorm per example (PyTorch semantics); x: [B, H, W, C] with C divisible by groups.

    Statistics reduce the spatial axis first ([B, HW, C] -> [B, C], contiguous), then the
    channels of a group: 3-4x faster on XLA:CPU than one reduction over (H, W, C/G) of a
    5-d reshape (benchmarks/deq.py, BUILD_NOTES "DEQ models"); still two passes (centred
    variance), not E[x^2] - E[x]^2.
    """
    b, h, w, c = x.shape
    k = c // groups
    xf = x.reshape(b, h * w, c)
    mean = jnp.mean(xf, axis=1).reshape(b, groups, k).mean(-1)  # [B, G]
    d = xf - jnp.repeat(mean, k, axis=1)[:, None, :]
    var = jnp.mean(d * d, axis=1).reshape(b, groups, k).mean(-1)
    a = jnp.repeat(lax.rsqrt(var + eps), k, axis=1)  # [B, C]
    if scale is not None:
        a = a * scale
    y = d * a[:, None, :]
    if bias is not None:
        y = y + bias
    return y.reshape(b, h, w, c)


class WNConv(nnx.Module):
    """Conv whose kernel is w = g * v / ||v|| per output channel (PyTorch weight_norm, dim=0)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int = 3,
        *,
        stride: int = 1,
        weight_norm: bool = True,
        impl: str = "xla",
        rngs: nnx.Rngs,
    ):
        v = nnx.initializers.lecun_normal()(rngs.params(), (kernel, kernel, c_in, c_out))
        self.v = nnx.Param(v)
        self.g = nnx.Param(jnp.sqrt(jnp.sum(v * v, axis=(0, 1, 2)))) if weight_norm else None
        self.stride, self.impl = stride, impl

    def kernel(self) -> jax.Array:
        """The effective kernel [k, k, Cin, Cout]."""
        v = self.v[...]
        if self.g is None:
            return v
        return self.g[...] * v / jnp.sqrt(jnp.sum(v * v, axis=(0, 1, 2)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return conv2d(x, self.kernel(), self.stride, self.impl)


class GN(nnx.Module):
    """GroupNorm with optional affine parameters."""

    def __init__(self, groups: int, channels: int, *, affine: bool = True):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible by {groups} groups")
        self.groups = groups
        self.scale = nnx.Param(jnp.ones((channels,))) if affine else None
        self.bias = nnx.Param(jnp.zeros((channels,))) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        s = None if self.scale is None else self.scale[...]
        b = None if self.bias is None else self.bias[...]
        return group_norm(x, self.groups, s, b)


class Block(nnx.Module):
    """MDEQ basic residual block with input injection and variational dropout."""

    def __init__(self, c, expansion, groups, post_affine, wn, impl, rngs):
        self.conv1 = WNConv(c, c * expansion, 3, weight_norm=wn, impl=impl, rngs=rngs)
        self.gn1 = GN(groups, c * expansion)
        self.conv2 = WNConv(c * expansion, c, 3, weight_norm=wn, impl=impl, rngs=rngs)
        self.gn2 = GN(groups, c)
        self.gn3 = GN(groups, c, affine=post_affine)

    def __call__(self, z, injection, mask):
        out = nnx.relu(self.gn1(self.conv1(z)))
        if mask is not None:
            out = out * mask
        out = self.conv2(out)
        if injection is not None:
            out = out + injection
        out = self.gn2(out) + z
        return nnx.relu(self.gn3(out))


class Cell(nnx.Module):
    """f(z, x): per-branch blocks, multiscale fusion by sum, post-fusion ReLU-conv1x1-GN."""

    def __init__(self, channels, expansion, groups, post_affine, wn, impl, rngs):
        nb = len(channels)
        self.nb = nb
        self.blocks = nnx.List(
            [Block(c, expansion, groups, post_affine, wn, impl, rngs) for c in channels]
        )
        fuse = []
        for i in range(nb):
            for j in range(nb):
                if j > i:  # upsample: conv1x1 + GN, then nearest x 2^(j-i)
                    fuse.append(
                        nnx.List(
                            [
                                WNConv(channels[j], channels[i], 1, weight_norm=wn, rngs=rngs),
                                GN(groups, channels[i]),
                            ]
                        )
                    )
                elif j < i:  # downsample: (i - j) stride-2 3x3 convs with GN (ReLU between)
                    mods = []
                    for t in range(i - j):
                        c_out = channels[i] if t == i - j - 1 else channels[j]
                        mods.append(
                            WNConv(channels[j], c_out, 3, stride=2, weight_norm=wn, rngs=rngs)
                        )
                        mods.append(GN(groups, c_out))
                    fuse.append(nnx.List(mods))
        self.fuse = nnx.List(fuse)
        self.post_conv = nnx.List([WNConv(c, c, 1, weight_norm=wn, rngs=rngs) for c in channels])
        self.post_gn = nnx.List([GN(max(groups // 2, 1), c, affine=post_affine) for c in channels])

    def __call__(self, z: list, injection: jax.Array, masks: list | None) -> list:
        ys = [
            blk(zi, injection if i == 0 else None, None if masks is None else masks[i])
            for i, (blk, zi) in enumerate(zip(self.blocks, z))
        ]
        out, idx = [], 0
        for i in range(self.nb):
            s = ys[i]
            for j in range(self.nb):
                if j == i:
                    continue
                mods = self.fuse[idx]
                idx += 1
                if j > i:
                    u = mods[1](mods[0](ys[j]))
                    r = 2 ** (j - i)
                    u = jnp.repeat(jnp.repeat(u, r, axis=1), r, axis=2)
                    s = s + u[:, : s.shape[1], : s.shape[2]]
                else:
                    d = ys[j]
                    for t in range(0, len(mods), 2):
                        d = mods[t + 1](mods[t](d))
                        if t + 2 < len(mods):
                            d = nnx.relu(d)
                    s = s + d
            out.append(self.post_gn[i](self.post_conv[i](nnx.relu(s))))
        return out


class Bottleneck(nnx.Module):
    """ResNet bottleneck (expansion 4, BatchNorm): the incre block of the MDEQ head."""

    def __init__(self, c_in, c, rngs):
        bn = functools.partial(nnx.BatchNorm, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.c1, self.b1 = WNConv(c_in, c, 1, weight_norm=False, rngs=rngs), bn(c)
        self.c2, self.b2 = WNConv(c, c, 3, weight_norm=False, rngs=rngs), bn(c)
        self.c3, self.b3 = WNConv(c, 4 * c, 1, weight_norm=False, rngs=rngs), bn(4 * c)
        self.cd, self.bd = WNConv(c_in, 4 * c, 1, weight_norm=False, rngs=rngs), bn(4 * c)

    def __call__(self, x):
        out = nnx.relu(self.b1(self.c1(x)))
        out = nnx.relu(self.b2(self.c2(out)))
        out = self.b3(self.c3(out))
        return nnx.relu(out + self.bd(self.cd(x)))


class Head(nnx.Module):
    """MDEQ classification head: bottlenecks per branch, stride-2 merges, 1x1 to final, pool, FC."""

    def __init__(self, channels, head_channels, final_channels, num_classes, rngs):
        bn = functools.partial(nnx.BatchNorm, momentum=0.9, epsilon=1e-5, rngs=rngs)
        self.incre = nnx.List(
            [Bottleneck(c, h, rngs) for c, h in zip(channels, head_channels, strict=True)]
        )
        down = []
        for i in range(len(channels) - 1):
            c_in, c_out = 4 * head_channels[i], 4 * head_channels[i + 1]
            down.append(
                nnx.List(
                    [WNConv(c_in, c_out, 3, stride=2, weight_norm=False, rngs=rngs), bn(c_out)]
                )
            )
        self.down = nnx.List(down)
        self.final_conv = WNConv(
            4 * head_channels[-1], final_channels, 1, weight_norm=False, rngs=rngs
        )
        self.final_bn = bn(final_channels)
        self.fc = nnx.Linear(final_channels, num_classes, rngs=rngs)

    def __call__(self, z: list) -> jax.Array:
        y = self.incre[0](z[0])
        for i, (conv, norm) in enumerate(self.down):
            y = self.incre[i + 1](z[i + 1]) + nnx.relu(norm(conv(y)))
        y = nnx.relu(self.final_bn(self.final_conv(y)))
        return self.fc(jnp.mean(y, axis=(1, 2)))


def _rel_residual(fz: list, z: list) -> jax.Array:
    num = sum(jnp.sum(jnp.square(a - b).reshape(a.shape[0], -1), 1) for a, b in zip(fz, z))
    den = sum(jnp.sum(jnp.square(a).reshape(a.shape[0], -1), 1) for a in fz)
    return jnp.sqrt(num) / (jnp.sqrt(den) + 1e-9)


def _lowest_of_first(traj: solvers.Trajectory, k: jax.Array) -> tuple[list, jax.Array, jax.Array]:
    """Per example, the lowest-residual iterate among z_1..z_k of a recorded trajectory."""
    n, b = traj.residual.shape
    valid = jnp.arange(n)[:, None] < k
    idx = jnp.argmin(jnp.where(valid, traj.residual, jnp.inf), axis=0)  # [B]
    z = jax.tree.map(lambda t: t[idx, jnp.arange(b)], traj.z)
    return z, traj.residual[idx, jnp.arange(b)], idx + 1


class DEQNet(nnx.Module):
    """MDEQ classifier: stem (injection) -> equilibrium of the multiscale cell -> head.

    Forward as the DEQ robustness references: Broyden from z0 = 0 for N steps (relative stop,
    lowest-residual iterate), then z = f(z*) and `grad` damped steps z <- (1-tau) z + tau f(z)
    (phantom mode, value and gradient of the unroll), or z = f(z*) with the implicit gradient
    through z* (exact mode). Inputs are [0, 1] images without normalisation.
    """

    def __init__(
        self,
        *,
        in_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64, 128, 256),
        expansion: int = 5,
        num_groups: int = 8,
        post_gn_affine: bool = False,
        weight_norm: bool = True,
        dropout: float = 0.22,
        head_channels: Sequence[int] = (14, 28, 56, 112),
        final_channels: int = 1680,
        stem_strides: Sequence[int] = (1,),
        conv_impl: str = "auto",
        solver: DEQSolver = DEQSolver(),
        rngs: nnx.Rngs,
    ):
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
        if len(head_channels) != len(channels):
            raise ValueError(
                f"head_channels {tuple(head_channels)} needs one entry per branch {tuple(channels)}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.channels = tuple(int(c) for c in channels)
        self.solver = solver
        self.dropout = float(dropout)
        self.expansion = int(expansion)
        self.deterministic = False  # set by .train() / .eval()
        c_in, stem = self.in_shape[-1], []
        for s in stem_strides:
            stem.append(WNConv(c_in, self.channels[0], 3, stride=s, weight_norm=False, rngs=rngs))
            stem.append(nnx.BatchNorm(self.channels[0], momentum=0.9, epsilon=1e-5, rngs=rngs))
            c_in = self.channels[0]
        self.stem = nnx.List(stem)
        h, w = self.in_shape[:2]
        for s in stem_strides:
            h, w = -(-h // s), -(-w // s)
        shapes = []
        for c in self.channels:
            shapes.append((h, w, c))
            h, w = -(-h // 2), -(-w // 2)
        self.state_shapes = tuple(shapes)
        self.cell = Cell(
            self.channels, self.expansion, num_groups, post_gn_affine, weight_norm, conv_impl, rngs
        )
        self.head = Head(
            self.channels, tuple(head_channels), int(final_channels), num_classes, rngs
        )

    # ------------------------------------------------------------------ pieces

    def inject(self, x: jax.Array) -> jax.Array:
        """Stem: x [B, H, W, C] in [0, 1] -> injection into branch 0 [B, H0, W0, C0]."""
        h = x
        for t in range(0, len(self.stem), 2):
            h = nnx.relu(self.stem[t + 1](self.stem[t](h)))
        return h

    def readout(self, z: list) -> jax.Array:
        """Head: branch states -> logits [B, K]."""
        return self.head(z)

    def zeros(self, batch: int, dtype: Any = jnp.float32) -> list:
        """z0 = 0: one [B, H_i, W_i, C_i] array per branch."""
        return [jnp.zeros((batch, *s), dtype) for s in self.state_shapes]

    def dropout_masks(self, key: jax.Array, batch: int, dtype: Any = jnp.float32) -> list:
        """Variational dropout masks, one per example and hidden channel, drawn once per forward.

        Returns:
            per branch [B, 1, 1, expansion * C_i], values 0 or 1 / (1 - p).
        """
        keep = 1.0 - self.dropout
        keys = jax.random.split(key, len(self.channels))
        return [
            jax.random.bernoulli(k, keep, (batch, 1, 1, self.expansion * c)).astype(dtype) / keep
            for k, c in zip(keys, self.channels)
        ]

    def cell_fn(self) -> tuple[Any, Any]:
        """(f, cell_state): pure f(z, (cell_state, injection, masks)) -> z for the engine."""
        graphdef, state = nnx.split(self.cell)

        def f(z: list, a: tuple) -> list:
            st, inj, masks = a
            return nnx.merge(graphdef, st)(z, inj, masks)

        return f, state

    # ------------------------------------------------------------------ forward

    def equilibrium(
        self,
        x: jax.Array,
        *,
        key: jax.Array | None = None,
        ift: bool | None = None,
        k: jax.Array | None = None,
        k_min: int = 1,
        max_iter: int | None = None,
        record: bool = False,
        pretrain: bool = False,
        final_residual: bool = False,
        jac_probes: int = 0,
        jac_key: jax.Array | None = None,
    ) -> DEQOutput:
        """The full forward with diagnostics.

        Args:
            x: [B, H, W, C] float in [0, 1].
            key: dropout key (required in train mode when dropout > 0).
            ift: override the configured gradient mode (True: exact, False: phantom).
            k: optional int (scalar or [B]): use the lowest-residual iterate among the first k
                solver steps (random-intermediate-state loss, solver-iteration jitter).
            k_min: the smallest k possible (exact mode compiles one solve per k_min..max_iter).
            max_iter: solver steps to run (default f_max_iter); k <= max_iter.
            record: keep the trajectory z_1..z_max_iter and the unrolled states.
            pretrain: the weight-tied unrolled net: num_layers plain f steps from 0, BPTT.
            final_residual: also return the relative residual of the final state.
            jac_probes: Hutchinson probes for the Jacobian regulariser at z* (0: none).
            jac_key: key of the probes.

        Returns:
            DEQOutput.
        """
        ops.check_images(x, self.in_shape, "DEQNet")
        sp = self.solver
        ift = sp.ift if ift is None else bool(ift)
        max_iter = sp.f_max_iter if max_iter is None else int(max_iter)
        b = x.shape[0]
        inj = self.inject(x)
        masks = None
        if not self.deterministic and self.dropout > 0:
            if key is None:
                raise ValueError(
                    "DEQNet in train mode needs a dropout key: equilibrium(x, key=...), or "
                    "call model.eval()"
                )
            masks = self.dropout_masks(key, b, inj.dtype)
        f, cstate = self.cell_fn()
        args = (cstate, inj, masks)
        z0 = self.zeros(b, inj.dtype)
        traj, unrolled = None, None

        if pretrain:
            zl, _ = lax.scan(
                lambda z, _: (f(z, args), None), z0, None, length=sp.num_layers, unroll=True
            )
            res = _rel_residual(f(zl, args), zl) if final_residual else jnp.zeros((b,))
            return DEQOutput(
                self.readout(zl),
                zl,
                zl,
                lax.stop_gradient(res),
                jnp.full((b,), sp.num_layers, jnp.int32),
                None,
                None,
                lax.stop_gradient(res) if final_residual else None,
                None,
            )

        def run(steps: int, rec: int) -> solvers.Solution:
            opts: dict = {}
            if sp.f_solver == "broyden":
                opts["memory"] = steps  # never restart within N steps, as the reference
            if ift:
                opts.update(
                    backward_method=sp.b_solver,
                    backward_max_steps=sp.b_max_iter,
                    backward_tol=sp.b_tol or sp.f_tol,
                )
            return solvers.solve(
                f,
                z0,
                args,
                method=sp.f_solver,
                max_steps=steps,
                tol=sp.f_tol,
                record=rec,
                grad="implicit" if ift else "none",
                lowest=sp.lowest,
                **opts,
            )

        if k is not None and ift:
            # The implicit gradient needs z* from the engine: one solve per possible k.
            lo = max(int(k_min), 1)
            kk = jnp.clip(jnp.asarray(k, jnp.int32), lo, max_iter)
            if kk.ndim:
                raise ValueError("exact (ift) mode takes a scalar k")
            branches = [
                functools.partial(lambda s, _: tuple(run(s, 0)[:3]), s)
                for s in range(lo, max_iter + 1)
            ]
            z_star, steps, res = lax.switch(kk - lo, branches, None)
            if record:
                traj = run(max_iter, max_iter).trajectory
        else:
            sol = run(max_iter, max_iter if (record or k is not None) else 0)
            traj = sol.trajectory
            z_star, steps, res = sol.z, sol.steps, sol.residual
            if k is not None:
                kk = jnp.clip(jnp.asarray(k, jnp.int32), 1, max_iter)
                z_star, res, steps = _lowest_of_first(traj, kk)
                steps = jnp.minimum(steps, sol.steps)
        jac = None
        if jac_probes:
            jac = self._jac_loss(f, args, lax.stop_gradient(z_star), jac_key, jac_probes)
        z1 = f(z_star, args)
        if ift:
            z, hist = z1, None
        else:
            tau = sp.tau

            def damped(z, _):
                zn = jax.tree.map(lambda a, c: (1.0 - tau) * a + tau * c, z, f(z, args))
                return zn, (zn if record else None)

            z, hist = lax.scan(damped, z1, None, length=sp.grad, unroll=True)
        if record:
            unrolled = [a[None] for a in z1]
            if hist is not None:
                unrolled = [jnp.concatenate([a, h]) for a, h in zip(unrolled, hist)]
        fres = None
        if final_residual:
            fres = lax.stop_gradient(_rel_residual(f(z, args), z))
        return DEQOutput(
            self.readout(z),
            z,
            z_star,
            lax.stop_gradient(res),
            lax.stop_gradient(steps),
            traj,
            unrolled,
            fres,
            jac,
        )

    @staticmethod
    def _jac_loss(f, args, z_star, key, probes: int) -> jax.Array:
        """Hutchinson estimate of ||J_f(z*)||_F^2 / numel(z), as the MDEQ reference."""
        if key is None:
            raise ValueError("jac_probes > 0 needs jac_key")
        _, vjp = jax.vjp(lambda z: f(z, args), z_star)
        numel = sum(a.size for a in z_star)
        total = 0.0
        for p in range(probes):
            ks = jax.random.split(jax.random.fold_in(key, p), len(z_star))
            v = [jax.random.normal(kk, a.shape, a.dtype) for kk, a in zip(ks, z_star)]
            (vj,) = vjp(v)
            total = total + sum(jnp.sum(jnp.square(a)) for a in vj)
        return total / (probes * numel)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """x: [B, H, W, C] in [0, 1] -> logits [B, K] (the configured gradient mode)."""
        return self.equilibrium(x, key=key).logits

    def trajectory_logits(self, x: jax.Array, *, ift: bool | None = None) -> jax.Array:
        """Readout of each recorded solver iterate z_1..z_N: [N, B, K] (eval mode)."""
        out = self.equilibrium(x, ift=ift, record=True)
        zs = out.trajectory.z
        n, b = zs[0].shape[:2]
        flat = [a.reshape(n * b, *a.shape[2:]) for a in zs]
        return self.readout(flat).reshape(n, b, -1)


# ---------------------------------------------------------------------- classifier and registry


@functools.lru_cache(maxsize=32)
def _eval_apply(graphdef: nnx.GraphDef, ift: bool | None, what: str):
    def apply(state: nnx.State, x: jax.Array) -> jax.Array:
        m = nnx.merge(graphdef, state, copy=True)
        m.eval()
        if what == "logits":
            return m.equilibrium(x, ift=ift).logits
        if what == "residual":
            return m.equilibrium(x, ift=ift, final_residual=True).final_residual
        return m.trajectory_logits(x, ift=ift)

    return apply


def deq_compiler_options() -> tuple[tuple[str, Any], ...]:
    """XLA options for a DEQ's programs on the default backend (`Classifier.compiler_options`).

    On XLA:CPU, LLVM optimisation level 1: the DEQ's attack programs (a Broyden solve inside an
    attack loop) run ~1.4x faster than at XLA's default level 2, compile in about the same time
    and give the same robust counts (BUILD_NOTES.md, "Compiler options per model"); the EP-CNN's
    are slower at level 1, hence per model. Other backends: XLA's defaults.
    """
    return (("xla_backend_optimization_level", 1),) if jax.default_backend() == "cpu" else ()


def deq_classifier(model: DEQNet, *, ift: bool | None = None, name: str = "DEQ") -> Classifier:
    """The eval-mode `Classifier` of a DEQ, its gradient path declared.

    Args:
        model: a DEQNet.
        ift: None keeps the model's mode; True = exact (implicit gradient, value f(z*)),
            False = phantom (value and gradient of f(z*) + `grad` damped steps).
        name: display name.

    Returns:
        Classifier with logits_fn, trajectory_fn ([N, B, K]) and residual_fn ([B], relative
        residual of the state read out) as pytree Partials,
        prediction_depth = f_max_iter and gradient = GradientPath("phantom", grad) or
        GradientPath("implicit").
    """
    graphdef, state = nnx.split(model)
    return Classifier(
        logits_fn=jax.tree_util.Partial(_eval_apply(graphdef, ift, "logits"), state),
        name=name,
        trajectory_fn=jax.tree_util.Partial(_eval_apply(graphdef, ift, "trajectory"), state),
        prediction_depth=model.solver.f_max_iter,
        gradient=model.solver.gradient_path(ift),
        residual_fn=jax.tree_util.Partial(_eval_apply(graphdef, ift, "residual"), state),
        compiler_options=deq_compiler_options(),
    )


@functools.lru_cache(maxsize=32)
def _deq_fns(graphdef: Any):
    def inject(state, x):
        return nnx.merge(graphdef, state).inject(x)

    def f(state, z, a):
        return nnx.merge(graphdef, state).cell(z, a, None)

    def readout(state, z):
        return nnx.merge(graphdef, state).readout(z)

    def trajectory(state, x):
        out = nnx.merge(graphdef, state).equilibrium(x, ift=False, record=True)
        return lax.stop_gradient(out.trajectory.z)

    def init(state, x):
        m = nnx.merge(graphdef, state)
        return m.zeros(x.shape[0], m.inject(x).dtype)

    return inject, f, readout, trajectory, init


@functools.lru_cache(maxsize=32)
def _deq_joint(graphdef: Any, ift: bool | None):
    def predict_trajectory(state, x):  # one solve: the logits of deq_classifier and trajectory
        out = nnx.merge(graphdef, state).equilibrium(x, ift=ift, record=True)
        return out.logits, lax.stop_gradient(out.trajectory.z)

    return predict_trajectory


def deq_dynamics(model: DEQNet, *, ift: bool | None = None) -> Dynamics:
    """The eval-mode (no dropout, BatchNorm running statistics) `Dynamics` of a `DEQNet`.

    Args:
        model: a DEQNet (not modified).
        ift: gradient mode of `predict` (the model's `deq_classifier(model, ift=ift)` logits).

    Returns:
        Dynamics with N = solver.f_max_iter, tol = solver.f_tol; `trajectory` is the model's
        recorded Broyden iterates, `predict` its real logits (f(z*) and the damped unroll),
        `predict_trajectory` both from one solve.
    """
    graphdef, state = nnx.split(model)
    m = nnx.merge(graphdef, state, copy=True)
    m.eval()
    graphdef, state = nnx.split(m)
    inject, f, readout, trajectory, init = _deq_fns(graphdef)
    return Dynamics(
        inject=jax.tree_util.Partial(inject, state),
        f=jax.tree_util.Partial(f, state),
        readout=jax.tree_util.Partial(readout, state),
        trajectory=jax.tree_util.Partial(trajectory, state),
        init=jax.tree_util.Partial(init, state),
        predict=deq_classifier(model, ift=ift).logits_fn,
        num_states=int(model.solver.f_max_iter),
        tol=float(model.solver.f_tol),
        predict_trajectory=jax.tree_util.Partial(_deq_joint(graphdef, ift), state),
    )


def solver_from_config(m: Any) -> DEQSolver:
    """DEQSolver from a config.model (torchdeq field names)."""
    fields = {f.name for f in dataclasses.fields(DEQSolver)}
    kw = {k: m[k] for k in fields if k in m and m[k] is not None}
    return DEQSolver(**kw)


@register_model("deq")
def build_deq(m: Any, data: Any, rngs: nnx.Rngs) -> DEQNet:
    """The DEQ of `config.model` for `data` (no input normalisation: data.mean/std unused)."""
    return DEQNet(
        in_shape=data.image_shape,
        num_classes=data.num_classes,
        channels=tuple(m.channels),
        expansion=int(m.expansion),
        num_groups=int(m.num_groups),
        post_gn_affine=bool(m.post_gn_affine),
        weight_norm=bool(m.weight_norm),
        dropout=float(m.dropout),
        head_channels=tuple(m.head_channels),
        final_channels=int(m.final_channels),
        stem_strides=tuple(m.stem_strides),
        conv_impl=m.get("conv", "auto"),
        solver=solver_from_config(m),
        rngs=rngs,
    )


def num_params(model: nnx.Module) -> int:
    """Number of trainable parameters."""
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param))))
