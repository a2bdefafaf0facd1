"""XLA compiler options per model, for programs jitted once at module level.

The attacks, probes and defences are module-level jits shared by every model, so a process-wide
XLA flag is the only knob JAX offers them. Some options help one architecture and hurt another:
on XLA:CPU, LLVM optimisation level 1 runs the DEQ's attack programs ~1.4x faster and the
EP-CNN's forward ~1.3x slower (BUILD_NOTES.md, "Compiler options per model"). `jit` is `jax.jit`
whose compiler options follow the `options(...)` context the call runs in: each distinct option
set gets its own `jax.jit(fun, compiler_options=...)` (the public API), so programs compiled
under different options never share a cache entry. `Classifier.compiler_options` states a model's
choice; the evaluation enters `options(classifier.compiler_options)` around its work.

Context variables do not cross into new threads by themselves: code that hands work to a thread
pool runs it in `contextvars.copy_context()` (as `ops.run_chunked` does).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax

Options = tuple[tuple[str, Any], ...]

_current: contextvars.ContextVar[Options] = contextvars.ContextVar(
    "eqrobust_compiler_options", default=()
)


def normalized(opts: Mapping[str, Any] | Options | None) -> Options:
    """Options as a sorted tuple of (name, value) pairs (hashable; () for none)."""
    if not opts:
        return ()
    items = opts.items() if isinstance(opts, Mapping) else opts
    out = tuple(sorted((str(k), v) for k, v in items))
    for k, v in out:
        if not isinstance(v, bool | int | float | str):
            raise TypeError(f"compiler option {k!r}: value must be bool/int/float/str, got {v!r}")
    return out


def current() -> Options:
    """The compiler options the calling context compiles with."""
    return _current.get()


@contextlib.contextmanager
def options(opts: Mapping[str, Any] | Options | None) -> Iterator[Options]:
    """Programs first compiled by `jit` functions inside this block use these XLA options.

    None or {} means XLA's defaults (also inside an outer `options` block).
    """
    token = _current.set(normalized(opts))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def jit(fun: Callable | None = None, /, **jit_kwargs: Any) -> Callable:
    """`jax.jit(fun, **jit_kwargs)` compiled with the calling context's `options`.

    Usable as `@jit`, `@functools.partial(jit, static_argnames=...)` or `jit(fun, ...)`.
    The returned function also has `variants()`, the option sets it was called with, and
    `_cache_size()`, jax.jit's count of compiled programs summed over them. An explicit
    `compiler_options=` fixes the options (plain `jax.jit`; the context is ignored): for programs
    whose options do not depend on the model, e.g. the evaluation's run-once probes.
    """
    if fun is None:
        return functools.partial(jit, **jit_kwargs)
    if "compiler_options" in jit_kwargs:
        return jax.jit(fun, **jit_kwargs)
    variants: dict[Options, Callable] = {(): jax.jit(fun, **jit_kwargs)}
    lock = threading.Lock()

    @functools.wraps(fun)
    def call(*args: Any, **kwargs: Any) -> Any:
        opts = _current.get()
        if not opts or _traced(args, kwargs):
            # XLA options belong to the top-level program only (JAX refuses them on a nested
            # jit): a call traced into another program compiles with that program's options.
            return variants[()](*args, **kwargs)
        f = variants.get(opts)
        if f is None:
            with lock:
                f = variants.get(opts)
                if f is None:
                    f = variants[opts] = jax.jit(fun, compiler_options=dict(opts), **jit_kwargs)
        token = _current.set(())  # functions traced while `f` compiles are nested jits
        try:
            return f(*args, **kwargs)
        finally:
            _current.reset(token)

    call.variants = lambda: tuple(variants)  # type: ignore[attr-defined]
    # jax.jit's count of compiled programs, over every variant (tests check for recompilation).
    call._cache_size = lambda: sum(f._cache_size() for f in variants.values())  # type: ignore[attr-defined]
    return call


def _traced(args: tuple, kwargs: dict) -> bool:
    """Whether a call is being traced into an enclosing transformation (a Tracer argument)."""
    return any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves((args, kwargs)))
