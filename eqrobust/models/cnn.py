"""The BP-CNN baseline: conv -> BatchNorm -> ReLU -> 2x2 max pool per layer, then Linear."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eqrobust import ops
from eqrobust.models.registry import register_model

CONV_IMPLS = ops.CONV_IMPLS


def feature_size(
    in_hw: Sequence[int], paddings: Sequence[int], kernel_size: int
) -> tuple[int, int]:
    """Spatial size after the conv(padding p, stride 1) + 2x2/2 max-pool stack."""
    h, w = in_hw
    for p in paddings:
        h, w = (h + 2 * p - kernel_size + 1) // 2, (w + 2 * p - kernel_size + 1) // 2
        if h < 1 or w < 1:
            raise ValueError(
                f"input {tuple(in_hw)} is too small for paddings {tuple(paddings)} "
                f"with kernel {kernel_size}"
            )
    return h, w


class BPCNN(nnx.Module):
    """Feedforward conv net of the EP robustness papers' BP baseline.

    Input normalisation `(x - mean) / std` is the first operation of the model.
    """

    def __init__(
        self,
        *,
        in_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        paddings: Sequence[int] = (1, 1),
        kernel_size: int = 3,
        mean: Sequence[float] | float = 0.0,
        std: Sequence[float] | float = 1.0,
        conv_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        """See the class docstring; `conv_impl` is "patches" (k*k shifted slices + one matmul,
        fast on CPU for thin layers), "xla" (lax.conv, cuDNN on GPU), "xla_flip" (lax.conv
        with a fast input gradient inside the attacks' loops on CPU) or "auto" (by backend and
        layer at trace time, `ops.resolve_impl`). All compute the same function with the same
        parameters."""
        if conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
        self.conv_impl = conv_impl
        if len(channels) != len(paddings):
            raise ValueError(
                f"channels {tuple(channels)} and paddings {tuple(paddings)} "
                "must have the same length"
            )
        self.in_shape = tuple(int(s) for s in in_shape)
        c_in = self.in_shape[-1]
        self.mean = nnx.Variable(jnp.broadcast_to(jnp.asarray(mean, jnp.float32), (c_in,)))
        self.std = nnx.Variable(jnp.broadcast_to(jnp.asarray(std, jnp.float32), (c_in,)))
        self.paddings = tuple(int(p) for p in paddings)
        convs, norms = [], []
        for c_out, p in zip(channels, self.paddings):
            convs.append(nnx.Conv(c_in, c_out, (kernel_size, kernel_size), padding=p, rngs=rngs))
            norms.append(nnx.BatchNorm(c_out, momentum=0.9, rngs=rngs))
            c_in = c_out
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        h, w = feature_size(self.in_shape[:2], self.paddings, kernel_size)
        self.head = nnx.Linear(h * w * c_in, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] float in [0, 1] -> logits [B, K]."""
        ops.check_images(x, self.in_shape, "BPCNN")
        h = ops.normalize(x, self.mean.value, self.std.value)
        for conv, norm, p in zip(self.convs, self.norms, self.paddings):
            h = ops.conv(h, conv.kernel.get_value(), p, self.conv_impl) + conv.bias.get_value()
            h = max_pool_2x2(nnx.relu(norm(h)))
        return self.head(h.reshape(h.shape[0], -1))


def max_pool_2x2(h: jax.Array) -> jax.Array:
    """2x2 / stride-2 max pool (floor mode): `ops.max_pool_2x2`, first-maximum gradient at ties.

    Args:
        h: [B, H, W, C].

    Returns:
        [B, H // 2, W // 2, C].
    """
    return ops.max_pool_2x2(h)


@register_model("bp_cnn")
def build_bp_cnn(m, data, rngs: nnx.Rngs) -> BPCNN:
    """The BP-CNN of `config.model` (channels, paddings, kernel_size, conv) for `data`."""
    return BPCNN(
        in_shape=data.image_shape,
        num_classes=data.num_classes,
        channels=tuple(m.channels),
        paddings=tuple(m.paddings),
        kernel_size=int(m.get("kernel_size", 3)),
        mean=data.mean,
        std=data.std,
        conv_impl=m.get("conv", "auto"),
        rngs=rngs,
    )


def num_params(model: nnx.Module) -> int:
    """Number of trainable parameters."""
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param))))
