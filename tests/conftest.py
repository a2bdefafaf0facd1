"""Shared pytest setup: keep JAX on CPU and quiet; free compiled programs after each test module;
the `x64` fixture (float64 in one test)."""

import gc
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Runs the test with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops JAX's compiled programs after each test module.

    XLA:CPU maps every compiled program's code into memory (3 mappings each). A whole-suite run
    kept ~20 000 of them, reached the kernel's `vm.max_map_count` (65 530) and segfaulted inside
    LLVM while compiling (CI, test 333 of 335). Clearing the caches unmaps them; a module that
    needs a program again recompiles it.
    """
    yield
    jax.clear_caches()
    gc.collect()
