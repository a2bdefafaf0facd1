"""Inference cost of a classifier on a batch: images per second and map evaluations per image."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from eqrobust import compile_options
from eqrobust.classifier import Classifier


def inference_cost(
    clf: Classifier,
    x: jax.Array,
    *,
    batch_size: int = 500,
    repeats: int = 3,
    f_evals_per_image: float | None = None,
) -> dict[str, float]:
    """Wall-clock throughput of `clf.logits_fn` (jitted, compiled before timing) on x.

    Args:
        clf: the classifier (EP-CNN, its students, any feedforward net).
        x: [N, H, W, C] float images in [0, 1]; N a multiple of batch_size or smaller than it.
        batch_size: images per call.
        repeats: passes over x; the best pass is reported (least disturbed by other load).
        f_evals_per_image: evaluations of the fixed-point map per image; default
            `clf.prediction_depth` (EP: free-phase steps) or 1 for a feedforward network.

    Returns:
        images_per_s, seconds_per_image, f_evals_per_image, num_images.
    """
    x = jnp.asarray(x)
    n = x.shape[0]
    bs = min(batch_size, n)
    if n % bs:
        raise ValueError(f"{n} images are not a multiple of batch_size={bs}; trim x")
    fn = compile_options.jit(clf.logits_fn)
    fn(x[:bs]).block_until_ready()  # compile
    best = float("inf")
    for _ in range(max(int(repeats), 1)):
        t0 = time.perf_counter()
        for i in range(0, n, bs):
            fn(x[i : i + bs]).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    evals = f_evals_per_image
    if evals is None:
        evals = float(clf.prediction_depth) if clf.prediction_depth else 1.0
    return {
        "images_per_s": n / best,
        "seconds_per_image": best / n,
        "f_evals_per_image": float(evals),
        "num_images": float(n),
    }
