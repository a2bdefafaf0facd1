"""Process setup for the experiment binaries; imports no JAX (it must run before JAX starts)."""

from __future__ import annotations

import os


def split_cpu(count: int | None = None) -> None:
    """Splits XLA:CPU into `count` host devices (default: the CPU count, at most 8) by XLA_FLAGS,
    unless the flags already choose a count.

    The evaluation then runs the chunks of an attack concurrently, one per device
    (`eqrobust.ops.run_chunked(devices=...)`): an attack through small convolutions in while
    loops keeps about one core busy per program, so two programs use both cores of a 2-core
    machine (BUILD_NOTES.md, "Both cores"). Programs that are not split run on the first device
    as before. Takes effect only before JAX initialises its backends: call it first thing.
    """
    count = min(os.cpu_count() or 1, 8) if count is None else int(count)
    flags = os.environ.get("XLA_FLAGS", "")
    if count >= 2 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def memory_map_fraction() -> float:
    """The fraction of the kernel's per-process memory-map limit (`vm.max_map_count`) this process
    uses, or 0.0 where /proc does not say (not Linux).

    XLA:CPU maps every compiled program's code into memory (a few mappings each) and keeps it
    while JAX's caches hold the program; a long study compiles thousands of programs, and at the
    limit LLVM aborts the process ("Unable to allocate section memory": `study.py:cpu,zoo`, in
    its ninth model). Callers free the caches (`jax.clear_caches()`) when this gets high.
    """
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            limit = int(f.read())
        with open("/proc/self/maps") as f:
            used = sum(1 for _ in f)
    except (OSError, ValueError):
        return 0.0
    return used / limit if limit > 0 else 0.0
