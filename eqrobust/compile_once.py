"""One XLA compilation per program for all host devices of XLA:CPU.

JAX compiles a jitted function separately for every device it runs on: the device assignment is
part of the compile options. With XLA:CPU split into host devices (`eqrobust.host.split_cpu`),
every chunked evaluation program (`ops.run_chunked(devices=...)`) was compiled once per device,
concurrently, and since XLA's compiler itself keeps both cores busy the two compilations took
twice the wall time of one (BUILD_NOTES.md, "One compilation for both host devices").

`install()` wraps JAX's compile step (`jax._src.compiler.compile_or_get_cached`, a private
function: the wrapper checks its signature and stays out where it differs) so that a CPU program
that differs from an earlier one only in its single-device assignment is not compiled again: the
first compilation is serialised and loaded onto the other device
(`backend.deserialize_executable` with that device's compile options, as JAX's own
multi-process compile sharing does). A caller that arrives while the same program compiles waits
for it. Anything unexpected on the shared path falls back to JAX's own compilation. Same HLO,
same options: the loaded program computes what a fresh compilation would
(`tests/test_devices.py`).
"""

from __future__ import annotations

import collections
import hashlib
import inspect
import threading
from typing import Any

import numpy as np

try:  # JAX internals: with another layout `install()` changes nothing
    from jax._src import compiler
    from jax._src.interpreters import mlir
    from jax._src.lib import xla_client as xc
except ImportError:  # pragma: no cover - depends on the JAX version
    compiler = mlir = xc = None

# Serialised programs kept for the other devices; the oldest go first beyond this many bytes.
MAX_BYTES = 512 * 2**20

_EXPECTED = [
    "backend",
    "computation",
    "devices",
    "compile_options",
    "host_callbacks",
    "executable_devices",
    "pgle_profiler",
]
_lock = threading.Lock()
_entries: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
_counts = {"compiled": 0, "loaded": 0}
_original: Any = None


class _Entry:
    """One program: `ready` is set once its first compilation ended; `blob` is the serialised
    executable (None if that compilation or its serialisation failed)."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.blob: bytes | None = None


def install() -> bool:
    """Wraps JAX's compile step (idempotent). Returns False, changing nothing, when this JAX's
    compile step does not have the expected signature."""
    global _original
    with _lock:
        if _original is not None:
            return True
        fn = None if compiler is None else getattr(compiler, "compile_or_get_cached", None)
        if fn is None or list(inspect.signature(fn).parameters) != _EXPECTED:
            return False
        _original = fn
        compiler.compile_or_get_cached = _compile_or_load
        return True


def uninstall() -> None:
    """Restores JAX's compile step and drops the kept programs."""
    global _original
    with _lock:
        if _original is not None:
            compiler.compile_or_get_cached = _original
            _original = None
    clear()


def clear() -> None:
    """Drops the kept serialised programs (e.g. beside `jax.clear_caches()`)."""
    with _lock:
        _entries.clear()


def counts() -> dict[str, int]:
    """Programs compiled through the shared path and programs loaded instead of compiled."""
    with _lock:
        return dict(_counts)


def _key(computation: Any, compile_options: Any) -> str:
    """The program and its compile options with the device assignment set to device 0."""
    opts = xc.CompileOptions.ParseFromString(compile_options.SerializeAsString())
    opts.device_assignment = xc.DeviceAssignment.create(np.zeros((1, 1), dtype=int))
    h = hashlib.sha256(mlir.module_to_bytecode(computation))
    h.update(opts.SerializeAsString())
    return h.hexdigest()


def _shareable(backend: Any, devices: np.ndarray, compile_options: Any, host_callbacks) -> bool:
    return (
        backend.platform == "cpu"
        and devices.size == 1
        and not host_callbacks
        and compile_options.device_assignment is not None
        and len(backend.local_devices()) > 1
    )


def _compile_or_load(
    backend,
    computation,
    devices,
    compile_options,
    host_callbacks,
    executable_devices,
    pgle_profiler=None,
):
    args = (backend, computation, devices, compile_options, host_callbacks, executable_devices)
    try:
        shareable = _shareable(backend, devices, compile_options, host_callbacks)
        key = _key(computation, compile_options) if shareable else None
    except Exception:  # noqa: BLE001 - any surprise: JAX's own path
        key = None
    if key is None:
        return _original(*args, pgle_profiler)
    with _lock:
        entry = _entries.get(key)
        first = entry is None
        if first:
            entry = _entries[key] = _Entry()
        else:
            _entries.move_to_end(key)
    if first:
        try:
            exe = _original(*args, pgle_profiler)
            try:
                entry.blob = exe.serialize()
            except Exception:  # noqa: BLE001 - not serialisable: the others compile their own
                entry.blob = None
            with _lock:
                _counts["compiled"] += 1
                _evict()
            return exe
        finally:
            entry.ready.set()
    entry.ready.wait()
    if entry.blob is not None:
        try:
            exe = backend.deserialize_executable(entry.blob, executable_devices, compile_options)
        except Exception:  # noqa: BLE001
            exe = None
        if exe is not None:
            with _lock:
                _counts["loaded"] += 1
            return exe
    return _original(*args, pgle_profiler)


def _evict() -> None:
    """Drops the least recently used finished programs beyond MAX_BYTES (caller holds _lock)."""
    total = sum(len(e.blob or b"") for e in _entries.values())
    for k in list(_entries):
        if total <= MAX_BYTES:
            break
        e = _entries[k]
        if e.ready.is_set():
            total -= len(e.blob or b"")
            del _entries[k]
