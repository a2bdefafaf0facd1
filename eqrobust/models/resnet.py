"""ResNet-18, CIFAR variant (3x3 stem, no initial max pool), as a Flax NNX module."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from eqrobust import ops
from eqrobust.models.registry import register_model


class BasicBlock(nnx.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, *, rngs: nnx.Rngs):
        """c_in -> c_out channels; `stride` 2 halves the spatial size."""
        self.conv1 = nnx.Conv(
            c_in, c_out, (3, 3), strides=stride, padding=1, use_bias=False, rngs=rngs
        )
        self.bn1 = nnx.BatchNorm(c_out, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(c_out, c_out, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(c_out, momentum=0.9, rngs=rngs)
        self.project = stride != 1 or c_in != c_out
        if self.project:
            self.short_conv = nnx.Conv(
                c_in, c_out, (1, 1), strides=stride, use_bias=False, rngs=rngs
            )
            self.short_bn = nnx.BatchNorm(c_out, momentum=0.9, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        """h: [B, H, W, c_in] -> [B, H / stride, W / stride, c_out]."""
        out = nnx.relu(self.bn1(self.conv1(h)))
        out = self.bn2(self.conv2(out))
        short = self.short_bn(self.short_conv(h)) if self.project else h
        return nnx.relu(out + short)


class ResNet18(nnx.Module):
    """ResNet-18 for small images (He et al. 2016, the common CIFAR variant).

    Stem: 3x3 conv (stride 1) -> BN -> ReLU, no max pool; four stages of two `BasicBlock`s with
    widths (w, 2w, 4w, 8w) (w = 64 is the standard ResNet-18), strides 1, 2, 2, 2; global average
    pool; Linear. Input normalisation `(x - mean) / std` is the first operation. BatchNorm uses
    batch statistics in train mode and running statistics in eval mode (`logits_fn` is eval).
    """

    def __init__(
        self,
        *,
        in_shape: Sequence[int],
        num_classes: int,
        width: int = 64,
        blocks: Sequence[int] = (2, 2, 2, 2),
        mean: Sequence[float] | float = 0.0,
        std: Sequence[float] | float = 1.0,
        rngs: nnx.Rngs,
    ):
        """See the class docstring; `width` scales every stage (cpu configs use fewer channels)."""
        self.in_shape = tuple(int(s) for s in in_shape)
        c_in = self.in_shape[-1]
        self.mean = nnx.Variable(jnp.broadcast_to(jnp.asarray(mean, jnp.float32), (c_in,)))
        self.std = nnx.Variable(jnp.broadcast_to(jnp.asarray(std, jnp.float32), (c_in,)))
        self.stem = nnx.Conv(c_in, width, (3, 3), padding=1, use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
        layers, c = [], width
        for stage, n in enumerate(blocks):
            c_out = width * 2**stage
            for b in range(n):
                stride = 2 if (stage > 0 and b == 0) else 1
                layers.append(BasicBlock(c, c_out, stride, rngs=rngs))
                c = c_out
        self.blocks = nnx.List(layers)
        self.head = nnx.Linear(c, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] float in [0, 1] -> logits [B, K]."""
        ops.check_images(x, self.in_shape, "ResNet18")
        h = (x - self.mean.value) / self.std.value
        h = nnx.relu(self.stem_bn(self.stem(h)))
        for block in self.blocks:
            h = block(h)
        return self.head(jnp.mean(h, axis=(1, 2)))


@register_model("resnet18")
def build_resnet18(m, data, rngs: nnx.Rngs) -> ResNet18:
    """ResNet-18 of `config.model` (width, blocks) for `data` (normalised by its statistics)."""
    return ResNet18(
        in_shape=data.image_shape,
        num_classes=data.num_classes,
        width=int(m.get("width", 64)),
        blocks=tuple(m.get("blocks", (2, 2, 2, 2))),
        mean=data.mean,
        std=data.std,
        rngs=rngs,
    )
