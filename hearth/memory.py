"""How Hearth's processes manage their memory.

Freed memory (the worker). On the CPU, torch takes every tensor from malloc
and frees it once used. With glibc's defaults, a large block is mapped fresh
and unmapped again, and free memory at the top of a heap goes back to the
operating system; each call then faults its working memory in again, page by
page, zeroed by the kernel. Measured on 2 cores: about 6,000 page faults per
embedding pass of 32 texts and per 256x256 demo-dit image; with the thresholds
below, none, and those calls ran 9-12% faster.

``keep_freed_memory`` sets glibc's malloc (``mallopt``) so that every thread
allocates from the one main heap (a thread's own heaps are at most 64 MiB and
are handed back whole once empty), blocks up to 32 MiB come from that heap,
and up to 1 GiB of free memory stays with the process for the next call. The
worker's resident memory then stays near the peak of its largest call, which
a worker has to be given anyway. It must run before the worker's models
first allocate. Elsewhere than on glibc it does nothing.

Startup objects (the API and the worker). Starting leaves hundreds of
thousands of objects that live as long as the process: FastAPI's routes and
schemas; torch, transformers and diffusers with their models. Python's cyclic
garbage collector walks all of them in each full pass: measured in the API at
concurrency 32, one pass every 2.5 s, each 40-80 ms with the event loop
stopped, freeing nothing. ``freeze_startup_objects`` takes them out of its
passes once a process is ready.
"""

from __future__ import annotations

import ctypes
import gc
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENAS = 1  # a worker runs its models on one thread; the others allocate little
MMAP_THRESHOLD = 32 * 2**20  # the most glibc allows: half of a thread arena's heap
TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Fix malloc's mmap and trim thresholds; whether it could (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process runs on
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (present in glibc only; musl's mallopt is a no-op)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return (
        bool(mallopt(M_ARENA_MAX, ARENAS))
        and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    )


def freeze_startup_objects() -> None:
    """Collect once, then leave every object alive now out of later collections."""
    gc.collect()
    gc.freeze()
