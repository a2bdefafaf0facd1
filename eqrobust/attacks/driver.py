"""Run any attack over a dataset in fixed-size chunks with a progress bar."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm


def run_attack(
    attack_fn: Callable[..., Any],
    x: np.ndarray | jax.Array,
    y: np.ndarray | jax.Array,
    *,
    key: jax.Array,
    batch_size: int,
    desc: str = "attack",
    progress: bool = True,
) -> Any:
    """Applies `attack_fn(x_chunk, y_chunk, key=k)` chunk by chunk and concatenates the results.

    Every chunk has exactly `batch_size` examples (the last is padded by repeating its final
    example, and the padding is dropped), so a compiled attack is reused for all chunks. Chunk i
    uses `jax.random.fold_in(key, i)`. Results are moved to host memory as NumPy arrays.

    Args:
        attack_fn: e.g. `functools.partial(eqrobust.attacks.pgd, logits_fn, eps=8 / 255)`;
            returns a NamedTuple whose fields are [B, ...] arrays.
        x: [N, H, W, C] images, float in [0, 1] or uint8 (divided by 255).
        y: [N] int labels.
        key: PRNG key.
        batch_size: chunk size.
        desc: progress bar label.
        progress: show a tqdm bar (with the running success rate when the result has `success`).

    Returns:
        The attack's NamedTuple type with fields of length N (NumPy arrays).
    """
    x = np.asarray(x)
    y = np.asarray(y)
    n = x.shape[0]
    if n == 0 or y.shape != (n,):
        raise ValueError(
            f"run_attack: need x [N, H, W, C] with N > 0 and y [N]; got {x.shape}, {y.shape}"
        )
    if batch_size < 1:
        raise ValueError(f"run_attack: batch_size must be >= 1, got {batch_size}")
    parts: list[Any] = []
    done, successes = 0, 0
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress)
    for i, start in enumerate(range(0, n, batch_size)):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        m = xb.shape[0]
        if m < batch_size:
            pad = batch_size - m
            xb = np.concatenate([xb, np.repeat(xb[-1:], pad, 0)])
            yb = np.concatenate([yb, np.repeat(yb[-1:], pad, 0)])
        xb = jnp.asarray(xb, jnp.float32) / 255.0 if xb.dtype == np.uint8 else jnp.asarray(xb)
        res = attack_fn(xb, jnp.asarray(yb, jnp.int32), key=jax.random.fold_in(key, i))
        res = type(res)(*(np.asarray(f)[:m] for f in jax.device_get(tuple(res))))
        parts.append(res)
        done += m
        if hasattr(res, "success"):
            successes += int(np.sum(res.success))
            bar.set_postfix(success=f"{successes / done:.3f}")
        bar.update(m)
    bar.close()
    return type(parts[0])(*(np.concatenate(fs) for fs in zip(*parts, strict=True)))
