"""Shared low-level ops: convolution, 2x2 max pool, normalisation, input checks, chunked runs."""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from tqdm.auto import tqdm

from eqrobust import compile_options

Array = jax.Array

CONV_IMPLS = ("auto", "xla", "patches", "xla_flip")
POOL_IMPLS = ("auto", "reshape", "reduce_window")

# "auto" picks the formulation measured fastest on the backend the program is traced for (CPU,
# accelerator): on XLA:CPU the strided-slice pool, several times faster in while loops
# (benchmarks/ep_free_phase.py), and the conv by layer (`FLIP_MIN_CIN`); on an H100, cuDNN's
# conv and again the strided-slice pool (EP free phase 1729 steps/s vs 1591 with reduce_window,
# 1362 with patches; benchmarks/gpu.py, BUILD_NOTES "Paper scale on one GPU"). Every choice
# computes the same function and gradient.
_ACCELERATOR = {"conv": "xla", "pool": "reshape"}

# "auto" on XLA:CPU, per layer: a conv with at least FLIP_MIN_CIN input channels, "same"
# padding (2 p = k - 1, so its input gradient is a same-padded conv too) and an input of at
# least FLIP_MIN_SIZE pixels a side runs as "xla_flip"; any other as "patches". Per conv inside
# a while loop (16 -> 32 channels at 14 x 14) the flipped form's forward is ~2.4x the patches
# form's and its input gradient as fast; with 1 or 3 input channels XLA:CPU's convolution is
# 1.5-3x slower than patches. Its input gradient with padding k - 1 - p = 2 (an unpadded
# forward) at 4 x 4 is 3-62x slower than patches' (64 or 512 channels at batch 4 or 64; 512 ->
# 512 at 4 x 4 is the paper networks' last conv), and at 4 x 4 even a same-padded one is 1.5x
# slower. Whole models: PGD through the DEQ 1.5x faster than with patches and 2.65x than with
# "xla"; the BP-CNN's AutoAttack unchanged (BUILD_NOTES "Convolutions by layer" and "The
# per-layer rule refined").
FLIP_MIN_CIN = 8
FLIP_MIN_SIZE = 7


class ConvShape(NamedTuple):
    """What the CPU's per-layer choice reads of a stride-1 conv: input channels, kernel side,
    zero padding per side and the input's smaller spatial side."""

    c_in: int
    kernel: int
    padding: int
    size: int


def resolve_impl(kind: str, impl: str, shape: ConvShape | None = None) -> str:
    """The concrete formulation of `impl` ("auto" -> by `jax.default_backend()` and layer).

    Args:
        kind: "conv" or "pool".
        impl: a member of CONV_IMPLS / POOL_IMPLS.
        shape: the conv's `ConvShape` (needed for kind "conv" with impl "auto").

    Returns:
        impl itself, or for "auto": the accelerator's choice off CPU; on CPU the
        strided-slice pool ("reshape"), and "xla_flip" for convs with >= FLIP_MIN_CIN input
        channels, same padding and inputs of >= FLIP_MIN_SIZE a side, "patches" for others.
    """
    if impl != "auto":
        return impl
    if jax.default_backend() != "cpu":
        return _ACCELERATOR[kind]
    if kind == "pool":
        return "reshape"
    if shape is None:
        raise ValueError("resolve_impl: conv 'auto' on CPU depends on the conv's ConvShape.")
    flip = (
        shape.c_in >= FLIP_MIN_CIN
        and 2 * shape.padding == shape.kernel - 1
        and shape.size >= FLIP_MIN_SIZE
    )
    return "xla_flip" if flip else "patches"


# --------------------------------------------------------------------------- convolution


def conv(x: Array, w: Array, padding: int, impl: str = "auto") -> Array:
    """Stride-1 NHWC convolution with symmetric zero padding.

    Args:
        x: [B, H, W, C_in].
        w: [k, k, C_in, C_out] (HWIO).
        padding: zero padding on each side of H and W.
        impl: "xla" (lax.conv_general_dilated; cuDNN on GPU), "patches" (k*k shifted slices
            concatenated, then one matmul; much faster than "xla" on CPU inside while loops),
            "xla_flip" (lax.conv with the input gradient as a forward lax.conv, `_conv_flip`;
            not forward-mode differentiable) or "auto" (by backend and layer, `resolve_impl`).
            Same values and gradients up to rounding.

    Returns:
        [B, H + 2 p - k + 1, W + 2 p - k + 1, C_out].
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}; got {impl!r}.")
    impl = resolve_impl("conv", impl, ConvShape(w.shape[2], w.shape[0], padding, min(x.shape[1:3])))
    if impl == "patches":
        k = w.shape[0]
        sp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
        ho, wo = sp.shape[1] - k + 1, sp.shape[2] - k + 1
        cols = [sp[:, i : i + ho, j : j + wo] for i in range(k) for j in range(k)]
        # [B, Ho, Wo, k*k*Cin] @ [k*k*Cin, Cout]; the (i, j, c) order matches HWIO's reshape.
        return jnp.concatenate(cols, axis=-1) @ w.reshape(-1, w.shape[-1])
    dtype = jnp.result_type(x, w)  # lax.conv needs one dtype (the matmul above promotes)
    x, w = x.astype(dtype), w.astype(dtype)
    if impl == "xla_flip" and padding <= w.shape[0] - 1:
        return _conv_flip(x, w, padding)
    return _lax_conv(x, w, padding)


def _lax_conv(x: Array, w: Array, padding: int) -> Array:
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), [(padding, padding)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_flip(x: Array, w: Array, padding: int) -> Array:
    """`_lax_conv` whose input gradient is the forward conv of the cotangent with the kernel
    flipped in space and transposed in channels, padding k - 1 - p: the numbers of JAX's
    transpose rule, but XLA:CPU runs that rule's form (reversed kernel, swapped kernel
    dimensions) ~50x slower inside while loops and this one at forward speed (BUILD_NOTES)."""
    return _lax_conv(x, w, padding)


def _conv_flip_fwd(x: Array, w: Array, padding: int):
    return _lax_conv(x, w, padding), (x, w)


def _conv_flip_bwd(padding: int, res, g: Array):
    x, w = res
    dx = _lax_conv(g, jnp.flip(w, (0, 1)).swapaxes(2, 3), w.shape[0] - 1 - padding)
    # The kernel's gradient (training; XLA drops it when unused) by JAX's own rule.
    dw = jax.vjp(lambda w: _lax_conv(x, w, padding), w)[1](g)[0]
    return dx, dw


_conv_flip.defvjp(_conv_flip_fwd, _conv_flip_bwd)


# --------------------------------------------------------------------------- max pool
# Tie rule (one for every model): the gradient of a 2x2 window goes to its FIRST maximum in
# row-major order (top-left, top-right, bottom-left, bottom-right), like PyTorch's max_pool2d
# and XLA's select_and_scatter. Autodiff of jnp.max would split it between tied entries
# instead; ties are common (a constant image background gives equal conv outputs, ReLU zeros).


@jax.custom_vjp
def _pool_first(u: Array) -> Array:
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
    # Interleave by stack + reshape (cheap) rather than scattering into strided slices.
    top = jnp.stack([e00, e01], axis=3)  # [B, h, w, 2, C]
    bot = jnp.stack([e10, e11], axis=3)
    return (jnp.stack([top, bot], axis=2).reshape(b, 2 * h, 2 * w, c),)


_pool_first.defvjp(_pool_fwd, _pool_bwd)


def _crop_even(u: Array) -> Array:
    """u [B, H, W, C] without an odd trailing row / column (the pools' floor mode)."""
    _, h, w, _ = u.shape
    return u[:, : 2 * (h // 2), : 2 * (w // 2)]


def max_pool_2x2(u: Array, impl: str = "auto") -> Array:
    """2x2 / stride-2 max pool (floor mode: odd trailing rows/cols dropped).

    Values equal ``nnx.max_pool(u, (2, 2), strides=(2, 2))``. The gradient of each window goes to
    its first maximum in row-major order (see the tie rule above), for both formulations.

    Args:
        u: [B, H, W, C].
        impl: "reshape" (strided slices + elementwise max with a custom first-maximum VJP made of
            elementwise ops; default, several times faster inside XLA:CPU while loops, see
            BUILD_NOTES), "reduce_window" (lax.reduce_window; gradient by select_and_scatter) or
            "auto" (by backend, `resolve_impl`). Same values and gradients. Not forward-mode
            differentiable with "reshape".

    Returns:
        [B, H // 2, W // 2, C].
    """
    if impl not in POOL_IMPLS:
        raise ValueError(f"max pool impl must be one of {POOL_IMPLS}; got {impl!r}.")
    if resolve_impl("pool", impl) == "reduce_window":
        return jax.lax.reduce_window(u, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return _pool_first(_crop_even(u))


def max_pool_2x2_routes(u: Array) -> tuple[Array, tuple[Array, ...]]:
    """The 2x2 / stride-2 max pool and its routes: the four [B, H // 2, W // 2, C] boolean masks
    marking each window's first maximum (row-major: top-left, top-right, bottom-left,
    bottom-right; the tie rule above), i.e. where `max_pool_2x2`'s gradient goes.

    u: [B, H, W, C] (odd trailing rows/cols dropped, floor mode). Not differentiable (use
    `max_pool_2x2` for that); for callers that keep the routes and apply `unpool_2x2` later.
    """
    return _pool_fwd(_crop_even(u))


def pool_by_routes(u: Array, routes: tuple[Array, ...]) -> Array:
    """u [B, H, W, C] read through a max pool's routes (`max_pool_2x2_routes`): each window's
    routed entry, [B, H // 2, W // 2, C]. With u's own routes this is `max_pool_2x2(u)`,
    bitwise; for fixed routes it is linear in u, the transpose of `unpool_2x2`."""
    u = _crop_even(u)
    parts = (u[:, 0::2, 0::2], u[:, 0::2, 1::2], u[:, 1::2, 0::2], u[:, 1::2, 1::2])
    z = jnp.zeros((), u.dtype)
    out = [jnp.where(e, a, z) for e, a in zip(routes, parts, strict=True)]
    return (out[0] + out[1]) + (out[2] + out[3])


def unpool_2x2(routes: tuple[Array, ...], g: Array, shape: tuple[int, ...]) -> Array:
    """Transpose of the routed max pool: g [B, h, w, C] into each window's first maximum, zero
    elsewhere, as [B, H, W, C] = `shape` (the pre-pool shape; a dropped odd row/col gets zeros).
    Equals the VJP of `max_pool_2x2` at the input the routes came from."""
    (out,) = _pool_bwd(routes, g)
    dh, dw = shape[1] - out.shape[1], shape[2] - out.shape[2]
    if dh or dw:
        out = jnp.pad(out, ((0, 0), (0, dh), (0, dw), (0, 0)))
    return out


# --------------------------------------------------------------------------- inputs


def normalize(x: Array, mean: ArrayLike, std: ArrayLike) -> Array:
    """(x - mean) / std per channel, in x's dtype. x: [..., C]; mean, std: scalar or [C]."""
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


@compile_options.jit
def _image_stats(x: Array) -> tuple[Array, Array, Array]:
    """(number of non-finite values, min and max over the finite values) in one pass."""
    finite = jnp.isfinite(x)
    lo = jnp.min(jnp.where(finite, x, jnp.inf))
    hi = jnp.max(jnp.where(finite, x, -jnp.inf))
    return jnp.sum(~finite), lo, hi


def check_labels(
    y: ArrayLike, batch: int, num_classes: int | None = None, who: str = "model"
) -> Array:
    """Validates a batch of class labels at a public boundary; returns them as int32.

    Checks: shape [batch], an integer dtype, and on concrete (non-traced) arrays every label in
    [0, num_classes) (or >= 0 when num_classes is None). An out-of-range label would otherwise
    be read as "misclassified" or clipped silently by one_hot / take_along_axis.

    Raises:
        ValueError: naming the offending labels.
    """
    y = jnp.asarray(y)
    if y.shape != (batch,) or not jnp.issubdtype(y.dtype, jnp.integer):
        raise ValueError(
            f"{who} expects int labels [B] = [{batch}], got shape {tuple(y.shape)} dtype {y.dtype}"
        )
    if not isinstance(y, jax.core.Tracer) and y.size:
        with jax.ensure_compile_time_eval():
            lo, hi = (int(v) for v in jax.device_get((jnp.min(y), jnp.max(y))))
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            k = "?" if num_classes is None else num_classes
            raise ValueError(
                f"{who} got labels in [{lo}, {hi}]; labels must be in [0, {k})"
                + (f" for this {num_classes}-class model" if num_classes is not None else "")
            )
    return y.astype(jnp.int32)


def check_images(x: ArrayLike, in_shape: Sequence[int] | None = None, who: str = "model") -> Array:
    """Validates a batch of images at a public boundary and returns it as a jax array.

    Checks: 4-d ``[B, H, W, C]`` (and ``(H, W, C) == in_shape`` when given), a floating dtype,
    and, on concrete (non-traced) arrays only, finite values in ``[0, 1]``.

    Args:
        x: [B, H, W, C] float images in [0, 1].
        in_shape: expected per-example shape (H, W, C), or None for any.
        who: the caller's name, for error messages.

    Returns:
        ``jnp.asarray(x)`` (unchanged values and dtype).

    Raises:
        ValueError: saying what was expected and how to fix it.
    """
    x = jnp.asarray(x)
    want = "B, H, W, C" if in_shape is None else ", ".join(["B", *map(str, in_shape)])
    if x.ndim != 4 or (in_shape is not None and tuple(x.shape[1:]) != tuple(in_shape)):
        raise ValueError(
            f"Expected images [{want}] (NHWC, float in [0, 1]) for {who}; "
            f"got shape {tuple(x.shape)}."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"{who} expects float images in [0, 1], got dtype {x.dtype}; "
            "convert uint8 with eqrobust.data.to_float."
        )
    if not isinstance(x, jax.core.Tracer) and x.size:
        # A concrete x can still meet an outer trace (a constant closed over by a jitted fn):
        # evaluate the check now rather than staging it into that program.
        with jax.ensure_compile_time_eval():
            bad, lo, hi = (float(v) for v in jax.device_get(_image_stats(x)))
        if bad:
            raise ValueError(
                f"{who} got {int(bad)} NaN/inf pixel value(s) in images of shape "
                f"{tuple(x.shape)}; images must be finite floats in [0, 1]."
            )
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(
                f"{who} expects images in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                "normalisation is part of the model, pass raw [0, 1] pixels."
            )
    return x


# --------------------------------------------------------------------------- chunked runs


def run_chunked(
    fn: Callable[..., Any],
    *arrays: ArrayLike,
    batch_size: int,
    key: Array | None = None,
    desc: str = "",
    progress: bool = False,
    postfix: Callable[[list[Any]], dict[str, Any]] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Any:
    """Applies ``fn`` to fixed-size chunks of ``arrays`` and concatenates the results on the host.

    Every chunk has ``min(batch_size, N)`` examples: the last one is padded by repeating its final
    example and the padded outputs are dropped, so one compiled ``fn`` serves all chunks.

    Args:
        fn: ``fn(*chunks) -> out`` or, when ``key`` is given, ``fn(*chunks, fold_in(key, i))`` for
            chunk ``i``; chunks are jax arrays ``[b, ...]``; ``out`` is an array ``[b, ...]`` or a
            NamedTuple/tuple of them.
        *arrays: arrays ``[N, ...]`` (NumPy or jax) with the same ``N > 0``.
        batch_size: chunk size (>= 1).
        key: PRNG key, folded with the chunk index.
        desc: progress bar label.
        progress: show a tqdm bar (unit: examples).
        postfix: ``postfix(outs) -> dict`` shown on the bar after each chunk, where ``outs`` is the
            list of (unpadded, host) chunk results so far.
        devices: with several, the chunks are made small enough that every device gets one
            (``chunk_size``), chunk ``i`` is committed to ``devices[i % D]`` and the chunks run
            concurrently, one thread per device (e.g. XLA:CPU split into host devices by
            ``eqrobust.host.split_cpu``); ``fn`` must then place its own committed arrays, e.g.
            weights, on its chunk's device (``place``). None or one device: one chunk after
            another.

    Returns:
        ``out``'s structure with NumPy leaves ``[N, ...]``.
    """
    if not arrays:
        raise ValueError("run_chunked: pass at least one array [N, ...].")
    arrays = tuple(a if isinstance(a, np.ndarray | jax.Array) else np.asarray(a) for a in arrays)
    n = arrays[0].shape[0] if arrays[0].ndim else 0
    if n == 0 or any(a.ndim == 0 or a.shape[0] != n for a in arrays):
        raise ValueError(
            "run_chunked: arrays need one leading axis of the same length N > 0; got shapes "
            f"{[tuple(a.shape) for a in arrays]}."
        )
    if not (isinstance(batch_size, int | np.integer) and batch_size >= 1):
        raise ValueError(f"run_chunked: batch_size must be an int >= 1, got {batch_size!r}.")
    devs = list(devices or ())
    bs = chunk_size(n, batch_size, len(devs))

    def one(i: int, start: int) -> Any:
        m = min(bs, n - start)
        chunks = []
        for a in arrays:
            c = a[start : start + m]
            if m < bs:  # pad with copies of the last example: same shapes, same compiled fn
                lib = np if isinstance(c, np.ndarray) else jnp
                c = lib.concatenate([c, lib.repeat(c[-1:], bs - m, axis=0)])
            chunks.append(jax.device_put(c, devs[i % len(devs)]) if devs else jnp.asarray(c))
        out = fn(*chunks) if key is None else fn(*chunks, jax.random.fold_in(key, i))
        return jax.tree.map(lambda o: np.asarray(o)[:m], jax.device_get(out))

    starts = list(range(0, n, bs))
    # Pool threads start with an empty context: run each chunk in a copy of the caller's, so
    # `compile_options.options` (and any other context variable) reaches the programs.
    caller = contextvars.copy_context()

    def in_context(i: int, start: int) -> Any:
        return caller.copy().run(one, i, start)

    outs: list[Any] = []
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    with ThreadPoolExecutor(len(devs)) if len(devs) > 1 else nullcontext() as pool:
        results = (
            pool.map(in_context, range(len(starts)), starts)  # in order, as each finishes
            if pool is not None
            else (one(i, start) for i, start in enumerate(starts))
        )
        for start, out in zip(starts, results, strict=True):
            outs.append(out)
            bar.update(min(bs, n - start))
            if postfix is not None:
                bar.set_postfix(postfix(outs))
    bar.close()
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)


def chunk_size(n: int, batch_size: int, num_devices: int = 1) -> int:
    """The chunk size `run_chunked` uses for n examples: batch_size, capped at n and, with
    several devices, at ceil(n / num_devices) so that every device gets a chunk."""
    bs = min(int(batch_size), n)
    return min(bs, -(-n // num_devices)) if num_devices > 1 else bs


def place(tree: Any, device: jax.Device) -> Any:
    """`tree` with its jax arrays copied to `device` (other leaves, e.g. functions, unchanged)."""
    return jax.tree.map(
        lambda v: jax.device_put(v, device) if isinstance(v, jax.Array) else v, tree
    )


def device_of(x: jax.Array) -> jax.Device:
    """The one device holding `x`."""
    return next(iter(x.devices()))
