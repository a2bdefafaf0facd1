"""PGD adversarial training (Madry et al.) of the BP-CNN: the Adv-CNN baseline."""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections

from eqrobust.attacks import pgd
from eqrobust.train import Trained, supervised


def make_perturb(adv: ml_collections.ConfigDict) -> supervised.Perturb:
    """The training adversary `perturb(logits_fn, x, y, key) -> x_adv` described by `adv`.

    Args:
      adv: `eps` (radius), `norm` ("l2" in the papers), `steps`, `step_size` (None: the
        Madry/robustness-library choice 2.5 * eps / steps), `random_start`.

    Returns:
      A pure function run inside the jitted training step with the model in eval mode.
    """
    eps = float(adv.eps)
    if eps <= 0:
        raise ValueError(f"adv.eps must be positive, got {eps}")
    steps = int(adv.steps)
    if steps < 1:
        raise ValueError(f"adv.steps must be >= 1, got {steps}")
    step_size = adv.get("step_size", None)
    step_size = 2.5 * eps / steps if step_size is None else float(step_size)
    norm = adv.get("norm", "l2")
    random_start = bool(adv.get("random_start", True))

    def perturb(logits_fn, x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
        res = pgd(
            logits_fn,
            x,
            y,
            key=key,
            eps=eps,
            norm=norm,
            steps=steps,
            step_size=step_size,
            random_start=random_start,
        )
        return jax.lax.stop_gradient(res.x_adv)

    return perturb


def train(config: ml_collections.ConfigDict, workdir: str | Path | None, **kwargs) -> Trained:
    """Trains (or resumes, or loads) the BP-CNN of `config` on PGD adversarial examples.

    Args:
      config: a BP-CNN config plus `adv` (see eqrobust/configs/adv_cnn.py).
      workdir: checkpoints and metrics.
      **kwargs: passed to `supervised.train` (e.g. stop_at_step).

    Returns:
      Trained whose classifier is named `config.name` (e.g. "Adv-CNN(0.5)").
    """
    if "adv" not in config:
        raise ValueError("adversarial training needs config.adv (eps, steps, step_size, ...)")
    return supervised.train(config, workdir, perturb=make_perturb(config.adv), **kwargs)
