"""Tests for eqrobust.corruptions: contracts, determinism, severity ordering, reference checks."""

from __future__ import annotations

import colorsys

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from eqrobust import corruptions as C
from eqrobust.corruptions import CORRUPTIONS, corrupt, corrupt_dataset

RANDOM = [n for n in CORRUPTIONS if n not in C.DETERMINISTIC]


def natural(n: int, h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    """Natural-ish float64 images in [0.1, 0.9]: smooth random fields plus a flat rectangle."""
    rng = np.random.default_rng(seed)
    f = ndimage.gaussian_filter(rng.normal(size=(n, h, w, c)), (0, 3, 3, 0))
    f = (f - f.min((1, 2, 3), keepdims=True)) / np.ptp(f, (1, 2, 3), keepdims=True)
    for i in range(n):  # sharp edges
        r0, c0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
        f[i, r0 : r0 + rng.integers(h // 4, h // 2), c0 : c0 + rng.integers(w // 4, w // 2)] = (
            rng.uniform(0, 1, c)
        )
    return 0.1 + 0.8 * f


RGB_U8 = np.round(natural(3, 32, 32, 3, seed=1) * 255).astype(np.uint8)
GRAY_F32 = natural(3, 28, 28, 1, seed=2).astype(np.float32)
ODD_F64 = natural(2, 17, 23, 3, seed=3)


def test_names_and_tfds_mapping():
    assert len(CORRUPTIONS) == 15 and len(set(CORRUPTIONS)) == 15
    assert CORRUPTIONS[0] == "gaussian_noise" and CORRUPTIONS[-1] == "jpeg_compression"
    assert C.TFDS_NAMES["glass_blur"] == "frosted_glass_blur"
    assert C.TFDS_NAMES["elastic_transform"] == "elastic"


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_range(name):
    for x in (RGB_U8, GRAY_F32, ODD_F64):
        for sev in range(1, 6):
            y = corrupt(x, name, sev, seed=sev)
            assert y.shape == x.shape and y.dtype == x.dtype, (name, sev)
            if x.dtype != np.uint8:
                assert np.all(np.isfinite(y)) and y.min() >= 0.0 and y.max() <= 1.0, (name, sev)
            # Every corruption changes a natural image at the highest severity.
            if sev == 5:
                assert np.any(y != x), name


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_deterministic_per_seed(name):
    x = GRAY_F32
    for sev in range(1, 6):
        a = corrupt(x, name, sev, seed=7)
        np.testing.assert_array_equal(a, corrupt(x, name, sev, seed=7))
        b = corrupt(x, name, sev, seed=8)
        if name in C.DETERMINISTIC:
            np.testing.assert_array_equal(a, b)
        else:
            assert np.any(a != b), (name, sev)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(CORRUPTIONS),
    severity=st.integers(1, 5),
    n=st.integers(1, 3),
    h=st.integers(8, 21),
    w=st.integers(8, 21),
    c=st.sampled_from([1, 3]),
    dtype=st.sampled_from([np.uint8, np.float32, np.float64]),
    seed=st.integers(0, 2**32),
)
def test_contract_any_shape(name, severity, n, h, w, c, dtype, seed):
    x = natural(n, h, w, c, seed=seed % 1000)
    x = np.round(x * 255).astype(np.uint8) if dtype == np.uint8 else x.astype(dtype)
    y = corrupt(x, name, severity, seed=seed)
    assert y.shape == x.shape and y.dtype == x.dtype
    if dtype != np.uint8:
        assert np.all(np.isfinite(y)) and y.min() >= 0 and y.max() <= 1


def test_jax_keys_as_seeds():
    x = RGB_U8
    for key in (jax.random.key(3), jax.random.PRNGKey(3)):
        a = corrupt(x, "snow", 4, seed=key)
        np.testing.assert_array_equal(a, corrupt(x, "snow", 4, seed=key))
    fog = corrupt(x, "fog", 2, seed=jax.random.key(3))
    # Typed and raw forms of the same key agree; another key differs.
    np.testing.assert_array_equal(fog, corrupt(x, "fog", 2, seed=jax.random.PRNGKey(3)))
    assert np.any(corrupt(x, "fog", 2, seed=jax.random.key(4)) != fog)


def _l1(y, x):
    return float(np.abs(y.astype(np.float64) - x).mean())


def _one_minus_corr(y, x):
    """Mean over images of 1 - Pearson correlation with the clean image (intensity-affine inv.)."""
    xc = x - x.mean((1, 2, 3), keepdims=True)
    yc = y - y.mean((1, 2, 3), keepdims=True)
    corr = (xc * yc).sum((1, 2, 3)) / np.sqrt((xc**2).sum((1, 2, 3)) * (yc**2).sum((1, 2, 3)))
    return float(np.mean(1 - corr))


SEVERITY_IMAGES = {
    "gray28": natural(8, 28, 28, 1, seed=11).astype(np.float32),
    "rgb32": natural(8, 32, 32, 3, seed=12).astype(np.float32),
}


@pytest.mark.parametrize("images", sorted(SEVERITY_IMAGES))
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_increases_distance(name, images):
    x = SEVERITY_IMAGES[images]
    ys = [[corrupt(x, name, s, seed=k) for k in range(2)] for s in range(1, 6)]
    d = np.array([np.mean([_l1(y, x) for y in ys_s]) for ys_s in ys])
    if name == "motion_blur":
        # CIFAR-10-C: severities 3 and 4 are (6, 2) and (8, 2) in (radius, sigma); the extra
        # radius only adds taps of weight < 3e-3, so they are practically the same blur.
        assert d[0] < d[1] < d[2] < d[4] and d[3] < d[4]
        assert abs(d[3] - d[2]) < 0.01 * d[2]
    elif name == "glass_blur":
        # CIFAR-10-C (sigma, delta, iterations): (.05,1,1) (.25,1,1) (.4,1,1) (.25,1,2) (.4,1,2).
        # Sigmas .05 and .25 are both nearly the identity, and the final blur pulls a shuffled
        # image back towards the clean one, so pixel distance is not monotone in severity. True:
        # 1 ~ 2, and a second shuffle pass at equal sigma moves further (2 < 4, 3 < 5).
        assert abs(d[1] - d[0]) < 0.02 * d[0]
        assert d[1] < d[3] and d[2] < d[4] and d[0] < d[3]
    elif name == "frost":
        # CIFAR-10-C blends a * x + b * frost with (a, b) = (1,.2) (1,.3) (.9,.4) (.85,.4)
        # (.75,.45): from 3 on the image is dimmed while frost is added, so the pixel distance
        # depends on image vs frost brightness (2 -> 3 grows iff frost > image) and falls at
        # 4 and 5. The frost-to-image ratio b / a, hence 1 - correlation, always grows.
        assert d[0] < d[1]
        r = [np.mean([_one_minus_corr(y, x) for y in ys_s]) for ys_s in ys]
        assert all(r[i] < r[i + 1] for i in range(4)), r
    elif name == "elastic_transform":
        # CIFAR-10-C shrinks the random-affine jitter (2.56 -> 0.96 px at 32x32) as severity
        # grows while the local elastic field grows; the affine dominates pixel distance, so it
        # falls with severity. The local part's monotone growth is tested on the maps below.
        assert all(d[i] > d[i + 1] for i in range(4)), d
    else:
        assert all(d[i] < d[i + 1] for i in range(4)), (name, d)


def test_elastic_maps_local_part_grows_affine_part_shrinks():
    n, h, w = 16, 32, 32
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1)
    affine, local = [], []
    for sev in range(5):
        a, disp = C._elastic_maps(np.random.default_rng(0), n, h, w, sev)
        affine.append(np.abs(a - grid).mean())
        local.append(0.0 if disp is None else np.abs(disp).mean())
    assert local[0] == 0.0
    assert all(local[i] < local[i + 1] for i in range(4)), local
    assert all(affine[i] > affine[i + 1] for i in range(4)), affine


# ---- reference checks against independent implementations -------------------------------------


def test_pixelate_matches_pil_box():
    x = RGB_U8
    for sev in range(1, 6):
        c = C._PIXELATE[sev - 1]
        ref = []
        for im in x:
            small = Image.fromarray(im).resize((int(32 * c), int(32 * c)), Image.BOX)
            ref.append(np.asarray(small.resize((32, 32), Image.BOX)))
        y = corrupt(x, "pixelate", sev)
        # PIL rounds to uint8 after each of its passes; we stay in float.
        assert np.abs(y.astype(int) - np.stack(ref).astype(int)).max() <= 1, sev


def _clipped_zoom_scipy(img: np.ndarray, z: float) -> np.ndarray:
    h = img.shape[0]
    ch = int(np.ceil(h / z))
    top = (h - ch) // 2
    out = ndimage.zoom(img[top : top + ch, top : top + ch], (z, z, 1), order=1)
    trim = (out.shape[0] - h) // 2
    return out[trim : trim + h, trim : trim + h]


def test_zoom_blur_matches_scipy_zoom_reference():
    x = natural(2, 32, 32, 3, seed=5)
    for sev in (1, 5):
        factors = 1 + 0.01 * np.arange(C._ZOOM_COUNTS[sev - 1])
        ref = np.stack(
            [
                (im + sum(_clipped_zoom_scipy(im, z) for z in factors)) / (len(factors) + 1)
                for im in x
            ]
        )
        np.testing.assert_allclose(corrupt(x, "zoom_blur", sev), ref, atol=1e-5)


def test_motion_blur_fft_matches_direct_sampling():
    rng = np.random.default_rng(0)
    x = rng.random((4, 20, 26, 3))
    angles = rng.uniform(-180, 180, 4)
    for radius, sigma in ((6, 1.0), (9, 2.5), (14, 12.0)):
        np.testing.assert_allclose(
            C._motion_blur(x, radius, sigma, angles),
            C._motion_blur_direct(x, radius, sigma, angles),
            atol=1e-6,  # the FFT path drops taps lighter than 1e-7 of the first
        )
    # Angle 0 blurs along +columns only: a vertical edge smears, a horizontal one does not.
    step = np.zeros((1, 16, 16, 1))
    step[:, :, 8:] = 1.0
    out = C._motion_blur(step, 6, 2.0, np.array([0.0]))
    assert np.allclose(out, out[:, :1]) and 0.1 < out[0, 0, 6, 0] < 0.9
    assert np.allclose(out[0, 0, 8:], 1) and np.allclose(out[0, 0, :2], 0, atol=1e-3)


def test_brightness_matches_hsv_reference():
    x = natural(2, 8, 9, 3, seed=6)
    x[0, 0, 0] = 0.0  # black pixel: hue/saturation undefined, becomes gray
    for sev in (1, 5):
        c = C._BRIGHTNESS[sev - 1]
        ref = np.empty_like(x)
        for idx in np.ndindex(x.shape[:3]):
            hh, ss, vv = colorsys.rgb_to_hsv(*x[idx])
            ref[idx] = colorsys.hsv_to_rgb(hh, ss, min(vv + c, 1.0))
        np.testing.assert_allclose(corrupt(x, "brightness", sev), ref, atol=1e-6)
    g = GRAY_F32
    np.testing.assert_allclose(corrupt(g, "brightness", 3), np.minimum(g + 0.15, 1), atol=1e-6)


def test_defocus_kernels():
    # Radius < 1: a single pixel smoothed by the 3x3 Gaussian (sigma .4), as cv2.GaussianBlur.
    g = np.exp(-np.array([1.0, 0.0, 1.0]) / (2 * 0.4**2))
    g /= g.sum()
    np.testing.assert_allclose(C._defocus_kernel(0.3, 0.4, 3), np.outer(g, g), atol=1e-12)
    # Radius 1: the 5-pixel cross; radius 1.5: the full 3x3 block (before the tiny smoothing).
    k1 = C._defocus_kernel(1.0, 1e-3, 3)
    assert k1.shape == (3, 3) and np.allclose(k1, [[0, 0.2, 0], [0.2, 0.2, 0.2], [0, 0.2, 0]])
    np.testing.assert_allclose(C._defocus_kernel(1.5, 1e-3, 3), np.full((3, 3), 1 / 9))
    x = natural(2, 16, 16, 1, seed=4)
    ref = np.stack(
        [ndimage.correlate(im[..., 0], C._defocus_kernel(1.0, 0.2, 3), mode="mirror") for im in x]
    )[..., None]
    np.testing.assert_allclose(corrupt(x, "defocus_blur", 4), np.clip(ref, 0, 1), atol=1e-6)


def test_elastic_matches_scipy_reference():
    x = natural(3, 32, 32, 3, seed=9)
    h = w = 32
    for sev in (1, 4):
        alpha, sigma, jitter = C._ELASTIC[sev - 1]
        rng = C._generator(5)  # replay the same draws, in the same order
        jit = rng.uniform(-jitter, jitter, (3, 3, 2))
        du = rng.uniform(-1, 1, (2, 3, h, w)) if alpha > 0 else None
        ref = []
        for i, im in enumerate(x):
            # Affine through three (x, y) points, solved as 6 linear equations.
            src = np.array([[26.0, 26], [26, 6], [6, 6]])
            dst = src + jit[i]
            A = np.zeros((6, 6))
            A[0::2, 0:2], A[0::2, 2], A[1::2, 3:5], A[1::2, 5] = src, 1, src, 1
            a, b, tx, c, d, ty = np.linalg.solve(A, dst.ravel())
            inv = np.linalg.inv([[a, b], [c, d]])  # (x, y) forward map -> inverse
            # scipy works in (row, col) = (y, x): swap the axes of the inverse map.
            mat = inv[::-1, ::-1]
            off = -mat @ np.array([ty, tx])
            warped = np.stack(
                [
                    ndimage.affine_transform(im[..., k], mat, off, order=1, mode="mirror")
                    for k in range(3)
                ],
                -1,
            )
            if du is not None:
                dx = ndimage.gaussian_filter(du[0, i], sigma, mode="reflect", truncate=3) * alpha
                dy = ndimage.gaussian_filter(du[1, i], sigma, mode="reflect", truncate=3) * alpha
                yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
                warped = np.stack(
                    [
                        ndimage.map_coordinates(
                            warped[..., k], [yy + dy, xx + dx], order=1, mode="reflect"
                        )
                        for k in range(3)
                    ],
                    -1,
                )
            ref.append(warped)
        np.testing.assert_allclose(
            corrupt(x, "elastic_transform", sev, seed=5), np.clip(np.stack(ref), 0, 1), atol=1e-5
        )


def test_glass_blur_matches_sequential_loop():
    x = natural(2, 12, 12, 3, seed=8).astype(np.float32)
    sigma, delta, iters = C._GLASS[3]  # 2 iterations
    rng = C._generator(4)
    ref = ndimage.gaussian_filter(x, (0, sigma, sigma, 0), mode="nearest")
    for _ in range(iters):
        shifts = rng.integers(-delta, delta, size=(12 - 2 * delta, 12 - 2 * delta, 2, 2))
        for i in range(2):  # naive: one image at a time, pixel by pixel
            for a, hh in enumerate(range(12 - delta, delta, -1)):
                for b, ww in enumerate(range(12 - delta, delta, -1)):
                    dx, dy = shifts[a, b, :, i]
                    p = ref[i, hh, ww].copy()
                    ref[i, hh, ww] = ref[i, hh + dy, ww + dx]
                    ref[i, hh + dy, ww + dx] = p
    ref = ndimage.gaussian_filter(ref, (0, sigma, sigma, 0), mode="nearest")
    np.testing.assert_allclose(corrupt(x, "glass_blur", 4, seed=4), np.clip(ref, 0, 1), atol=1e-6)


def test_noise_statistics():
    x = np.full((4, 32, 32, 3), 0.5)
    for sev in (1, 5):
        sigma = C._GAUSSIAN_NOISE[sev - 1]
        np.testing.assert_allclose(np.std(corrupt(x, "gaussian_noise", sev) - x), sigma, rtol=0.03)
        lam = C._SHOT_NOISE[sev - 1]
        y = corrupt(x, "shot_noise", sev)
        np.testing.assert_allclose(np.var(y - x), 0.5 / lam, rtol=0.05)
        amount = C._IMPULSE_NOISE[sev - 1]
        y = corrupt(x, "impulse_noise", sev)
        assert set(np.unique(y)) <= {0.0, 0.5, 1.0}
        np.testing.assert_allclose(np.mean(y != 0.5), amount, rtol=0.15)
        np.testing.assert_allclose(np.mean(y == 1.0), amount / 2, rtol=0.2)


def test_contrast_keeps_channel_means():
    x = natural(3, 16, 16, 3, seed=10)
    y = corrupt(x, "contrast", 5)
    np.testing.assert_allclose(y.mean((1, 2)), x.mean((1, 2)), atol=1e-6)
    dev = lambda z: z - z.mean((1, 2), keepdims=True)
    np.testing.assert_allclose(dev(y), 0.15 * dev(x), atol=1e-6)


def test_frost_texture_and_fog_fractal():
    rng = np.random.default_rng(0)
    t = C._frost_texture(rng, 4, 28, 30, 3)
    assert t.shape == (4, 28, 30, 3) and t.min() >= 0 and t.max() <= 1
    assert 0.3 < t.mean() < 0.8 and t.std() > 0.05  # textured, mid-bright
    assert np.all(t[..., 2] >= t[..., 0])  # blue-white tint
    f = C._plasma_fractal(rng, 3, 28, 2.0)
    assert f.shape == (3, 32, 32)
    np.testing.assert_allclose(f.min((1, 2)), 0)
    np.testing.assert_allclose(f.max((1, 2)), 1)


def test_larger_images_scale_kernels():
    assert C._pixel_scale(28, 28) == 1.0 and C._pixel_scale(64, 96) == 2.0
    x = natural(1, 64, 64, 3, seed=13).astype(np.float32)
    for name in CORRUPTIONS:
        y = corrupt(x, name, 5, seed=1)
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1, name
    # A 64x64 image blurred at 2x the pixel scale approximates the 32x32 blur, upsampled.
    small = natural(1, 32, 32, 1, seed=14)
    big = small.repeat(2, 1).repeat(2, 2)
    down = corrupt(big, "motion_blur", 3, seed=0).reshape(1, 32, 2, 32, 2, 1).mean((2, 4))
    ref = corrupt(small, "motion_blur", 3, seed=0)
    assert _l1(down, ref) < 0.25 * _l1(small, ref)


def test_invalid_inputs():
    x = GRAY_F32
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "speckle_noise", 1)
    for bad in (0, 6, 2.5, True, "3"):
        with pytest.raises(ValueError, match="severity"):
            corrupt(x, "fog", bad)
    with pytest.raises(ValueError, match="shape"):
        corrupt(x[0], "fog", 1)
    with pytest.raises(ValueError, match="shape"):
        corrupt(np.zeros((1, 16, 16, 2), np.float32), "fog", 1)
    with pytest.raises(ValueError, match="dtype"):
        corrupt(np.zeros((1, 16, 16, 1), np.int32), "fog", 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        corrupt(x * 255, "fog", 1)
    for seed in (-1, "0", 1.5):
        with pytest.raises(ValueError, match="seed"):
            corrupt(x, "fog", 1, seed=seed)


def test_corrupt_dataset():
    x = RGB_U8[:2]
    with pytest.raises(ValueError):  # validated when called, not at the first next()
        corrupt_dataset(x, severities=(1, 6))
    with pytest.raises(ValueError):
        corrupt_dataset(x, names=("fog", "nope"))
    out = dict(corrupt_dataset(x, names=("fog", "contrast"), severities=(2, 5), seed=3))
    assert list(out) == [("fog", 2), ("fog", 5), ("contrast", 2), ("contrast", 5)]
    again = dict(corrupt_dataset(x, names=("fog",), severities=(5,), seed=3, progress=False))
    np.testing.assert_array_equal(out[("fog", 5)], again[("fog", 5)])  # independent of the rest
    other = dict(corrupt_dataset(x, names=("fog",), severities=(5,), seed=4, progress=False))
    assert np.any(other[("fog", 5)] != out[("fog", 5)])
    np.testing.assert_array_equal(out[("contrast", 2)], corrupt(x, "contrast", 2))
    assert all(v.dtype == np.uint8 and v.shape == x.shape for v in out.values())


def test_load_cifar10_corrupted_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_and_prepare"):
        C.load_cifar10_corrupted("glass_blur", 3, data_dir=str(tmp_path))
    with pytest.raises(ValueError):
        C.load_cifar10_corrupted("glass", 3, data_dir=str(tmp_path))
    with pytest.raises(ValueError):
        C.load_cifar10_corrupted("fog", 0, data_dir=str(tmp_path))


def test_chunking_is_deterministic_and_independent(monkeypatch):
    monkeypatch.setattr(C, "CHUNK_SIZE", 2)
    x = np.repeat(GRAY_F32[:1], 5, axis=0)  # five identical images -> chunks of 2, 2, 1
    y = corrupt(x, "gaussian_noise", 3, seed=1)
    np.testing.assert_array_equal(y[:2], corrupt(x[:2], "gaussian_noise", 3, seed=1))
    np.testing.assert_array_equal(y, corrupt(x, "gaussian_noise", 3, seed=1))
    assert np.any(y[2:4] != y[:2]) and np.any(y[4] != y[0])  # chunks draw fresh noise


def test_load_cifar10_corrupted_reads_a_prepared_source(monkeypatch):
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)

    class Source:
        def __len__(self):
            return 5

        def __getitems__(self, keys):
            return [{"image": images[k], "label": np.int64(k % 3)} for k in keys]

    class Builder:
        data_dir = "/fake"

        def __init__(self, readable):
            self.readable = readable

        def is_prepared(self):
            return True

        def as_data_source(self, split):
            assert split == "test"
            if not self.readable:
                raise NotImplementedError("tfrecord files")
            return Source()

    seen = []
    monkeypatch.setattr(tfds, "builder", lambda name, **kw: seen.append(name) or Builder(True))
    x, y = C.load_cifar10_corrupted("elastic_transform", 2, num_examples=3)
    assert seen == ["cifar10_corrupted/elastic_2"]
    np.testing.assert_array_equal(x, images[:3])
    assert x.dtype == np.uint8 and y.dtype == np.int32 and y.tolist() == [0, 1, 2]
    monkeypatch.setattr(tfds, "builder", lambda name, **kw: Builder(False))
    with pytest.raises(FileNotFoundError, match="array_record"):
        C.load_cifar10_corrupted("fog", 1)
