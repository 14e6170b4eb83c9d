"""Back the host memory XLA's CPU runtime allocates with huge pages, so a step faults less.

XLA's CPU runtime allocates a step's temporaries as one block, 126 MiB per device for the
default config, and frees it when the step ends. glibc's ``malloc`` serves a block that big
from a fresh ``mmap``, since a thread's arena grows in heaps of at most 64 MiB, and unmaps it
on ``free``. Each step then page-faults every 4 KiB page of it again, and the kernel zeroes
each one. That is 65,000 minor faults and 0.23 s of system time in each 0.95 s step of the
default config on 2 CPU devices (``benchmarks/README.md``).

With glibc's ``glibc.malloc.hugetlb=1`` tunable, ``malloc`` asks the kernel for transparent
huge pages (2 MiB) on the memory it maps: 512 times fewer faults. Tunables are read when a
process starts, so :func:`reexec_with_huge_pages` runs the command again with the tunable
set. Keeping freed memory instead (one arena, no ``mmap``, no trimming) also ends the faults,
but small allocations split the kept blocks and the heap grew by 4 blocks before it settled,
230 MiB over the default config's peak; big configs would pay that many times over.
"""

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_available() -> bool:
    """Whether this is Linux with glibc and transparent huge pages on request (``madvise``)
    or always (``always``)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        with open(_THP_MODE) as f:
            mode = f.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def reexec_with_huge_pages() -> None:
    """Run this process's command again (``os.execv``, same process id) with ``GLIBC_TUNABLES``
    set to :data:`TUNABLE`, added to what it holds. Does nothing where huge pages are not
    available or ``GLIBC_TUNABLES`` already names the tunable (set it to
    ``glibc.malloc.hugetlb=0`` to opt out). Call it first thing, before any work."""
    if not huge_pages_available() or not _set_tunable(TUNABLE):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def keep_default_pages() -> None:
    """Add ``glibc.malloc.hugetlb=0`` (glibc's default) to ``GLIBC_TUNABLES`` unless it names
    the tunable already, so that :func:`reexec_with_huge_pages` does nothing, in this process
    and in the processes it starts."""
    _set_tunable("glibc.malloc.hugetlb=0")


def _set_tunable(setting: str) -> bool:
    """Append ``setting`` (``glibc.malloc.hugetlb=N``) to ``GLIBC_TUNABLES``; False, and nothing
    changed, if it names that tunable already."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return False
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{setting}" if tunables else setting
    return True
