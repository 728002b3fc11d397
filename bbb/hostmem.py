"""Keep freed host memory in the process, so that each XLA:CPU call does not page-fault afresh.

XLA's CPU runtime allocates a program's temporaries (the intermediates of a training step: the
noise, the sampled weights, their gradients; one 35 MiB block for the MLP step at H = 1200,
`compiled.memory_analysis().temp_size_in_bytes`) with the C library's `malloc` at each call
and frees it at the end. glibc serves a block above its mmap threshold (adaptive, at most
32 MiB) with a fresh `mmap` and returns it to the kernel on `free`, so the next call
touches new pages and takes a page fault, and the kernel's zeroing, for every one of them: at
H = 1200 that made one top-level training step ~1.5× slower than the same step inside a
`lax.scan`, whose loop reuses one allocation (README, "Performance"). The epoch loop
(`lax.scan`) pays it once per epoch; one compiled call per step (`epoch_loop = "steps"`, the
CNN), evaluation and the benchmark's isolated steps paid it every call.

`keep_freed_memory` tells glibc never to use `mmap` for allocations (`M_MMAP_MAX = 0`) and not
to give the top of the heap back (`M_TRIM_THRESHOLD`), so freed blocks are reused. The cost:
the process keeps its peak host memory until it exits. Accelerators are unaffected (their
buffers live in device memory) and so is anything but Linux with glibc, where this does
nothing. `BBB_KEEP_FREED_MEMORY=0` in the environment turns it off. The same policy can be
given to any other process with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=…` in its
environment (`PEER_ENV`, used for the benchmark's peer).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # The largest int: never trim.
ENV_SWITCH = "BBB_KEEP_FREED_MEMORY"
# The same policy for a process started with this environment (glibc reads it at start-up).
PEER_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD)}

_applied = False


def keep_freed_memory() -> bool:
    """Makes glibc keep and reuse freed memory in this process (see the module docstring).

    Safe to call more than once and at any time; later allocations follow the new policy.

    Returns:
      Whether the policy is in effect (False off Linux/glibc, or with
      BBB_KEEP_FREED_MEMORY=0).
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV_SWITCH, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success.
    _applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    return _applied


def is_kept() -> bool:
    """Whether `keep_freed_memory` has put the policy in effect in this process."""
    return _applied
