"""Per-example attack losses: cross-entropy, margin, DLR and targeted DLR (Croce & Hein, 2020)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Softmax cross-entropy per example.

    Args:
        logits: [B, K].
        y: [B] int labels.

    Returns:
        [B] losses.
    """
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]


def max_other(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Largest logit among the classes other than y: [B, K], [B] -> [B]."""
    onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
    return jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)


def margin(logits: jax.Array, y: jax.Array) -> jax.Array:
    """z_y - max_{i != y} z_i per example ([B]); negative means misclassified."""
    z_y = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    return z_y - max_other(logits, y)


def dlr(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Difference of logits ratio, -(z_y - max_{i!=y} z_i) / (z_pi1 - z_pi3 + 1e-12).

    pi sorts the logits in decreasing order. Needs K >= 3.

    Args:
        logits: [B, K].
        y: [B] int labels.

    Returns:
        [B] losses (to be maximised by the attack).
    """
    if logits.shape[-1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[-1]}")
    z = jnp.sort(logits, axis=-1)
    return -margin(logits, y) / (z[:, -1] - z[:, -3] + 1e-12)


def dlr_targeted(logits: jax.Array, y: jax.Array, target: jax.Array) -> jax.Array:
    """Targeted DLR, -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12). Needs K >= 4.

    Args:
        logits: [B, K].
        y: [B] int true labels.
        target: [B] int target labels.

    Returns:
        [B] losses (to be maximised by the attack).
    """
    if logits.shape[-1] < 4:
        raise ValueError(f"the targeted DLR loss needs at least 4 classes, got {logits.shape[-1]}")
    z = jnp.sort(logits, axis=-1)
    z_y = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
    z_t = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
    return -(z_y - z_t) / (z[:, -1] - 0.5 * (z[:, -3] + z[:, -4]) + 1e-12)


def objective(name: str, logits: jax.Array, y: jax.Array, target: jax.Array | None) -> jax.Array:
    """The per-example quantity an attack maximises.

    Args:
        name: "ce", "dlr" or "margin".
        logits: [B, K].
        y: [B] true labels.
        target: [B] target labels for a targeted attack, else None.

    Returns:
        [B] objective; larger means closer to (or further into) the attack's goal.
    """
    if target is None:
        if name == "ce":
            return cross_entropy(logits, y)
        if name == "dlr":
            return dlr(logits, y)
        if name == "margin":
            return -margin(logits, y)
    else:
        if name == "ce":
            return -cross_entropy(logits, target)
        if name == "dlr":
            return dlr_targeted(logits, y, target)
        if name == "margin":
            z_t = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
            return z_t - max_other(logits, target)
    raise ValueError(f"unknown loss {name!r}; expected one of 'ce', 'dlr', 'margin'")
