"""The one training loop: seeded batches, on-device augmentation, orbax resume, metrics, tqdm."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from tqdm.auto import tqdm

from eqrobust import compile_options
from eqrobust import data as data_lib

TrainStep = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[Any, dict[str, jax.Array]]]
EvalLogits = Callable[[Any, jax.Array], jax.Array]
# (step, state) -> extra metrics recorded in their own metrics.jsonl row, e.g. validation.
EpochHook = Callable[[int, Any], dict]


class FitResult(NamedTuple):
    """What `fit` returns: final state, metric records (also in metrics.jsonl), last step."""

    state: Any
    history: list[dict]
    step: int


def _opt(config: ml_collections.ConfigDict, name: str, default: Any) -> Any:
    """config.name, or default when the field is absent or None (an unset placeholder)."""
    value = config.get(name, None)
    return default if value is None else value


def make_schedule(opt_config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """Learning-rate schedule, stepped once per epoch like the PyTorch references.

    opt_config.schedule:
      - "constant": lr.
      - "cosine": PyTorch CosineAnnealingLR, lr_min + (lr - lr_min)(1 + cos(pi e / cosine_epochs))/2
        at epoch e. Like the reference, it is periodic: past cosine_epochs the rate rises again
        (T_max=100 over 120 epochs in the EP papers' code).
      - "step": lr * decay_factor ** floor(e / decay_every_epochs) (PyTorch StepLR).
    """
    lr = float(opt_config.lr)
    kind = _opt(opt_config, "schedule", "constant")
    spe = max(int(steps_per_epoch), 1)
    if kind == "constant":
        return optax.constant_schedule(lr)
    if kind == "cosine":
        lr_min = float(_opt(opt_config, "lr_min", 0.0))
        t_max = float(opt_config.cosine_epochs)

        def cosine(step: jax.Array) -> jax.Array:
            epoch = jnp.floor(step / spe)
            return lr_min + (lr - lr_min) * (1 + jnp.cos(jnp.pi * epoch / t_max)) / 2

        return cosine
    if kind == "step":
        every, factor = int(opt_config.decay_every_epochs), float(opt_config.decay_factor)
        return lambda step: lr * factor ** jnp.floor(step / (spe * every))
    raise ValueError(f"unknown schedule {kind!r}; expected 'constant', 'cosine' or 'step'")


def make_optimizer(
    opt_config: ml_collections.ConfigDict, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD with momentum and coupled weight decay (PyTorch `SGD(weight_decay=...)` semantics)."""
    schedule = make_schedule(opt_config, steps_per_epoch)
    tx = optax.chain(
        optax.add_decayed_weights(float(_opt(opt_config, "weight_decay", 0.0))),
        optax.sgd(
            schedule,
            momentum=float(_opt(opt_config, "momentum", 0.0)) or None,
            nesterov=bool(_opt(opt_config, "nesterov", False)),
        ),
    )
    return tx, schedule


def accuracy(
    eval_logits: Callable[[jax.Array], jax.Array],
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = 500,
) -> float:
    """Top-1 accuracy of a jitted `eval_logits(x_float) -> logits` over uint8 images x [N,H,W,C]."""
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = data_lib.to_float(x[i : i + batch_size])
        n = xb.shape[0]
        if n < batch_size and len(x) > batch_size:  # pad to keep one compiled shape
            xb = jnp.concatenate([xb, jnp.zeros((batch_size - n, *xb.shape[1:]), xb.dtype)])
        pred = jnp.argmax(eval_logits(xb)[:n], -1)
        correct += int(jnp.sum(pred == jnp.asarray(y[i : i + n])))
    return correct / len(x)


# Config fields that do not change what is trained (logging, checkpoint cadence, paths, labels).
_NOT_TRAINING = frozenset(
    {"name", "log_every_steps", "eval_batch_size", "checkpoint_every_steps", "keep_checkpoints",
     "data_dir", "force_retrain", "eval_every_epochs"}
)  # fmt: skip


# Formulation fields: every choice computes the same function and gradient (tests/test_ops.py),
# so a run stored with one resumes under another (e.g. the DEQ's conv "xla" -> "auto").
_FORMULATION = frozenset({"model.conv", "model.pool"})

# Config fields renamed since runs were stored: stored name -> current name (such runs still load).
_RENAMED = {"model.update": "model.update_order"}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in dict(d).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def config_changes(stored: dict, config: ml_collections.ConfigDict) -> list[str]:
    """Training-relevant fields whose value differs between a run's stored config and `config`:
    'field: stored -> now' strings (fields in _NOT_TRAINING and _FORMULATION ignored)."""
    now = _flat(json.loads(json.dumps(config.to_dict(), default=repr)))
    old = {_RENAMED.get(k, k): v for k, v in _flat(stored).items()}
    keys = sorted(
        k for k in set(now) | set(old)
        if k.split(".")[0] not in _NOT_TRAINING and k not in _FORMULATION
    )  # fmt: skip
    return [f"{k}: {old.get(k, '<absent>')!r} -> {now.get(k, '<absent>')!r}" for k in keys
            if old.get(k, "<absent>") != now.get(k, "<absent>")]  # fmt: skip


def _read_history(path: Path, upto_step: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("step", 0) <= upto_step]


class _Store:
    """Checkpoints (orbax) and metrics.jsonl of one run; inert when workdir is None."""

    def __init__(self, workdir: str | Path | None, keep: int, name: str):
        self.name = name
        self.history: list[dict] = []
        self.mngr, self.metrics_path = None, None
        if workdir is None:
            return
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.workdir / "metrics.jsonl"
        self.mngr = ocp.CheckpointManager(
            (self.workdir / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def check_config(self, config: ml_collections.ConfigDict) -> None:
        """Refuses to resume or load a run trained with a different config (config.json in the
        workdir, written when the run started); `force_retrain` starts it again instead."""
        if self.mngr is None:
            return
        path = self.workdir / "config.json"
        if config.get("force_retrain", False) and self.mngr.latest_step() is not None:
            tqdm.write(f"{self.name}: force_retrain: discarding the run in {self.workdir}")
            for step in list(self.mngr.all_steps()):
                self.mngr.delete(step)
            path.unlink(missing_ok=True)
        if path.exists() and (changes := config_changes(json.loads(path.read_text()), config)):
            raise ValueError(
                f"{self.workdir} holds a run trained with a different config; changed: "
                + "; ".join(changes)
                + ". Use a new --workdir, or --config.force_retrain=True to train it again."
            )
        if self.mngr.latest_step() is None:
            path.write_text(json.dumps(config.to_dict(), default=repr, indent=1))

    def restore(self, init_state: Any, total: int) -> tuple[Any, int]:
        """(state, step) of the latest checkpoint, or (init_state, 0) for a new run."""
        latest = self.mngr.latest_step() if self.mngr is not None else None
        if latest is None:
            if self.metrics_path is not None:
                self.metrics_path.write_text("")
            return init_state, 0
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, init_state)
        state, step = self._restore_intact(abstract)
        self.history = _read_history(self.metrics_path, step)
        # Drop records written after the checkpoint by an interrupted run.
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        # Printed, not logged: the binaries keep absl at WARNING (orbax logs every save at INFO).
        verb = "finished run, loaded" if step >= total else "resuming"
        tqdm.write(f"{self.name}: {verb} from {self.workdir} at step {step} / {total}")
        return state, step

    def _restore_intact(self, abstract: Any) -> tuple[Any, int]:
        """The newest checkpoint that restores; a corrupt newer one is reported and skipped."""
        errors = []
        for step in sorted(self.mngr.all_steps(), reverse=True):
            try:
                state = self.mngr.restore(step, args=ocp.args.StandardRestore(abstract))
            except Exception as e:  # noqa: BLE001 - orbax raises many kinds for a broken step
                errors.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                tqdm.write(
                    f"{self.name}: WARNING: checkpoint at step {step} in {self.workdir} cannot be "
                    f"restored ({errors[-1]}); trying the previous one"
                )
                continue
            return state, int(step)
        raise RuntimeError(
            f"no checkpoint in {self.workdir / 'checkpoints'} can be restored: "
            + "; ".join(errors)
            + ". Move the folder away (or use a new --workdir) to train from scratch."
        )

    def record(self, row: dict) -> None:
        self.history.append(row)
        if self.metrics_path is not None:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def save(self, step: int, state: Any) -> None:
        if self.mngr is not None and self.mngr.latest_step() != step:
            self.mngr.save(step, args=ocp.args.StandardSave(state))

    def close(self, step: int, state: Any) -> None:
        if self.mngr is not None:
            self.save(step, state)
            self.mngr.wait_until_finished()
            self.mngr.close()


def _step_fn(config: ml_collections.ConfigDict, train_step: TrainStep) -> Callable[..., Any]:
    """The jitted step: per-step key fold_in(seed, step), on-device augmentation, train_step."""
    aug = config.get("augment", None) if "augment" in config else None
    base_key = jax.random.PRNGKey(int(config.seed))

    @compile_options.jit
    def step_fn(state: Any, x: jax.Array, y: jax.Array, step: jax.Array) -> tuple[Any, dict]:
        key = jax.random.fold_in(base_key, step)
        k_aug, k_step = jax.random.split(key)
        xf = data_lib.to_float(x)
        if aug is not None and (aug.get("crop_padding", 0) or aug.get("flip", False)):
            xf = data_lib.augment(
                k_aug,
                xf,
                crop_padding=int(aug.get("crop_padding", 0)),
                pad_mode=aug.get("pad_mode", "edge"),
                flip=bool(aug.get("flip", False)),
            )
        return train_step(state, xf, y, k_step)

    return step_fn


def fit(
    *,
    config: ml_collections.ConfigDict,
    workdir: str | Path | None,
    data: data_lib.Dataset,
    init_state: Any,
    train_step: TrainStep,
    eval_logits: EvalLogits,
    stop_at_step: int | None = None,
    on_epoch_end: EpochHook | None = None,
) -> FitResult:
    """Trains `init_state` with `train_step`, resuming from the latest checkpoint in workdir.

    Args:
        config: uses seed, batch_size, num_epochs, num_steps (optional, overrides epochs),
            augment.{crop_padding, pad_mode, flip} (optional), eval_every_epochs (0: no test
            accuracy at all, e.g. when the caller measures it on its own selected model),
            checkpoint_every_steps (default: once per epoch), keep_checkpoints, log_every_steps,
            eval_batch_size, name (progress bar label).
        workdir: where checkpoints/ and metrics.jsonl go; None trains without saving.
        data: the dataset (already subset if wanted).
        init_state: pytree of arrays holding everything that changes during training.
        train_step: (state, x [B,H,W,C] float in [0,1] augmented, y [B], key) -> (state, metrics).
        eval_logits: (state, x) -> logits [B, K], used for test accuracy.
        stop_at_step: stop (and checkpoint) once this step is reached, as if interrupted.
        on_epoch_end: called with (step, state) at the end of every epoch and at the last step
            (not at an interruption), before that step's checkpoint; the dict it returns is
            recorded as a row {"step", "epoch", **dict} of the history and metrics.jsonl. The
            training step stays one compiled program across epochs (validation, model
            selection and the like go here, not in a loop around `fit`).

    Returns:
        FitResult. A run whose final step is already checkpointed restores it and returns at once.

    Raises:
        FloatingPointError: the training loss became NaN or infinite.
    """
    n_train, bs = len(data.x_train), int(config.batch_size)
    if bs > n_train:
        raise ValueError(f"batch_size={bs} is larger than the training set ({n_train})")
    spe = n_train // bs
    num_steps = _opt(config, "num_steps", None)
    total = int(num_steps) if num_steps else int(config.num_epochs) * spe
    log_every = int(_opt(config, "log_every_steps", 50))
    ckpt_every = int(_opt(config, "checkpoint_every_steps", 0)) or spe
    eval_every = int(_opt(config, "eval_every_epochs", 1))
    name = str(config.get("name", None) or "train")
    store = _Store(workdir, int(_opt(config, "keep_checkpoints", 2)), name)
    store.check_config(config)
    state, step = store.restore(init_state, total)
    step_fn = _step_fn(config, train_step)
    eval_jit = compile_options.jit(eval_logits)
    eval_bs = int(_opt(config, "eval_batch_size", 500))

    end = total if stop_at_step is None else min(total, int(stop_at_step))
    sums: dict[str, float] = {}
    count, t0 = 0, time.time()
    bar = tqdm(
        total=total, initial=step, desc=name, unit="step", dynamic_ncols=True, disable=step >= end
    )
    while step < end:
        epoch, start = divmod(step, spe)
        for xb, yb in data_lib.batches(
            data.x_train, data.y_train, bs, seed=int(config.seed), epoch=epoch, start=start
        ):
            state, metrics = step_fn(state, xb, yb, jnp.asarray(step, jnp.int32))
            step += 1
            bar.update(1)
            last_of_epoch = step % spe == 0
            if step % log_every == 0 or last_of_epoch or step == end:
                m = jax.device_get(metrics)
                loss = float(m.get("loss", 0.0))
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"training loss is {loss} at step {step} (epoch {epoch}); stopping. "
                        "Lower the learning rate or check the data/model for invalid values."
                    )
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                count += 1
                bar.set_postfix(loss=f"{loss:.4f}")
            done_epoch = eval_every > 0 and last_of_epoch and (step // spe) % eval_every == 0
            if done_epoch or step == total:
                row = {"step": step, "epoch": step / spe, "time_s": round(time.time() - t0, 2)}
                row.update({f"train_{k}": v / max(count, 1) for k, v in sums.items()})
                msg = f"{name} step {step} epoch {row['epoch']:.2f}:"
                if eval_every > 0:
                    row["test_accuracy"] = accuracy(
                        lambda x: eval_jit(state, x), data.x_test, data.y_test, batch_size=eval_bs
                    )
                    msg += f" test acc {row['test_accuracy']:.4f},"
                store.record(row)
                logging.info("step %d: %s", step, row)
                bar.write(f"{msg} train loss {row.get('train_loss', 0):.4f}")
                sums, count = {}, 0
            if on_epoch_end is not None and (last_of_epoch or step == total):
                store.record({"step": step, "epoch": step / spe, **on_epoch_end(step, state)})
            if step % ckpt_every == 0 or step == end:
                store.save(step, state)
            if step >= end:
                break
    bar.close()
    store.close(step, state)
    return FitResult(state, store.history, step)
