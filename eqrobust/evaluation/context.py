"""What every evaluation stage shares: the examples (one permutation), keys, batching, caches."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from eqrobust import compile_once, ops
from eqrobust.attacks import _common, registry
from eqrobust.classifier import Classifier
from eqrobust.evaluation.cache import EvalCache, array_digest, key_digest
from eqrobust.results import GradientInfo, value_label

Array = jax.Array
LogitsFn = Callable[[Array], Array]


def _jitted_argmax(logits_fn: LogitsFn) -> Callable[[Array], Array]:
    """`x -> argmax logits_fn(x)`; the logits compile once per architecture (`attacks._common`)."""
    return lambda x: jnp.argmax(_common.logits(logits_fn, x), axis=-1)


def predict(
    logits_fn: LogitsFn,
    x: np.ndarray,
    *,
    batch_size: int = 250,
    devices: Sequence[jax.Device] = (),
) -> np.ndarray:
    """Predicted labels of `logits_fn` on `x: [N, H, W, C]` in chunks -> `[N]` int (chunks run
    concurrently on several `devices`, see `ops.run_chunked`)."""
    placed = _Placed(devices, logits_fn)
    return ops.run_chunked(
        lambda xb: _jitted_argmax(placed.on(xb))(xb), np.asarray(x), batch_size=batch_size,
        devices=devices,
    )  # fmt: skip


class _Placed:
    """`tree` (functions with weights, settings) copied once to each device that asks for it,
    so a chunk on device d runs with d's copy (`ops.run_chunked(devices=...)`)."""

    def __init__(self, devices: Sequence[jax.Device], tree: Any):
        self.tree, self.multi = tree, len(devices) > 1
        self.copies: dict[int, Any] = {}
        self.lock = threading.Lock()

    def on(self, xb: Array) -> Any:
        if not self.multi:
            return self.tree
        dev = ops.device_of(xb)
        with self.lock:
            if dev.id not in self.copies:
                self.copies[dev.id] = ops.place(self.tree, dev)
            return self.copies[dev.id]


def eval_devices() -> tuple[jax.Device, ...]:
    """The devices an evaluation splits its chunks over: every local device of the default
    backend when there are several (e.g. XLA:CPU split by `eqrobust.host.split_cpu`), else none.
    On host devices it installs `compile_once`: each program is compiled once, not per device."""
    devs = tuple(jax.local_devices())
    if len(devs) > 1 and devs[0].platform == "cpu":
        compile_once.install()  # one compilation per program, loaded onto the other devices
    return devs if len(devs) > 1 else ()


def gradient_info(classifier: Classifier) -> GradientInfo:
    """The declared attack-gradient path of `classifier` against its prediction path."""
    g = classifier.gradient
    return GradientInfo(
        mode=str(g or "autodiff"),
        gradient_depth=g.depth if g else None,
        prediction_depth=classifier.prediction_depth,
        matches_prediction=bool(classifier.gradient_matches_prediction),
        randomized=classifier.randomized,
        test_time_optimization=classifier.test_time_optimization,
    )


def check_data(
    x: np.ndarray, y: np.ndarray, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Test images as float32 in [0, 1] (uint8 is divided by 255) and int32 labels [N] in
    [0, num_classes); at least one example."""
    x = np.asarray(x)
    y = np.asarray(y)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    ops.check_images(x, who="evaluation")
    if len(x) == 0:
        raise ValueError("evaluation got an empty test set (0 images)")
    if y.shape != (len(x),):
        raise ValueError(f"y must be [N] labels matching x, got {y.shape} for {len(x)} images")
    ops.check_labels(y, len(x), num_classes, who="evaluation")
    return x, y.astype(np.int32)


@dataclasses.dataclass
class Context:
    """The evaluation of one classifier, shared by its stages.

    Attributes:
        classifier: the model under evaluation.
        config: evaluation config (`eqrobust.evaluation.default_config()`).
        x, y: the evaluation examples, in one fixed random permutation of the test split (every
            subset is a prefix, so subsets are nested and the same for every model).
        num_test: size of the test split.
        key: the evaluation's PRNG key (stages fold in fixed constants).
        clean_correct: [N] bool, set by the clean stage.
        correct: robust-correct masks per (attack, strength), for comparisons across attacks.
        gallery_adv: adversarials of the gallery images when the attack grid produced them.
        stage_seconds: sub-stage timings ("attacks.<name>"), merged into the result's seconds.
        devices: the chunks of an attack or prediction run concurrently on these (several
            host devices on XLA:CPU, `eval_devices()`); empty: one chunk after another.
        cache: where attack cells and corruption results are stored and reused (None: nothing
            is stored; see `eqrobust.evaluation.cache`).
    """

    classifier: Classifier
    config: ml_collections.ConfigDict
    x: np.ndarray
    y: np.ndarray
    num_test: int
    key: Array
    gradient_variants: Sequence[Classifier] = ()
    corrupt: Callable[..., np.ndarray] | None = None
    corruption_names: Sequence[str] | None = None
    clean_pred: np.ndarray | None = None
    clean_correct: np.ndarray | None = None
    correct: dict[tuple[str, float], np.ndarray] = dataclasses.field(default_factory=dict)
    gallery_adv: np.ndarray | None = None
    # Finer timings than one per stage ("attacks.pgd_l2": seconds), added to the result's.
    stage_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    cache: EvalCache | None = None
    devices: tuple[jax.Device, ...] = ()
    _digests: dict[int, str] = dataclasses.field(default_factory=dict, init=False, repr=False)

    @property
    def name(self) -> str:
        return self.classifier.name

    @property
    def batch_size(self) -> int:
        return int(self.config.batch_size)

    @property
    def progress(self) -> bool:
        return bool(self.config.progress)

    def log(self, msg: str) -> None:
        """A line above the progress bars (or to absl's log without bars)."""
        (tqdm.write if self.progress else logging.info)(f"[{self.name}] {msg}")

    def n_of(self, n: int | None) -> int:
        """A requested subset size (None: every evaluation example) capped at the examples."""
        return len(self.x) if n is None else min(int(n), len(self.x))

    def examples_digest(self, n: int) -> str:
        """sha256 of the first n examples (images and labels), computed once per n."""
        if n not in self._digests:
            self._digests[n] = array_digest(self.x[:n], self.y[:n])
        return self._digests[n]

    def cached(
        self,
        kind: str,
        parts: dict[str, Any],
        compute: Callable[[], dict[str, np.ndarray]],
        required: dict[str, tuple | None],
    ) -> dict[str, np.ndarray]:
        """`compute()`, or its stored arrays when the cache has (kind, parts) for this model."""
        if self.cache is None:
            return compute()
        return self.cache.get_or_compute(kind, parts, compute, required)

    def robust_correct(
        self,
        name: str,
        value: float,
        settings: dict[str, Any],
        n: int,
        *,
        key: Array,
        attack_logits_fn: LogitsFn | None = None,
        attack_id: str | None = None,
        return_adv: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Per-example robustness on the first n examples: correct clean AND at x_adv.

        The attack may use another gradient path (`attack_logits_fn`, default the classifier's);
        the verdict is always the real prediction at the returned point, never the attack's flag.
        An EOT-capable attack (`AttackSpec.eot`) on the classifier's own gradient path gets the
        classifier's `sample_logits_fn` (randomised classifiers), when it has one.

        With a cache, the cell is stored under (model, attack, value, settings, n, key, examples,
        gradient path, batch size) and reused; `attack_id` names `attack_logits_fn`'s gradient
        path for the key (without it, a call with `attack_logits_fn` is never cached).
        """
        spec = registry.get(name)
        attack_fn = attack_logits_fn or self.classifier.logits_fn
        sampler = self.classifier.sample_logits_fn
        eot = bool(spec.eot and sampler is not None and attack_logits_fn is None)
        run_settings = {**settings, "sample_logits_fn": sampler} if eot else settings

        placed = _Placed(self.devices, (attack_fn, self.classifier.logits_fn, run_settings))

        def fn(xb, yb, k):
            a_fn, p_fn, kw = placed.on(xb)
            x_adv = spec.run(a_fn, xb, yb, key=k, value=value, **kw)
            return _jitted_argmax(p_fn)(x_adv) == yb, x_adv

        def compute() -> dict[str, np.ndarray]:
            ok, x_adv = ops.run_chunked(
                fn,
                self.x[:n],
                self.y[:n],
                batch_size=self.batch_size,
                key=key,
                desc=f"{spec.label} {value_label(spec.param, value)}",
                progress=self.progress,
                devices=self.devices,
            )
            return dict(ok=ok, x_adv=x_adv) if return_adv else dict(ok=ok)

        required: dict[str, tuple | None] = {"ok": (n,)}
        if return_adv:
            required["x_adv"] = self.x[:n].shape
        if attack_logits_fn is not None and attack_id is None:
            out = compute()
        else:
            parts = dict(
                attack=name,
                value=float(value),
                settings=settings,
                n=int(n),
                key=key_digest(key),
                examples=self.examples_digest(n),
                gradient="classifier" if attack_logits_fn is None else attack_id,
                eot=eot,
                batch_size=self.batch_size,
                # The chunks fold their index into the key: another chunking, another result.
                chunk=ops.chunk_size(n, self.batch_size, len(self.devices)),
            )
            out = self.cached("attack", parts, compute, required)
        correct = np.asarray(out["ok"], bool) & self.clean_correct[:n]
        return (correct, out["x_adv"]) if return_adv else correct
