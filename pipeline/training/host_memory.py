"""Keep freed host memory for reuse: glibc's malloc otherwise hands large blocks back to the kernel.

Why by hand: glibc serves every allocation above its mmap threshold (128 KiB, growing to at most 32 MiB)
with a fresh mmap and unmaps it on free, so each large tensor a training step allocates is page-faulted
in again, 4 KiB at a time, on every step. On the 2-core CPU machine a 128-channel StyleGAN2 step took
~170k minor faults and ~0.45 s of kernel time per iteration this way (measured with getrusage), about
15% of its CPU time. jemalloc or tcmalloc (LD_PRELOAD) would fix it too, but must be installed and set
before the process starts; glibc's own `mallopt` does it from inside: never mmap (M_MMAP_MAX = 0) and
never trim the heap (M_TRIM_THRESHOLD = INT_MAX), so freed blocks stay in the process for the next
step. The costs: the resident size stays at its high-water mark, and it grows a little above it,
because a freed block is reused only once it has merged with a freed neighbour (PyTorch allocates with
posix_memalign, which asks for slightly more than the size that was freed), so the heap holds a few
spare copies of the largest tensors. Measured (bench/train_throughput.py, StyleGAN2 CIFAR setting):
peak RSS 1.54-1.62 GB against 1.50-1.55 GB at 128 channels, 6.1-6.4 GB against 4.4 GB at 512, for 0
instead of ~0.45 s kernel time per 128-channel step. `train.keep_host_memory=false` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_MAX = -4
INT_MAX = (1 << 31) - 1


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory in the process; False (nothing changed) off glibc Linux."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl's mallopt does nothing)
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1
