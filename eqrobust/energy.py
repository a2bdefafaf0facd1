"""Hopfield-like convolutional energy Phi of EP-CNNs: the EP model's only definition."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from eqrobust import ops
from eqrobust.ops import conv

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


def _clip_slope(lo: float, hi: float, slope: float) -> Callable[[Array], Array]:
    return lambda s: jnp.where((s > lo) & (s < hi), slope, 0.0).astype(s.dtype)


# sigma'(u) as a function of s = sigma(u), where it is one, for the reverse loop of
# `run_sync` (which then tapes the states instead of the slopes). At a kink of a hard sigmoid
# (u exactly where the clip starts) autodiff takes half the slope and this zero: both are
# subgradients, and a drive lands exactly on a kink with probability zero.
SLOPE_OF_OUTPUT: dict[str, Callable[[Array], Array]] = {
    "my_hard_sig": _clip_slope(0.0, 1.0, 0.5),
    "hard_sigmoid": _clip_slope(0.0, 1.0, 1.0),
    "ctrd_hard_sig": _clip_slope(-0.5, 0.5, 1.0),
    "my_sigmoid": lambda s: 4.0 * s * (1.0 - s),
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
POOL_IMPLS = ops.POOL_IMPLS
CONV_IMPLS = ops.CONV_IMPLS


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
      pool: max-pool formulation, "reduce_window" (lax.reduce_window), "reshape" (max over a
        strided-slice view, custom first-maximum VJP) or "auto" (default: the fastest measured
        on the backend, `ops.resolve_impl`; reshape on CPU and GPU); same values and gradients.
      conv: convolution formulation, "xla" (lax.conv_general_dilated, cuDNN on GPU), "patches"
        (k*k shifted slices concatenated, then one matmul; several times faster on CPU),
        "xla_flip" (`ops.conv`) or "auto" (default: patches on CPU for every layer, xla on
        accelerators; `conv_impl`); same values up to rounding.
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
    pool: str = "auto"
    conv: str = "auto"

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


def maxpool2(u: Array, impl: str = "reduce_window") -> Array:
    """2x2/stride-2 max pool, first-maximum gradient: `eqrobust.ops.max_pool_2x2`.

    u: [B, H, W, C] -> [B, H // 2, W // 2, C]. Kept for the energy's callers (default impl as
    before); `impl` is "reshape" or "reduce_window", see `ops.max_pool_2x2`.
    """
    return ops.max_pool_2x2(u, impl)


def normalize(x: Array, config: EnergyConfig) -> Array:
    """(x - mean) / std per channel; x: [B, H, W, C] in [0, 1]."""
    return ops.normalize(x, config.mean, config.std)


def check_inputs(x: Array, config: EnergyConfig) -> None:
    """Raises ValueError unless x is float [B, *config.in_shape] (and, when concrete, finite and
    in [0, 1]); see `ops.check_images`."""
    ops.check_images(x, config.in_shape, who="the EP energy")


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


def conv_impl(impl: str) -> str:
    """The EP energy's conv formulation: "auto" is "patches" on CPU for every layer, not
    `ops.conv`'s per-layer choice. With "xla_flip" for the cpu network's second conv, the
    training step was 1.22x faster, but PGD-20 through the free phase 1.12x slower and the
    prediction no faster (BUILD_NOTES "Convolutions by layer"); the attacks keep patches."""
    return "patches" if impl == "auto" and jax.default_backend() == "cpu" else impl


def pre_activation(params: Params, i: int, s_prev: Array, config: EnergyConfig) -> Array:
    """What synapse layer i feeds neuron layer i, before the max pool of a conv layer:
    conv_i(s_prev) + b_i ([B, H, W, C], pre-pool) or W_i flat(s_prev) + b_i ([B, F]).

    s_prev is neuron layer i - 1 (the normalised input for i = 0).
    """
    w, b = params[i]
    if i < config.num_conv:
        return conv(s_prev, w, config.paddings[i], conv_impl(config.conv)) + b
    return s_prev.reshape(s_prev.shape[0], -1) @ w + b


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
    for i, s in enumerate(states):
        u = pre_activation(params, i, s_prev, config)
        if i < config.num_conv:
            u = maxpool2(u, config.pool)
        total = total + jnp.sum(u * s, axis=tuple(range(1, s.ndim)))
        s_prev = s
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


def step_async(
    params: Params,
    x: ArrayLike,
    states: States,
    *,
    config: EnergyConfig,
    beta: ArrayLike = 0.0,
    y: ArrayLike | None = None,
) -> States:
    """One even/odd (asynchronous) update (Scellier et al. 2023): the neuron layers 1, 3, ...
    (`states[0]`, `states[2]`, ...) from the current states, then layers 2, 4, ... from those.

    A layer's dPhi/ds_l depends only on its neighbours s_{l-1}, s_{l+1}, so each half is exact
    block Gauss-Seidel; the fixed points are those of `step`. Costs two energy gradients (the
    unused halves of each are dead code for XLA), and typically needs far fewer steps.
    """
    sigma = get_activation(config.activation)
    for parity in (0, 1):
        grads = state_grad(params, x, states, config=config, beta=beta, y=y)
        states = tuple(
            sigma(g) if i % 2 == parity else s for i, (g, s) in enumerate(zip(grads, states))
        )
    return states


def _routes(pre: Array, i: int, config) -> tuple[Array, ...] | None:
    """The routes of layer i's max pool read at the pre-activation `pre` (None for fc layers)."""
    return ops.max_pool_2x2_routes(pre)[1] if i < config.num_conv else None


def _top_down(params: Params, i: int, s: Array, above: Array, routes, config) -> Array:
    """d/ds_i of <pool(pre_activation_{i+1}(s_i)), s_{i+1}>, the pool read through `routes`
    (layer i + 1's, from its current pre-activation): the synapse's transpose applied to the
    unpooled layer above. The forward inside the VJP is unused (affine synapse), so XLA drops
    it."""
    _, vjp = jax.vjp(lambda a: pre_activation(params, i + 1, a, config), s)
    g = above
    if routes is not None:
        shape = jax.eval_shape(lambda a: pre_activation(params, i + 1, a, config), s).shape
        g = ops.unpool_2x2(routes, above, shape)
    return vjp(g)[0]


def _half(params, states, pre, parity, config, beta, y) -> States:
    """Updates the neuron layers i with i % 2 == parity from the others: s_i <- sigma(dPhi/ds_i),
    dPhi/ds_i = pool(pre_i) + (top-down from layer i + 1, routed by pre_{i+1}) - beta dL/ds_i
    (the chain rule of `Phi`; pre_i and pre_{i+1} must be current for these layers)."""
    sigma = get_activation(config.activation)
    n = len(states)
    new = list(states)
    for i in range(parity, n, 2):
        d = ops.max_pool_2x2_routes(pre[i])[0] if i < config.num_conv else pre[i]
        if i + 1 < n:
            routes = _routes(pre[i + 1], i + 1, config)
            d = d + _top_down(params, i, states[i], states[i + 1], routes, config)
        if i == n - 1 and y is not None:  # the loss reads the last neuron layer only
            others = tuple(states[:-1])
            dl = jax.grad(lambda s: jnp.sum(loss(params, (*others, s), y, config)))
            d = d - beta * dl(states[i])
        new[i] = sigma(d)
    return tuple(new)


def from_zero(params: Params, x: ArrayLike, config: EnergyConfig, parity: int | None = None):
    """The first free-phase update from all-zero states, without the convs of zeros: layer i
    gets sigma(pool(pre_i)) with pre_0 from x and pre_i = b_i for i >= 1 (a conv of zeros is
    exactly zero, and so is every top-down term). Bitwise equal to `step` from
    `zero_states` (parity None), or to the first half of `step_async` (parity 0: the other
    layers stay zero). [B, ...] states like `zero_states`."""
    x = jnp.asarray(x)
    sigma = get_activation(config.activation)
    first = pre_activation(params, 0, normalize(x, config), config)
    out = []
    for i, shp in enumerate(config.state_shapes):
        if parity is not None and i % 2 != parity:
            out.append(jnp.zeros((x.shape[0], *shp), first.dtype))
        elif i == 0:
            out.append(sigma(maxpool2(first, config.pool) if config.num_conv else first))
        else:
            b = params[i].b.astype(first.dtype)
            out.append(jnp.broadcast_to(sigma(b), (x.shape[0], *shp)))
    return tuple(out)


def run_async(
    params: Params,
    x: ArrayLike,
    states: States | None,
    steps: int,
    *,
    config: EnergyConfig,
    beta: ArrayLike = 0.0,
    y: ArrayLike | None = None,
) -> States:
    """`steps` applications of `step_async` (even/odd sweeps), at about one synchronous step's
    cost per sweep: one loop.

    `step_async` differentiates Phi once per half, so every conv runs twice per sweep. Here the
    drives are assembled from the layers' pre-activations (`_half`, the chain rule of Phi;
    checked against `step_async` in float64 by the tests), and the loop is shifted by half a
    sweep, E (O E)^(steps-1) O, so that each iteration's convs read the states the previous
    iteration wrote: the routes of the pool that feeds layer i + 1 come from the same conv
    that the odd half just used. (Inside one iteration XLA:CPU would otherwise fuse the
    freshly computed layer into each of the k*k patch slices of the next conv, recomputing it
    k*k times.) The loop also carries the pre-activations of the even layers after the first
    two, so every conv and transpose runs once per sweep.

    Args:
      params, x, config, beta, y: as in `step`.
      states: initial neuron layers; None: all zero (the first half is then `from_zero`).
      steps: number of sweeps (>= 1, static).

    Returns:
      The states after `steps` sweeps; reverse-differentiable (the loop is a scan).
    """
    if steps < 1:
        raise ValueError(f"run_async: steps must be >= 1; got {steps}.")
    if y is None and not (isinstance(beta, int | float) and beta == 0):
        raise ValueError("run_async: labels y are required when beta is not the constant 0.")
    n = len(config.state_shapes)
    evens = range(2, n, 2)  # layers whose pre-activation the loop carries (deeper nets)
    x_norm = normalize(jnp.asarray(x), config)

    def pre_of(s, kept=()):
        kept = dict(zip(evens, kept))
        return [
            kept[i] if i in kept else pre_activation(params, i, s[i - 1] if i else x_norm, config)
            for i in range(n)
        ]

    def odd_even(_, carry):
        s, kept = carry  # kept: the even layers' pre-activations, current for s
        pre = pre_of(s, kept)
        s = _half(params, s, pre, 1, config, beta, y)
        for i in evens:  # the even layers' inputs just changed
            pre[i] = pre_activation(params, i, s[i - 1], config)
        return _half(params, s, pre, 0, config, beta, y), tuple(pre[i] for i in evens)

    if states is None:
        if y is not None:
            raise ValueError("run_async: a zero start is the free phase's (no labels).")
        states = from_zero(params, x, config, parity=0)
    else:
        states = _half(params, tuple(states), pre_of(states), 0, config, beta, y)
    kept = tuple(pre_activation(params, i, states[i - 1], config) for i in evens)
    states, kept = jax.lax.fori_loop(0, steps - 1, odd_even, (states, kept))
    return _half(params, states, pre_of(states, kept), 1, config, beta, y)


def _drives(params: Params, pre: list, states: States, routes: list, config) -> list[Array]:
    """dPhi/ds_i at beta = 0 for every neuron layer i: pool(pre_i) read through routes_i, plus
    the top-down term from layer i + 1 read through routes_{i+1} (pre_i None: no such term).

    For fixed routes this is linear in (pre, states). With pre the pre-activations of `states`
    (and their own routes) it is the synchronous drive, the same as `state_grad`; with pre the
    bias-free synapses applied to a tangent v and v in place of the states, it is the drive's
    Jacobian applied to v."""
    n = len(states)
    out = []
    for i in range(n):
        terms = []
        if pre[i] is not None:
            terms.append(pre[i] if routes[i] is None else ops.pool_by_routes(pre[i], routes[i]))
        if i + 1 < n:
            terms.append(_top_down(params, i, states[i], states[i + 1], routes[i + 1], config))
        out.append(terms[0] if len(terms) == 1 else terms[0] + terms[1])
    return out


def _loop_drives(params: Params, pre0: Array, routes0, s: States, config):
    """The synchronous drives dPhi/ds of states s (beta = 0) and the routes of every pool, given
    layer 0's pre-activation and routes (a function of the input only: constant in the loop)."""
    n = len(s)
    pre = [pre0] + [pre_activation(params, i, s[i - 1], config) for i in range(1, n)]
    routes = [routes0] + [_routes(u, i, config) for i, u in enumerate(pre) if i]
    return _drives(params, pre, s, routes, config), routes


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _sync_loop(params: Params, xn: Array, s0: States, steps: int, config) -> States:
    sigma = get_activation(config.activation)
    pre0 = pre_activation(params, 0, xn, config)
    routes0 = _routes(pre0, 0, config)
    body = lambda _, s: tuple(map(sigma, _loop_drives(params, pre0, routes0, s, config)[0]))  # noqa: E731
    return jax.lax.fori_loop(0, steps, body, tuple(s0))


def _slope(sigma: Callable[[Array], Array], d: Array) -> Array:
    """sigma'(d) elementwise (every activation of `get_activation` is elementwise), so that
    sigma's VJP at d is a product: one jvp with unit tangent, the same tie rules as autodiff."""
    return jax.jvp(sigma, (d,), (jnp.ones_like(d),))[1]


def _sync_loop_fwd(params, xn, s0, steps, config):
    """The loop, taping what the reverse loop reads: the routes of the pools after the first,
    the states s_0..s_steps when the activation's slope is a function of its output
    (`SLOPE_OF_OUTPUT`) or the params are differentiated, and otherwise the slopes
    sigma'(d_t) at the drives. The tape is written from the carry, one update late. On
    XLA:CPU the slopes cost ~1 ms per update more than the states (cpu network, batch 64):
    a second consumer of the drives splits the transposed conv's col2im sum into nine
    materialised terms, each summed twice; taping freshly computed values or carrying the
    drives instead of the states cost as much (BUILD_NOTES)."""
    params_p = any(leaf.perturbed for leaf in jax.tree.leaves(params))
    params, xn, s0 = jax.tree.map(lambda leaf: leaf.value, (params, xn, s0))
    sigma = get_activation(config.activation)
    by_output = config.activation in SLOPE_OF_OUTPUT
    pre0 = pre_activation(params, 0, xn, config)
    routes0 = _routes(pre0, 0, config)

    def update(s):  # s_t -> s_{t+1} and what the reverse loop reads of update t
        d, routes = _loop_drives(params, pre0, routes0, s, config)
        slopes = () if by_output else tuple(_slope(sigma, u) for u in d)
        return tuple(map(sigma, d)), (slopes, routes[1:])

    def put(buf, t, a):
        return jax.tree.map(lambda b, x: b.at[t].set(x), buf, a)

    def zeros(a, n):
        return jax.tree.map(lambda u: jnp.zeros((n, *u.shape), u.dtype), a)

    s, rec = update(tuple(s0))
    tape = zeros(rec, steps)
    states = put(zeros(s, steps + 1), 0, s0) if by_output or params_p else None

    def body(t, carry):  # update t; the tape gets update t - 1's record and s_t
        s, rec, tape, states = carry
        states = None if states is None else put(states, t, s)
        return (*update(s), put(tape, t - 1, rec), states)

    s, rec, tape, states = jax.lax.fori_loop(1, steps, body, (s, rec, tape, states))
    tape, states = put(tape, steps - 1, rec), None if states is None else put(states, steps, s)
    return s, (params, xn, routes0, tape, states, () if params_p else None)


def _sync_loop_bwd(steps, config, res, ct):
    """The reverse loop. The drive is dPhi/ds, so its Jacobian in the states is the Hessian of
    Phi, symmetric: the states' cotangent J^T v is the drive's Jacobian applied to v (the ops
    of a forward step, no transposed convs of transposed convs), v the cotangent times the
    update's slopes. Layer 0's routes are constant, so the input's cotangent is one
    transposed conv of the summed v_0. The params' cotangent (only when they are
    differentiated) is the VJP of the drive at the taped states."""
    params, xn, routes0, tape, states, params_p = res
    n = len(config.state_shapes)
    linear = tuple(Layer(layer.w, jnp.zeros_like(layer.b)) for layer in params)
    slope_of = SLOPE_OF_OUTPUT.get(config.activation)

    def back(t, carry):
        c, dp, v0 = carry
        slopes, routes = jax.tree.map(lambda buf: buf[t], tape)
        routes = [routes0, *routes]
        if slope_of is not None:  # from s_{t+1} = sigma(d_t)
            slopes = [slope_of(buf[t + 1]) for buf in states]
        v = [a * g for a, g in zip(slopes, c, strict=True)]
        if params_p is not None:  # at s_t, the input of update t
            s = [buf[t] for buf in states]
            dp = jax.tree.map(jnp.add, dp, _params_vjp(params, xn, s, routes, v, config))
        pre_v = [None] + [pre_activation(linear, i, v[i - 1], config) for i in range(1, n)]
        return tuple(_drives(linear, pre_v, v, routes, config)), dp, v0 + v[0]

    c = tuple(jnp.zeros(g.aval.shape, g.aval.dtype) if _zero(g) else g for g in ct)
    carry = (c, jax.tree.map(jnp.zeros_like, params), jnp.zeros_like(c[0]))
    c, dp, v0 = jax.lax.fori_loop(0, steps, lambda k, a: back(steps - 1 - k, a), carry)
    return dp, _top_down(params, -1, xn, v0, routes0, config), c


def _params_vjp(params: Params, xn: Array, s: States, routes: list, v: list, config) -> Params:
    """(d drives / d params)^T v at the states s, the pools read through `routes`."""

    def drives(p):
        pre = [pre_activation(p, i, s[i - 1] if i else xn, config) for i in range(len(s))]
        return _drives(p, pre, s, routes, config)

    return jax.vjp(drives, params)[1](v)[0]


def _zero(g) -> bool:
    return isinstance(g, jax.custom_derivatives.SymbolicZero)


_sync_loop.defvjp(_sync_loop_fwd, _sync_loop_bwd, symbolic_zeros=True)


def run_sync(
    params: Params, x: ArrayLike, states: States | None, steps: int, *, config: EnergyConfig
) -> States:
    """`steps` synchronous free-phase updates (`step`, beta = 0) from `states` (None: zeros,
    the first update then `from_zero`), with a hand-written reverse loop for backpropagation
    through time: each backward step runs the ops of one forward step (the update's Jacobian
    is symmetric up to the activation, see `_sync_loop_bwd`), where autodiff of `step`
    differentiates a gradient (~1.6x slower on the cpu network, BUILD_NOTES). Values and
    gradients are those of the plain loop of `step` (tests compare them in float64), except
    where a drive lies exactly on a hard sigmoid's kink (`SLOPE_OF_OUTPUT`). Reverse-mode
    only.

    Args:
      params, x, config: as in `step`; x [B, H, W, C] in [0, 1].
      states: initial neuron layers, or None.
      steps: number of updates (>= 1, static).

    Returns:
      The states after `steps` updates.
    """
    if steps < 1:
        raise ValueError(f"run_sync: steps must be >= 1; got {steps}.")
    x = jnp.asarray(x)
    if states is None:
        states, steps = from_zero(params, x, config), steps - 1
    if steps == 0:
        return tuple(states)
    return _sync_loop(params, normalize(x, config), tuple(states), steps, config)


UPDATES: dict[str, Callable[..., States]] = {"sync": step, "async": step_async}


def step_flops(config: EnergyConfig, batch: int) -> float:
    """FLOPs (2 per multiply-add) of one synchronous free-phase step on `batch` examples: every
    conv / fc forward once, plus the transposed conv / fc feeding each neuron layer from the one
    above (none into the input). The floor that benchmarks divide by a measured matmul rate; it
    matches XLA's cost analysis of the patches formulation to within a few % (tests/test_energy.py).
    """
    flops, h, w, cin = 0.0, *config.in_shape
    k = config.kernel_size
    for i, (c, p) in enumerate(zip(config.channels, config.paddings, strict=True)):
        hc, wc = h + 2 * p - k + 1, w + 2 * p - k + 1
        f = 2.0 * hc * wc * k * k * cin * c
        flops += f * (2 if i > 0 else 1)
        h, w, cin = hc // 2, wc // 2, c
    fin = h * w * cin
    outputs = (*config.fc, *((config.num_classes,) if config.output == "mse" else ()))
    for j, f in enumerate(outputs):
        flops += 2.0 * fin * f * (2 if (j > 0 or config.channels) else 1)
        fin = f
    return flops * batch
