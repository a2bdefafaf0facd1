"""A content-addressed store of evaluation results, so that reruns reuse and resume them.

An entry is one expensive unit of an evaluation (one attack at one strength on the first n
examples; one corruption at one severity) stored as an `.npz` under a key that is the sha256 of
everything its value depends on: the model (a fingerprint the caller supplies, e.g.
`model_fingerprint` of a trained run), the unit's settings, the examples, the PRNG key, and the
code and JAX version that compute it. A changed setting changes only the keys of the units it
enters, so only those rerun. Entries are written atomically (temporary file, then `os.replace`):
an interrupted evaluation leaves only whole entries, and the next run continues from them. An
entry that cannot be read is ignored with a warning and recomputed. Invalidate by deleting the
directory.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import typing
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

# Bump when the meaning of a stored value changes without the code fingerprint seeing it.
FORMAT_VERSION = 1

# Package parts that cannot change a stored value (reporting, configs, whose values enter the
# keys, the DEQ study, whose cached rows key on its own source); every other source file enters
# `code_fingerprint`, so an edit there invalidates the cache (study.py builds the EP gradient
# variants, so it is in).
_NOT_COMPUTATION = ("report/", "configs/", "results", "deq_study.py", "profiling.py", "cost.py")
_NOT_COMPUTATION += ("robustbench.py", "evaluation/health.py", "evaluation/cache.py")


class Uncacheable(TypeError):
    """A key part that has no canonical form (e.g. a function in an attack's settings)."""


@functools.cache
def code_fingerprint() -> str:
    """sha256 over the eqrobust sources that compute results, and the JAX/NumPy versions and
    backend (stored numbers are only reused by the code that would recompute them)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    h.update(f"{FORMAT_VERSION} jax {jax.__version__} numpy {np.__version__}".encode())
    h.update(f" backend {jax.default_backend()}".encode())
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(rel.startswith(p) for p in _NOT_COMPUTATION):
            continue
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _leaf_bytes(leaf: Any) -> tuple[str, bytes]:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    a = np.asarray(leaf)
    if a.dtype == object:
        raise Uncacheable(f"model state leaf of type {type(leaf).__name__} has no bytes")
    return f"{a.dtype.str}{a.shape}", np.ascontiguousarray(a).tobytes()


def model_fingerprint(state: Any, config: ml_collections.ConfigDict | Mapping, name: str) -> str:
    """sha256 of a trained model: every array of `state` (params, batch statistics, ...; shapes,
    dtypes and bytes, in tree order), its config (sorted JSON) and the classifier's name."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(state):
        meta, data = _leaf_bytes(leaf)
        h.update(meta.encode() + b"\0" + data)
    cfg = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    h.update(canonical(cfg).encode() + b"\0" + name.encode())
    return h.hexdigest()


def array_digest(*arrays: np.ndarray) -> str:
    """sha256 of arrays' dtypes, shapes and bytes (e.g. the examples x[:n], y[:n])."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode() + b"\0" + a.tobytes())
    return h.hexdigest()


def key_digest(key: jax.Array) -> str:
    """The PRNG key's raw data (typed or legacy uint32 keys) as hex, with its implementation."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(key))
        data = np.asarray(jax.random.key_data(key))
    else:
        impl, data = "raw", np.asarray(key)
    return f"{impl}:{data.dtype.str}{data.shape}:{data.tobytes().hex()}"


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, ml_collections.ConfigDict):
        return v.to_dict()
    raise Uncacheable(f"{type(v).__name__} {v!r} has no canonical form for a cache key")


def canonical(parts: Mapping[str, Any]) -> str:
    """Sorted, compact JSON of `parts` (tuples as lists, NumPy scalars as numbers); raises
    `Uncacheable` for anything else (functions, arrays), never falling back to an unstable repr."""
    try:
        return json.dumps(parts, sort_keys=True, separators=(",", ":"), default=_plain)
    except (TypeError, ValueError) as e:  # e.g. keys of mixed types, which cannot be sorted
        raise Uncacheable(str(e)) from e


class EvalCache:
    """Entries of one model's evaluation in `directory` (created on the first store).

    Attributes:
      directory: where the `.npz` entries go (e.g. `<model workdir>/eval_cache`).
      model_id: the model's fingerprint; part of every key.
      hits, misses: counts of this run (hits are logged at the end of each evaluation).
    """

    def __init__(self, directory: str, model_id: str):
        if not model_id:
            raise ValueError(
                "a cache needs the model's fingerprint (cache_id), e.g. "
                "eqrobust.evaluation.cache.model_fingerprint(trained.state, trained.config, name)"
            )
        self.directory = directory
        self.model_id = str(model_id)
        self.hits = 0
        self.misses = 0

    def key(self, kind: str, parts: Mapping[str, Any]) -> tuple[str, str]:
        """(file name, canonical description) of an entry; raises `Uncacheable`."""
        desc = canonical(
            dict(kind=kind, model=self.model_id, code=code_fingerprint(), parts=dict(parts))
        )
        return f"{kind}-{hashlib.sha256(desc.encode()).hexdigest()}.npz", desc

    def load(self, fname: str, desc: str, required: Mapping[str, tuple]) -> dict | None:
        """The entry's arrays, or None when it is missing, unreadable, for another key, or lacks
        an array of `required` (name -> shape; a shape of None only needs the name)."""
        path = os.path.join(self.directory, fname)
        if not os.path.exists(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                out = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            logging.warning("eval cache: ignoring unreadable entry %s (%s); recomputing", path, e)
            return None
        if str(out.pop("_key", "")) != desc:
            logging.warning("eval cache: entry %s belongs to another key; recomputing", path)
            return None
        for k, shape in required.items():
            if k not in out or (shape is not None and out[k].shape != tuple(shape)):
                return None
        return out

    def store(self, fname: str, desc: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Writes the entry atomically: a killed process leaves no partial file under `fname`."""
        os.makedirs(self.directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, _key=np.asarray(desc), **{k: np.asarray(v) for k, v in arrays.items()})
            os.replace(tmp, os.path.join(self.directory, fname))
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def get_or_compute(
        self,
        kind: str,
        parts: Mapping[str, Any],
        compute: Callable[[], dict[str, np.ndarray]],
        required: Mapping[str, tuple | None],
    ) -> dict[str, np.ndarray]:
        """The stored arrays of (kind, parts), or `compute()`'s, stored for the next run."""
        try:
            fname, desc = self.key(kind, parts)
        except Uncacheable as e:
            logging.info("eval cache: not caching this %s (%s)", kind, e)
            return compute()
        hit = self.load(fname, desc, required)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        out = compute()
        self.store(fname, desc, out)
        return out


def _cast(tp: Any, a: np.ndarray) -> Any:
    v = a.item()
    return str(v) if tp is str else bool(v) if tp is bool else int(v) if tp is int else float(v)


def fields_to_arrays(fields: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flat dataclasses of scalars (e.g. the probes' results) -> arrays "<key>.<field>"."""
    return {
        f"{k}.{f.name}": np.asarray(getattr(v, f.name))
        for k, v in fields.items()
        for f in dataclasses.fields(v)
    }


def arrays_to_fields(arrays: Mapping[str, np.ndarray], types: Mapping[str, type]) -> dict:
    """The inverse of `fields_to_arrays` for the keys of `types` present in `arrays`."""
    out = {}
    for k, tp in types.items():
        if f"{k}.{dataclasses.fields(tp)[0].name}" not in arrays:
            continue
        hints = typing.get_type_hints(tp)
        out[k] = tp(
            **{
                f.name: _cast(hints[f.name], arrays[f"{k}.{f.name}"])
                for f in dataclasses.fields(tp)
            }
        )
    return out


def field_shapes(types: Mapping[str, type]) -> dict[str, tuple]:
    """`required` for an entry of `fields_to_arrays` over `types`: every field, a scalar."""
    return {f"{k}.{f.name}": () for k, tp in types.items() for f in dataclasses.fields(tp)}
