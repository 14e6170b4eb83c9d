"""Test session setup: 4 fake CPU devices for the multi-device tests, fast compiles, one
compilation cache and one prepared rpn_shapes/small per test process, slow modules first."""

import atexit
import os
import shutil
import tempfile

# Must happen before JAX is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)

# One persistent compilation cache per test process, set before anything compiles: many tests
# build the same small programs (the tiny config's init, train step, proposals) from new
# function objects, which jit's in-memory cache cannot share but this cache (keyed by the
# program and its compile options) does. A fresh clone starts with an empty one.
_CACHE = tempfile.mkdtemp(prefix="jax_rpn_test_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)

import contextlib  # noqa: E402

import pytest  # noqa: E402


def pytest_collection_modifyitems(items):
    """Modules marked ``slow`` (end-to-end runs of 20 s and more) first, each kept together.
    pytest-xdist's ``worksteal`` (pyproject.toml) gives each worker a contiguous half of the
    list and lets an idle one take the tail of the other's: both then end on short tests, and
    the tests of a module, which compile the same programs, share their worker's compilation
    cache."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


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


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> str:
    """A tfds data_dir holding rpn_shapes/small (96x128 images, 32 train / 12 validation),
    prepared once per test process; tests only read it."""
    from jax_rpn.data import shapes

    path = str(tmp_path_factory.mktemp("tfds"))
    shapes.ensure_prepared("rpn_shapes/small", data_dir=path)
    return path
