"""TEMPORARY stand-in (replaced by the engine branch's ops module at merge)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm


def check_images(x, in_shape=None, who: str = "") -> None:
    if x.ndim != 4:
        raise ValueError(f"x must be [N, H, W, C], got shape {x.shape}")
    if not isinstance(x, jax.core.Tracer):
        if not np.all(np.isfinite(np.asarray(x))):
            raise ValueError(f"{who}: images contain NaN or inf")
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"x must be in [0, 1] (or uint8), got range [{x.min()}, {x.max()}]")


def run_chunked(
    fn: Callable[..., Any],
    *arrays: np.ndarray,
    batch_size: int,
    key: jax.Array | None = None,
    desc: str = "",
    progress: bool = False,
) -> Any:
    n = len(arrays[0])
    bs = min(batch_size, n)
    outs = []
    for i, start in enumerate(tqdm(range(0, n, bs), desc=desc, leave=False, disable=not progress)):
        chunk = [a[start : start + bs] for a in arrays]
        m = len(chunk[0])
        if m < bs:
            chunk = [np.concatenate([c, np.repeat(c[:1], bs - m, axis=0)]) for c in chunk]
        args = [jnp.asarray(c) for c in chunk]
        out = fn(*args, jax.random.fold_in(key, i)) if key is not None else fn(*args)
        outs.append(jax.tree.map(lambda o: np.asarray(o)[:m], out))
    return jax.tree.map(lambda *o: np.concatenate(o), *outs)
