"""A small Vision Transformer for 28x28 / 32x32 images (the EP robustness papers' ViT baseline)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from eqrobust import ops
from eqrobust.models.registry import register_model


class EncoderBlock(nnx.Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x)) (GELU)."""

    def __init__(self, hidden: int, heads: int, mlp: int, dropout: float, *, rngs: nnx.Rngs):
        """hidden: token width; heads: attention heads (hidden % heads == 0); mlp: MLP width."""
        self.ln1 = nnx.LayerNorm(hidden, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads,
            in_features=hidden,
            dropout_rate=dropout,
            decode=False,
            rngs=rngs,
        )
        self.ln2 = nnx.LayerNorm(hidden, rngs=rngs)
        self.fc1 = nnx.Linear(hidden, mlp, rngs=rngs)
        self.fc2 = nnx.Linear(mlp, hidden, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        """h: [B, T, hidden] -> [B, T, hidden]."""
        h = h + self.drop(self.attn(self.ln1(h)))
        return h + self.drop(self.fc2(self.drop(nnx.gelu(self.fc1(self.ln2(h))))))


class ViT(nnx.Module):
    """Vision Transformer: non-overlapping p x p patches -> Linear -> [CLS] + learned positions ->
    `depth` pre-norm encoder blocks -> LayerNorm([CLS]) -> Linear.

    The EP robustness papers' ViT: depth 7, 12 heads, patch 4x4; with hidden 384 and MLP 384 it is
    the common small-ViT CIFAR recipe (REFERENCE_NOTES 3c; about 6.3M parameters on 32x32).
    Input normalisation `(x - mean) / std` is the first operation; dropout is off in eval mode.
    """

    def __init__(
        self,
        *,
        in_shape: Sequence[int],
        num_classes: int,
        patch: int = 4,
        hidden: int = 384,
        depth: int = 7,
        heads: int = 12,
        mlp: int = 384,
        dropout: float = 0.0,
        mean: Sequence[float] | float = 0.0,
        std: Sequence[float] | float = 1.0,
        rngs: nnx.Rngs,
    ):
        """See the class docstring; H and W must be multiples of `patch`."""
        self.in_shape = tuple(int(s) for s in in_shape)
        h, w, c = self.in_shape
        if h % patch or w % patch:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
        if hidden % heads:
            raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
        self.patch = int(patch)
        self.mean = nnx.Variable(jnp.broadcast_to(jnp.asarray(mean, jnp.float32), (c,)))
        self.std = nnx.Variable(jnp.broadcast_to(jnp.asarray(std, jnp.float32), (c,)))
        tokens = (h // patch) * (w // patch) + 1
        self.embed = nnx.Linear(patch * patch * c, hidden, rngs=rngs)
        init = nnx.initializers.truncated_normal(0.02)
        self.cls = nnx.Param(init(rngs.params(), (1, 1, hidden)))
        self.pos = nnx.Param(init(rngs.params(), (1, tokens, hidden)))
        self.blocks = nnx.List(
            [EncoderBlock(hidden, heads, mlp, dropout, rngs=rngs) for _ in range(depth)]
        )
        self.ln = nnx.LayerNorm(hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def patches(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] -> [B, (H/p)(W/p), p*p*C] (row-major patches)."""
        b, h, w, c = x.shape
        p = self.patch
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] float in [0, 1] -> logits [B, K]."""
        ops.check_images(x, self.in_shape, "ViT")
        h = self.embed(self.patches((x - self.mean.value) / self.std.value))
        cls = jnp.broadcast_to(self.cls.get_value(), (h.shape[0], 1, h.shape[-1]))
        h = jnp.concatenate([cls, h], axis=1) + self.pos.get_value()
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h[:, 0]))


@register_model("vit")
def build_vit(m, data, rngs: nnx.Rngs) -> ViT:
    """ViT of `config.model` (patch, hidden, depth, heads, mlp, dropout) for `data`."""
    return ViT(
        in_shape=data.image_shape,
        num_classes=data.num_classes,
        patch=int(m.get("patch", 4)),
        hidden=int(m.get("hidden", 384)),
        depth=int(m.get("depth", 7)),
        heads=int(m.get("heads", 12)),
        mlp=int(m.get("mlp", 384)),
        dropout=float(m.get("dropout", 0.0)),
        mean=data.mean,
        std=data.std,
        rngs=rngs,
    )
