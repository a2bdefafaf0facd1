"""Hopfield-like convolutional energy Phi of EP-CNNs: the EP model's only definition."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

Array = jax.Array


# --------------------------------------------------------------------------- activations


def my_hard_sig(u: Array) -> Array:
    """clamp(u / 2, 0, 1): the reference's default (CIFAR-10) activation."""
    return jnp.clip(0.5 * u, 0.0, 1.0)


def hard_sigmoid(u: Array) -> Array:
    """clamp(u, 0, 1)."""
    return jnp.clip(u, 0.0, 1.0)


def ctrd_hard_sig(u: Array) -> Array:
    """clamp(u, -1/2, 1/2): the centred hard sigmoid."""
    return jnp.clip(u, -0.5, 0.5)


def my_sigmoid(u: Array) -> Array:
    """1 / (1 + exp(-4 (u - 1/2))): a sigmoid with the hard sigmoid's slope at 1/2."""
    return jax.nn.sigmoid(4.0 * (u - 0.5))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "my_hard_sig": my_hard_sig,
    "hard_sigmoid": hard_sigmoid,
    "ctrd_hard_sig": ctrd_hard_sig,
    "my_sigmoid": my_sigmoid,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """Looks up an activation by name (one of `ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


# --------------------------------------------------------------------------- config / pytrees


class Layer(NamedTuple):
    """One synapse layer. Conv: w [k, k, C_in, C_out] (HWIO), b [C_out]; fc: w [F_in, F_out]."""

    w: Array
    b: Array


# Params: tuple of `Layer`s in order conv_1..conv_n, fc_1..fc_m, out (the readout in "softmax" mode,
# the synapses to the output neurons in "mse" mode).
Params = tuple[Layer, ...]
# States: one array per neuron layer, leading batch axis: conv [B, H_l, W_l, C_l], fc [B, F_l]
# (and the output neurons [B, K] in "mse" mode).
States = tuple[Array, ...]

OUTPUT_MODES = ("softmax", "mse")
POOL_IMPLS = ("reduce_window", "reshape")
CONV_IMPLS = ("xla", "patches")


@dataclasses.dataclass(frozen=True)
class EnergyConfig:
    """Architecture of the energy (static, hashable).

    Attributes:
      in_shape: per-example input shape (H, W, C).
      num_classes: number of classes K.
      channels: output channels of the conv layers (each conv is followed by 2x2 max pool).
      paddings: per-conv-layer zero padding (same length as `channels`).
      kernel_size: square conv kernel size.
      fc: widths of the hidden fully connected neuron layers after the convs (may be empty).
      activation: name in `ACTIVATIONS`.
      output: "softmax" (last Linear is a readout outside the dynamics, CE loss; the robustness
        papers' choice) or "mse" (output neurons inside the dynamics, squared-error loss).
      mean, std: per-channel input normalisation in [0, 1] units; applied inside the model.
      pool: max-pool formulation, "reduce_window" (lax.reduce_window) or "reshape" (max over a
        strided-slice view, custom first-maximum VJP; default); same values and gradients,
        different speed (reshape is several times faster in XLA:CPU while loops).
      conv: convolution formulation, "xla" (lax.conv_general_dilated) or "patches" (k*k shifted
        slices concatenated, then one matmul; default, several times faster on CPU); same values
        up to rounding.
    """

    in_shape: tuple[int, int, int] = (28, 28, 1)
    num_classes: int = 10
    channels: tuple[int, ...] = (32, 64)
    paddings: tuple[int, ...] = (1, 1)
    kernel_size: int = 3
    fc: tuple[int, ...] = ()
    activation: str = "my_hard_sig"
    output: str = "softmax"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    pool: str = "reshape"
    conv: str = "patches"

    def __post_init__(self):
        # Normalise list-valued fields (ConfigDicts hand over lists) so the config stays hashable.
        for name in ("in_shape", "channels", "paddings", "fc", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.in_shape) != 3:
            raise ValueError(f"in_shape must be (H, W, C); got {self.in_shape}.")
        if len(self.channels) != len(self.paddings):
            raise ValueError(
                f"channels {self.channels} and paddings {self.paddings} must have the same length."
            )
        if not self.channels and not self.fc and self.output == "softmax":
            raise ValueError("The softmax readout needs at least one conv or fc neuron layer.")
        get_activation(self.activation)
        if self.output not in OUTPUT_MODES:
            raise ValueError(f"output must be one of {OUTPUT_MODES}; got {self.output!r}.")
        if self.pool not in POOL_IMPLS:
            raise ValueError(f"pool must be one of {POOL_IMPLS}; got {self.pool!r}.")
        if self.conv not in CONV_IMPLS:
            raise ValueError(f"conv must be one of {CONV_IMPLS}; got {self.conv!r}.")
        c = self.in_shape[2]
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(
                f"mean/std need {c} entries (input channels); got {self.mean}, {self.std}."
            )
        self.state_shapes  # noqa: B018  (validates that the spatial sizes stay positive)

    @property
    def num_conv(self) -> int:
        return len(self.channels)

    @property
    def conv_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """Per-example shapes (H_l, W_l, C_l) of the conv neuron layers (after pooling)."""
        h, w, _ = self.in_shape
        shapes = []
        for c, p in zip(self.channels, self.paddings, strict=True):
            hc, wc = h + 2 * p - self.kernel_size + 1, w + 2 * p - self.kernel_size + 1
            h, w = hc // 2, wc // 2
            if h < 1 or w < 1:
                raise ValueError(
                    f"Conv layers {self.channels} with paddings {self.paddings} shrink the input "
                    f"{self.in_shape} to nothing; use more padding or fewer layers."
                )
            shapes.append((h, w, c))
        return tuple(shapes)

    @property
    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-example shapes of all neuron layers (what `States` holds, minus the batch axis)."""
        shapes: list[tuple[int, ...]] = list(self.conv_shapes)
        shapes += [(f,) for f in self.fc]
        if self.output == "mse":
            shapes.append((self.num_classes,))
        return tuple(shapes)

    @property
    def param_shapes(self) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
        """(w shape, b shape) per synapse layer, in `Params` order."""
        k = self.kernel_size
        out: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
        c_in = self.in_shape[2]
        for c in self.channels:
            out.append(((k, k, c_in, c), (c,)))
            c_in = c
        f_in = math.prod(self.conv_shapes[-1]) if self.channels else math.prod(self.in_shape)
        for f in (*self.fc, self.num_classes):
            out.append(((f_in, f), (f,)))
            f_in = f
        return tuple(out)


# --------------------------------------------------------------------------- building blocks


@jax.custom_vjp
def _maxpool2_first(u: Array) -> Array:
    """2x2 max pool of an even-sized u [B, H, W, C] whose gradient goes to the FIRST maximum of
    each window (row-major), like PyTorch's max_pool2d and XLA's select_and_scatter, instead of
    being split between tied entries (what autodiff of jnp.max does). Ties are common: a constant
    image background gives equal conv outputs across a window."""
    return _pool_fwd(u)[0]


def _pool_fwd(u: Array):
    x00, x01, x10, x11 = u[:, 0::2, 0::2], u[:, 0::2, 1::2], u[:, 1::2, 0::2], u[:, 1::2, 1::2]
    m = jnp.maximum(jnp.maximum(x00, x01), jnp.maximum(x10, x11))
    e00 = x00 == m
    e01 = (x01 == m) & ~e00
    e10 = (x10 == m) & ~(e00 | e01)
    e11 = ~(e00 | e01 | e10)
    return m, (e00, e01, e10, e11)


def _pool_bwd(masks, g: Array):
    b, h, w, c = g.shape
    z = jnp.zeros((), g.dtype)
    e00, e01, e10, e11 = (jnp.where(e, g, z) for e in masks)
    top = jnp.stack([e00, e01], axis=3)  # [B, h, w, 2, C]
    bot = jnp.stack([e10, e11], axis=3)
    return (jnp.stack([top, bot], axis=2).reshape(b, 2 * h, 2 * w, c),)


_maxpool2_first.defvjp(lambda u: _pool_fwd(u), _pool_bwd)


def maxpool2(u: Array, impl: str = "reduce_window") -> Array:
    """2x2/stride-2 max pool, odd trailing rows/cols dropped. u: [B,H,W,C] -> [B,H//2,W//2,C].

    "reduce_window": lax.reduce_window (gradient by select_and_scatter, first maximum);
    "reshape": strided slices + elementwise max with the same first-maximum gradient (a custom VJP
    made of elementwise ops; several times faster inside XLA:CPU while loops).
    """
    if impl == "reduce_window":
        return jax.lax.reduce_window(u, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    _, h, w, _ = u.shape
    return _maxpool2_first(u[:, : 2 * (h // 2), : 2 * (w // 2)])


def conv(s: Array, w: Array, padding: int, impl: str = "xla") -> Array:
    """Stride-1 NHWC convolution with symmetric zero padding. s: [B,H,W,Cin], w: [k,k,Cin,Cout]."""
    if impl == "patches":
        k = w.shape[0]
        sp = jnp.pad(s, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        ho, wo = sp.shape[1] - k + 1, sp.shape[2] - k + 1
        cols = [sp[:, i : i + ho, j : j + wo] for i in range(k) for j in range(k)]
        # [B, Ho, Wo, k*k*Cin] @ [k*k*Cin, Cout]; the (i, j, c) order matches HWIO's reshape.
        return jnp.concatenate(cols, axis=-1) @ w.reshape(-1, w.shape[-1])
    return jax.lax.conv_general_dilated(
        s, w, (1, 1), [(padding, padding)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def normalize(x: Array, config: EnergyConfig) -> Array:
    """(x - mean) / std per channel; x: [B, H, W, C] in [0, 1]."""
    mean = jnp.asarray(config.mean, x.dtype)
    std = jnp.asarray(config.std, x.dtype)
    return (x - mean) / std


def check_inputs(x: Array, config: EnergyConfig) -> None:
    """Raises ValueError unless x is [B, H, W, C] with (H, W, C) == config.in_shape."""
    if x.ndim != 4 or tuple(x.shape[1:]) != config.in_shape:
        raise ValueError(
            f"Expected images [B, {', '.join(map(str, config.in_shape))}] (NHWC, in [0, 1]); "
            f"got shape {tuple(x.shape)}."
        )


def _check_states(states: States, config: EnergyConfig, batch: int) -> None:
    shapes = config.state_shapes
    if len(states) != len(shapes):
        raise ValueError(f"Expected {len(shapes)} neuron layers; got {len(states)}.")
    for i, (s, shp) in enumerate(zip(states, shapes, strict=True)):
        if tuple(s.shape) != (batch, *shp):
            raise ValueError(f"State {i}: expected shape {(batch, *shp)}; got {tuple(s.shape)}.")


def _check_params(params: Params, config: EnergyConfig) -> None:
    shapes = config.param_shapes
    if len(params) != len(shapes):
        raise ValueError(f"Expected {len(shapes)} synapse layers; got {len(params)}.")
    for i, (layer, (ws, bs)) in enumerate(zip(params, shapes, strict=True)):
        if tuple(layer.w.shape) != ws or tuple(layer.b.shape) != bs:
            raise ValueError(
                f"Layer {i}: expected w {ws}, b {bs}; got {tuple(layer.w.shape)}, "
                f"{tuple(layer.b.shape)}. Was the model built with a different config?"
            )


def zero_states(config: EnergyConfig, batch: int, dtype=jnp.float32) -> States:
    """All-zero neuron states (the reference starts every batch from zeros)."""
    return tuple(jnp.zeros((batch, *shp), dtype) for shp in config.state_shapes)


def readout(params: Params, states: States, config: EnergyConfig) -> Array:
    """Class scores [B, K]: W_out flat(s_last) + b ("softmax") or the output neurons ("mse")."""
    if config.output == "mse":
        return states[-1]
    s = states[-1]
    return s.reshape(s.shape[0], -1) @ params[-1].w + params[-1].b


def loss(params: Params, states: States, y: Array, config: EnergyConfig) -> Array:
    """Per-example loss [B]: CE of the readout ("softmax") or 1/2 ||s_out - onehot(y)||^2."""
    scores = readout(params, states, config)
    onehot = jax.nn.one_hot(y, config.num_classes, dtype=scores.dtype)
    if config.output == "mse":
        return 0.5 * jnp.sum((scores - onehot) ** 2, axis=-1)
    return -jnp.sum(onehot * jax.nn.log_softmax(scores, axis=-1), axis=-1)


# --------------------------------------------------------------------------- the energy


def Phi(  # noqa: N802  (the papers' name)
    params: Params,
    x: ArrayLike,
    states: States,
    *,
    config: EnergyConfig,
    beta: ArrayLike = 0.0,
    y: ArrayLike | None = None,
) -> Array:
    """Primitive function Phi(x, s) - beta * Loss(s, y), per example.

        Phi = sum_conv < maxpool2(conv_l(s_{l-1}) + b_l), s_l >
            + sum_fc < W_l flat(s_{l-1}) + b_l, s_l >  - beta * Loss(s, y),
        with s_0 = (x - mean) / std.

    Args:
      params: synapse layers (`Params`).
      x: [B, H, W, C] images in [0, 1].
      states: neuron layers (`States`).
      config: the architecture.
      beta: nudging strength (scalar; may be traced). With beta == 0, y may be None.
      y: [B] int labels, needed whenever beta may be nonzero.

    Returns:
      [B] energy of each example (summed over C, H, W of every layer).
    """
    x = jnp.asarray(x)
    check_inputs(x, config)
    _check_params(params, config)
    _check_states(states, config, x.shape[0])
    s_prev = normalize(x, config)
    total = jnp.zeros((x.shape[0],), states[0].dtype)
    nc = config.num_conv
    for i in range(nc):
        w, b = params[i]
        u = maxpool2(conv(s_prev, w, config.paddings[i], config.conv) + b, config.pool)
        total = total + jnp.sum(u * states[i], axis=(1, 2, 3))
        s_prev = states[i]
    num_fc_neurons = len(config.fc) + (config.output == "mse")
    for j in range(num_fc_neurons):
        w, b = params[nc + j]
        u = s_prev.reshape(s_prev.shape[0], -1) @ w + b
        total = total + jnp.sum(u * states[nc + j], axis=-1)
        s_prev = states[nc + j]
    if y is None:
        if not (isinstance(beta, int | float) and beta == 0):
            raise ValueError("Phi: labels y are required when beta is not the constant 0.")
        return total
    return total - beta * loss(params, states, jnp.asarray(y), config)


def state_grad(
    params: Params,
    x: ArrayLike,
    states: States,
    *,
    config: EnergyConfig,
    beta: ArrayLike = 0.0,
    y: ArrayLike | None = None,
) -> States:
    """dPhi/ds for every neuron layer (per example, since examples do not interact)."""
    return jax.grad(lambda s: jnp.sum(Phi(params, x, s, config=config, beta=beta, y=y)))(states)


def step(
    params: Params,
    x: ArrayLike,
    states: States,
    *,
    config: EnergyConfig,
    beta: ArrayLike = 0.0,
    y: ArrayLike | None = None,
) -> States:
    """One synchronous EP update of all layers: s <- sigma(dPhi/ds (x, s, beta))."""
    sigma = get_activation(config.activation)
    grads = state_grad(params, x, states, config=config, beta=beta, y=y)
    return tuple(sigma(g) for g in grads)
