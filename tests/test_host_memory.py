"""Tests for jax_rpn.host_memory: the command runs again with huge pages, and XLA's step
temporaries then fault in 2 MiB at a time instead of 4 KiB."""

import os
import subprocess
import sys

from jax_rpn import host_memory

# A jitted function whose temporaries XLA allocates as one block of about 100 MiB: over
# glibc's 32 MiB mmap limit and a thread arena's 64 MiB heap, so glibc maps and unmaps it on
# every call. The minor page faults of ten calls after the first are counted (getrusage).
SCRIPT = """
import os, resource, sys
if sys.argv[1] == "huge":
    from jax_rpn import host_memory
    host_memory.reexec_with_huge_pages()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.cumsum(jnp.sin(x), axis=0) @ jnp.ones((x.shape[1], 8))).sum())
x = jnp.full((3072, 4096), 0.5)
compiled = f.lower(x).compile()
temp = compiled.memory_analysis().temp_size_in_bytes
compiled(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    compiled(x).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(os.getpid(), os.environ.get("GLIBC_TUNABLES", "-"), temp, faults)
"""


def test_huge_pages_cut_the_faults_of_each_call():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    runs = {
        mode: subprocess.Popen(
            [sys.executable, "-c", SCRIPT, mode], stdout=subprocess.PIPE, text=True, env=env
        )
        for mode in ("default", "huge")
    }
    results = {mode: run.communicate(timeout=300)[0].split() for mode, run in runs.items()}
    pid, tunables, temp, faults = results["huge"]
    _, default_tunables, _, default_faults = results["default"]
    assert int(temp) > 64 * 2**20  # the case the module is for
    assert default_tunables == "-"
    # glibc's defaults: each call faults every 4 KiB page of the block in again.
    assert int(default_faults) * 4096 / int(temp) > 9
    assert int(pid) == runs["huge"].pid  # run again in place: the same process
    if host_memory.huge_pages_available():
        assert tunables == host_memory.TUNABLE
        # 2 MiB pages: 512 times fewer faults, under one block's worth in ten calls.
        assert int(faults) * 4096 / int(temp) < 1
    else:
        assert tunables == "-"


def test_an_existing_hugetlb_setting_is_kept():
    # GLIBC_TUNABLES naming the tunable (here: off) is the user's choice: no run again.
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    script = (
        "from jax_rpn import host_memory; print('start', flush=True); "
        "host_memory.reexec_with_huge_pages(); print('end')"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout == "start\nend\n"  # run again, it would print "start" twice


def test_keep_default_pages_adds_the_off_setting_once(monkeypatch):
    # The benchmarks' --glibc-malloc: glibc's default (hugetlb=0) for this process and its
    # children, appended to the user's other tunables; a user's own hugetlb setting is kept.
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")
    host_memory.keep_default_pages()
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=0"
    monkeypatch.delenv("GLIBC_TUNABLES")
    host_memory.keep_default_pages()
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    host_memory.keep_default_pages()
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
