"""Seconds spent compiling (tracing, lowering, XLA), for the studies' time budgets.

On a 2-core CPU a study's many small attack programs can spend more time in compilation than
in running; the time budgets report both so that a cut is aimed at the right one.
"""

from __future__ import annotations

import jax

# JAX's own monitoring events for one jit compilation (jax._src.dispatch).
_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_total = [0.0]
_registered = [False]


def _listener(event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event in _EVENTS:
        _total[0] += duration


def compile_seconds() -> float:
    """Seconds spent compiling in this process since the first call (a running total)."""
    if not _registered[0]:
        jax.monitoring.register_event_duration_secs_listener(_listener)
        _registered[0] = True
    return _total[0]
