"""The process's memory allocator, where it decides what bounded-memory work really costs.

PyTorch's CPU tensors come from malloc. glibc keeps freed memory for reuse rather than handing it
back, so a pass that frees as much as it allocates, block after block, still shows a resident
size that grows. Both calls are glibc-only and do nothing elsewhere (macOS, musl).
"""

from __future__ import annotations

import os
from typing import Any


def _libc() -> Any:
    """glibc, or False where there is none (macOS, musl): the allocator calls below are then no-ops."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else False
        except OSError:
            _LIBC = False
    return _LIBC


def release_freed_memory() -> None:
    """Hand memory that tensors have freed back to the operating system (glibc only; a no-op
    elsewhere). glibc keeps freed heap blocks for reuse, so without this the resident size of a
    block-by-block pass only ever grows: each block's transient statistics and factorization
    buffers would stay counted long after they are gone."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_ALLOCATION_BYTES = 1 << 20


def map_large_allocations(threshold: int = LARGE_ALLOCATION_BYTES) -> bool:
    """Serve every allocation of `threshold` bytes or more from a memory map of its own, for the
    rest of the process, so a freed tensor's pages go back to the system at once (glibc only;
    returns whether it took effect).

    glibc starts by mapping allocations of 128 KB and up, but raises that threshold to the size
    of each mapped block freed, up to 32 MB. After the first few tensors are freed, every tensor
    of a few MB comes from the heap instead, and freed heap memory is reused only by requests that
    fit it: within one block of a streamed pass the resident size grew by 250–330 MB that only
    the trim between blocks gave back (SmolLM2; 0.7× the whole float32 model). A fixed threshold
    stops that, at the cost of the page faults of a fresh map for each large tensor. A threshold
    set by the environment (MALLOC_MMAP_THRESHOLD_) is left as it is."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:  # the user's own setting, which glibc has already applied
        return False
    libc = _libc()
    return bool(libc) and bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))


_LIBC: Any = None
