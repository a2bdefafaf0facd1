"""The Distilled BP-CNN: a feedforward net with the EP-CNN's layer layout, exposing its states."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from eqrobust import energy, ops
from eqrobust.models.registry import register_model


class EPStudent(nnx.Module):
    """Feedforward twin of an EP-CNN (attractor-distillation student, ep-distillation eq. 8).

    Layer l computes s~_l = sigma(maxpool2(conv_l(s~_{l-1}) + b_l)) for the conv layers and
    s~_l = sigma(W_l flat(s~_{l-1}) + b_l) for the fc layers, with s~_0 = (x - mean) / std and
    sigma the EP-CNN's activation (`my_hard_sig`); the readout is W_out flat(s~_last) + b. This is
    the EP free-phase update with the feedback (transposed) terms removed, so each s~_l has the
    shape of the EP state s*_l it is trained to match. Parameters use the EP `Params` layout
    (conv w [k, k, C_in, C_out]) and PyTorch's default uniform init, like `eqrobust.ep.init`.
    """

    def __init__(
        self,
        *,
        in_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        paddings: Sequence[int] = (1, 1),
        kernel_size: int = 3,
        fc: Sequence[int] = (),
        activation: str = "my_hard_sig",
        mean: Sequence[float] | float = 0.0,
        std: Sequence[float] | float = 1.0,
        conv: str = "auto",
        pool: str = "auto",
        rngs: nnx.Rngs,
    ):
        """See the class docstring; `conv`/`pool` pick the formulations of `eqrobust.energy`."""
        self.ecfg = energy.EnergyConfig(
            in_shape=tuple(int(s) for s in in_shape),
            num_classes=int(num_classes),
            channels=tuple(int(c) for c in channels),
            paddings=tuple(int(p) for p in paddings),
            kernel_size=int(kernel_size),
            fc=tuple(int(f) for f in fc),
            activation=activation,
            output="softmax",
            mean=tuple(jnp.broadcast_to(jnp.asarray(mean, jnp.float32), (in_shape[-1],)).tolist()),
            std=tuple(jnp.broadcast_to(jnp.asarray(std, jnp.float32), (in_shape[-1],)).tolist()),
            pool=pool,
            conv=conv,
        )
        ws, bs = [], []
        for w_shape, b_shape in self.ecfg.param_shapes:
            bound = 1.0 / math.sqrt(math.prod(w_shape[:-1]))
            ws.append(
                nnx.Param(jax.random.uniform(rngs.params(), w_shape, jnp.float32, -bound, bound))
            )
            bs.append(
                nnx.Param(jax.random.uniform(rngs.params(), b_shape, jnp.float32, -bound, bound))
            )
        self.ws, self.bs = nnx.List(ws), nnx.List(bs)

    @property
    def num_hidden(self) -> int:
        """Number of hidden neuron layers (the states matched to the teacher)."""
        return len(self.ecfg.channels) + len(self.ecfg.fc)

    def states(self, x: jax.Array) -> tuple[tuple[jax.Array, ...], jax.Array]:
        """x: [B, H, W, C] in [0, 1] -> (hidden states (conv [B, H_l, W_l, C_l], fc [B, F_l]),
        logits [B, K])."""
        ops.check_images(x, self.ecfg.in_shape, "EPStudent")
        cfg = self.ecfg
        sigma = energy.get_activation(cfg.activation)
        h = energy.normalize(x, cfg)
        states = []
        for i, p in enumerate(cfg.paddings):
            u = energy.conv(h, self.ws[i].get_value(), p, cfg.conv) + self.bs[i].get_value()
            h = sigma(energy.maxpool2(u, cfg.pool))
            states.append(h)
        for j in range(len(cfg.fc)):
            i = cfg.num_conv + j
            h = sigma(h.reshape(h.shape[0], -1) @ self.ws[i].get_value() + self.bs[i].get_value())
            states.append(h)
        logits = h.reshape(h.shape[0], -1) @ self.ws[-1].get_value() + self.bs[-1].get_value()
        return tuple(states), logits

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H, W, C] float in [0, 1] -> logits [B, K]."""
        return self.states(x)[1]


@register_model("ep_student")
def build_ep_student(m, data, rngs: nnx.Rngs) -> EPStudent:
    """The Distilled BP-CNN of `config.model` (channels, paddings, kernel_size, fc, activation,
    conv, pool; mean/std from the dataset unless set, times std_scale) for `data`."""
    mean = m.get("mean", None) or tuple(float(v) for v in data.mean)
    std = m.get("std", None) or tuple(float(v) for v in data.std)
    std = tuple(float(s) * float(m.get("std_scale", 1.0) or 1.0) for s in std)
    return EPStudent(
        in_shape=data.image_shape,
        num_classes=data.num_classes,
        channels=tuple(m.channels),
        paddings=tuple(m.paddings),
        kernel_size=int(m.get("kernel_size", 3)),
        fc=tuple(m.get("fc", ()) or ()),
        activation=m.get("activation", "my_hard_sig"),
        mean=mean,
        std=std,
        conv=m.get("conv", "auto"),
        pool=m.get("pool", "auto"),
        rngs=rngs,
    )
