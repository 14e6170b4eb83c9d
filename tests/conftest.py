"""Test session setup: 4 fake CPU devices for the multi-device tests, fast compiles."""

import os

# Must happen before JAX is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)

import contextlib  # noqa: E402

import pytest  # noqa: E402


@contextlib.contextmanager
def _without_xla_optimizations():
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def fast_compile():
    """XLA's optimisations off for a test that compiles large programs (train steps, the
    RPN): they cost compile time, and change no result the test compares (every program it
    compares runs under the same setting)."""
    with _without_xla_optimizations():
        yield


@pytest.fixture(scope="module")
def fast_compile_module():
    """:func:`fast_compile` for a whole module."""
    with _without_xla_optimizations():
        yield
