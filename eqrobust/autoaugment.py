"""AutoAugment with the CIFAR-10 policy (Cubuk et al. 2019) in pure JAX on uint8 image batches.

The 25 sub-policies and the magnitude ranges are those of the paper's CIFAR-10 policy as used by
the common PyTorch port (DeepVoltaire's `CIFAR10Policy`, also what the small-ViT CIFAR recipe
uses): per image, one sub-policy is drawn uniformly; each of its two operations is applied with
its probability; magnitudes come from 10 bins; geometric and enhancement ops get a random sign.
Geometric ops fill with grey (128). Everything is a pure function of the key, vmapped per
example and jit-compatible (under vmap every op of the 14 is evaluated and one is selected).

Differences from the PIL reference: the affine ops (shear, translate, rotate) sample with nearest
neighbour (PIL: bicubic for shear); enhancement blends round to nearest (PIL truncates).

Grayscale (one channel, e.g. Fashion-MNIST): the ops act on the single channel as PIL does on an
"L" image. `Color` (saturation) blends the image with its own grayscale version, which is the image
itself, so it is the identity. Brightness, Contrast (blend with the mean grey level), Sharpness,
Solarize, Posterize, Invert, AutoContrast and Equalize act on the one channel exactly as they act
on each channel of an RGB image (Contrast and Color use the ITU-R 601 luma for RGB).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

OPS = (
    "shearX",
    "shearY",
    "translateX",
    "translateY",
    "rotate",
    "color",
    "posterize",
    "solarize",
    "contrast",
    "sharpness",
    "brightness",
    "autocontrast",
    "equalize",
    "invert",
)

# Magnitude of bin m (0..9) for each op; the signed ops use +-value at random.
RANGES = {
    "shearX": np.linspace(0, 0.3, 10),
    "shearY": np.linspace(0, 0.3, 10),
    "translateX": np.linspace(0, 150 / 331, 10),  # fraction of the image width
    "translateY": np.linspace(0, 150 / 331, 10),
    "rotate": np.linspace(0, 30, 10),  # degrees
    "color": np.linspace(0.0, 0.9, 10),
    "posterize": np.round(np.linspace(8, 4, 10)),  # bits kept
    "solarize": np.linspace(256, 0, 10),  # threshold
    "contrast": np.linspace(0.0, 0.9, 10),
    "sharpness": np.linspace(0.0, 0.9, 10),
    "brightness": np.linspace(0.0, 0.9, 10),
    "autocontrast": np.zeros(10),
    "equalize": np.zeros(10),
    "invert": np.zeros(10),
}
SIGNED = ("shearX", "shearY", "translateX", "translateY", "rotate")
ENHANCE = ("color", "contrast", "sharpness", "brightness")  # factor 1 +- magnitude

# (p1, op1, magnitude bin 1, p2, op2, magnitude bin 2): the CIFAR-10 policy.
CIFAR10_POLICY = (
    (0.1, "invert", 7, 0.2, "contrast", 6),
    (0.7, "rotate", 2, 0.3, "translateX", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3),
    (0.5, "shearY", 8, 0.7, "translateY", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2),
    (0.2, "shearY", 7, 0.3, "posterize", 7),
    (0.4, "color", 3, 0.6, "brightness", 7),
    (0.3, "sharpness", 9, 0.7, "brightness", 9),
    (0.6, "equalize", 5, 0.5, "equalize", 1),
    (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translateX", 8),
    (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translateY", 3, 0.2, "sharpness", 6),
    (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3),
    (0.2, "equalize", 0, 0.6, "autocontrast", 0),
    (0.2, "equalize", 8, 0.6, "equalize", 4),
    (0.9, "color", 9, 0.6, "equalize", 6),
    (0.8, "autocontrast", 4, 0.2, "solarize", 8),
    (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3),
    (0.9, "translateY", 9, 0.7, "translateY", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3),
    (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translateY", 9, 0.9, "autocontrast", 1),
)
FILL = 128.0


def _u8(img: Array) -> Array:
    return jnp.clip(jnp.round(img), 0, 255).astype(jnp.uint8)


def _blend(degenerate: Array, img: Array, factor: Array) -> Array:
    """PIL Image.blend(degenerate, img, factor) on float images, clipped to [0, 255]."""
    return jnp.clip(degenerate + factor * (img - degenerate), 0.0, 255.0)


def _gray(img: Array) -> Array:
    """[H, W, C] float -> [H, W, 1] luma (ITU-R 601; the image itself for one channel)."""
    if img.shape[-1] == 1:
        return img
    return (img @ jnp.asarray([0.299, 0.587, 0.114], img.dtype))[..., None]


def affine(img: Array, matrix: Array) -> Array:
    """Inverse-mapped affine warp about the image centre, nearest neighbour, grey fill.

    Args:
        img: [H, W, C] float.
        matrix: [2, 3]; output pixel (x, y) (centred) samples input (A @ (x, y) + t).
    """
    h, w, _ = img.shape
    ys, xs = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
    )
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    xc, yc = xs - cx, ys - cy
    src_x = matrix[0, 0] * xc + matrix[0, 1] * yc + matrix[0, 2] + cx
    src_y = matrix[1, 0] * xc + matrix[1, 1] * yc + matrix[1, 2] + cy
    ix, iy = jnp.round(src_x).astype(jnp.int32), jnp.round(src_y).astype(jnp.int32)
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    out = img[jnp.clip(iy, 0, h - 1), jnp.clip(ix, 0, w - 1)]
    return jnp.where(inside[..., None], out, FILL)


def _sharpness(img: Array, factor: Array) -> Array:
    # PIL SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13) on the interior; the border is kept.
    h, w, _ = img.shape
    k = jnp.asarray([[1, 1, 1], [1, 5, 1], [1, 1, 1]], jnp.float32) / 13.0
    pad = jnp.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    smooth = sum(k[i, j] * pad[i : i + h, j : j + w] for i in range(3) for j in range(3))
    smooth = jnp.round(smooth)
    border = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
    return _blend(jnp.where(border, smooth, img), img, factor)


def _autocontrast(img: Array) -> Array:
    lo = jnp.min(img, axis=(0, 1), keepdims=True)
    hi = jnp.max(img, axis=(0, 1), keepdims=True)
    scale = jnp.where(hi > lo, 255.0 / jnp.maximum(hi - lo, 1.0), 1.0)
    return jnp.where(hi > lo, (img - lo) * scale, img)


def _equalize_channel(c: Array) -> Array:
    # PIL ImageOps.equalize: lut[i] = (step // 2 + sum(hist[:i])) // step, step from all but the
    # last non-empty bin; identity when step == 0.
    idx = c.astype(jnp.int32)
    hist = jnp.zeros(256, jnp.int32).at[idx.ravel()].add(1)
    last = jnp.max(jnp.where(hist > 0, jnp.arange(256), 0))
    step = (jnp.sum(hist) - hist[last]) // 255
    cum = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(hist)[:-1]])
    lut = jnp.clip((step // 2 + cum) // jnp.maximum(step, 1), 0, 255)
    return jnp.where(step > 0, lut[idx], idx).astype(jnp.float32)


def _apply_op(op: Array, v: Array, img: Array) -> Array:
    """Operation number `op` (index into OPS) with signed magnitude v on a float [H, W, C] image."""
    h, w, _ = img.shape
    rad = jnp.deg2rad(v)
    cos, sin = jnp.cos(rad), jnp.sin(rad)
    one, zero = jnp.ones(()), jnp.zeros(())

    def mat(*rows: Array) -> Array:
        return jnp.asarray(rows, jnp.float32).reshape(2, 3)

    branches = [
        lambda im: affine(im, mat(one, v, zero, zero, one, zero)),  # shearX
        lambda im: affine(im, mat(one, zero, zero, v, one, zero)),  # shearY
        lambda im: affine(im, mat(one, zero, v * w, zero, one, zero)),  # translateX
        lambda im: affine(im, mat(one, zero, zero, zero, one, v * h)),  # translateY
        lambda im: affine(im, mat(cos, sin, zero, -sin, cos, zero)),  # rotate (counterclockwise)
        lambda im: _blend(jnp.broadcast_to(_gray(im), im.shape), im, v),  # color
        lambda im: jnp.bitwise_and(  # posterize: keep the top v bits
            im.astype(jnp.int32), 256 - 2 ** (8 - v.astype(jnp.int32))
        ).astype(jnp.float32),
        lambda im: jnp.where(im >= v, 255.0 - im, im),  # solarize
        lambda im: _blend(jnp.round(jnp.mean(_gray(im))) * jnp.ones_like(im), im, v),  # contrast
        lambda im: _sharpness(im, v),
        lambda im: _blend(jnp.zeros_like(im), im, v),  # brightness
        _autocontrast,
        lambda im: jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(im),
        lambda im: 255.0 - im,  # invert
    ]
    return jax.lax.switch(op, branches, img)


def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Policy as arrays: probs [25, 2], op ids [25, 2], magnitudes [25, 2], signed [25, 2]."""
    probs = np.array([[p[0], p[3]] for p in CIFAR10_POLICY], np.float32)
    ops = np.array([[OPS.index(p[1]), OPS.index(p[4])] for p in CIFAR10_POLICY], np.int32)
    mags, signed = np.zeros((len(CIFAR10_POLICY), 2), np.float32), np.zeros_like(probs, bool)
    for i, p in enumerate(CIFAR10_POLICY):
        for j, (name, b) in enumerate(((p[1], p[2]), (p[4], p[5]))):
            value = float(RANGES[name][b])
            mags[i, j] = value
            signed[i, j] = name in SIGNED or name in ENHANCE
    return probs, ops, mags, signed


def autoaugment_image(key: Array, img: Array) -> Array:
    """AutoAugment (CIFAR-10 policy) of one uint8 image [H, W, C] -> uint8 [H, W, C]."""
    probs, ops, mags, signed = (jnp.asarray(t) for t in _tables())
    enhance = jnp.asarray([OPS.index(n) for n in ENHANCE])
    k_pol, k1, k2 = jax.random.split(key, 3)
    i = jax.random.randint(k_pol, (), 0, len(CIFAR10_POLICY))
    out = img.astype(jnp.float32)
    for j, k in enumerate((k1, k2)):
        k_apply, k_sign = jax.random.split(k)
        sign = jnp.where(jax.random.bernoulli(k_sign), 1.0, -1.0)
        v = jnp.where(signed[i, j], sign * mags[i, j], mags[i, j])
        v = jnp.where(jnp.any(enhance == ops[i, j]), 1.0 + v, v)  # enhancement factor
        new = jnp.round(_apply_op(ops[i, j], v, out))
        out = jnp.where(jax.random.uniform(k_apply) < probs[i, j], new, out)
    return _u8(out)


def autoaugment(key: Array, x: Array) -> Array:
    """AutoAugment (CIFAR-10 policy) of a batch, one independent draw per image.

    Args:
        key: PRNG key; the same key gives the same output.
        x: [B, H, W, C] uint8 images (C = 1 or 3).

    Returns:
        [B, H, W, C] uint8.
    """
    x = jnp.asarray(x)
    if x.dtype != jnp.uint8 or x.ndim != 4:
        raise ValueError(
            f"autoaugment expects uint8 images [B, H, W, C], got {x.dtype} {tuple(x.shape)}; "
            "convert float [0, 1] images with jnp.round(x * 255).astype(jnp.uint8)"
        )
    return jax.vmap(autoaugment_image)(jax.random.split(key, x.shape[0]), x)
