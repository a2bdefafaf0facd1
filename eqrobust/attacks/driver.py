"""Run any attack over a dataset in fixed-size chunks with a progress bar."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eqrobust import ops


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

    Every chunk has `min(batch_size, N)` examples (the last is padded by repeating its final
    example, and the padding is dropped; `eqrobust.ops.run_chunked`), so a compiled attack is
    reused for all chunks. Chunk i uses `jax.random.fold_in(key, i)`. Results are moved to host
    memory as NumPy arrays.

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
    n = x.shape[0] if x.ndim else 0
    if n == 0 or y.shape != (n,):
        raise ValueError(
            f"run_attack: need x [N, H, W, C] with N > 0 and y [N]; got {x.shape}, {y.shape}"
        )
    if not (isinstance(batch_size, int | np.integer) and batch_size >= 1):
        raise ValueError(f"run_attack: batch_size must be >= 1, got {batch_size}")

    def chunk(xb: jax.Array, yb: jax.Array, k: jax.Array) -> Any:
        xb = xb.astype(jnp.float32) / 255.0 if xb.dtype == jnp.uint8 else xb
        return attack_fn(xb, yb.astype(jnp.int32), key=k)

    def success_rate(outs: list[Any]) -> dict[str, str]:
        if not hasattr(outs[0], "success"):
            return {}
        done = sum(len(o.success) for o in outs)
        return {"success": f"{sum(int(np.sum(o.success)) for o in outs) / done:.3f}"}

    return ops.run_chunked(
        chunk,
        x,
        y,
        batch_size=batch_size,
        key=key,
        desc=desc,
        progress=progress,
        postfix=success_rate,
    )
