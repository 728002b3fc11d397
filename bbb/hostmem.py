"""Host memory for XLA:CPU: freed memory kept (no page faults afresh), the heap on huge pages.

XLA's CPU runtime allocates a program's temporaries (the intermediates of a training step: the
noise, the sampled weights, their gradients; one 35 MiB block for the MLP step at H = 1200,
`compiled.memory_analysis().temp_size_in_bytes`) with the C library's `malloc` at each call
and frees it at the end. glibc serves a block above its mmap threshold (adaptive, at most
32 MiB) with a fresh `mmap` and returns it to the kernel on `free`, so the next call
touches new pages and takes a page fault, and the kernel's zeroing, for every one of them: at
H = 1200 that made one top-level training step ~1.5× slower than the same step inside a
`lax.scan`, whose loop reuses one allocation (docs/performance.md). The epoch loop
(`lax.scan`) pays it once per epoch; one compiled call per step (`epoch_loop = "steps"`, the
CNN), evaluation and the benchmark's isolated steps paid it every call.

`keep_freed_memory` tells glibc never to use `mmap` for allocations (`M_MMAP_MAX = 0`), not
to give the top of the heap back (`M_TRIM_THRESHOLD`), and to pad every heap it grows by 64 MiB
(`M_TOP_PAD`), so freed blocks are reused. The pad is for XLA's own threads, which run the
programs and allocate from per-thread arenas: when a block does not fit the room left in its
arena's first heap (at most 64 MiB each), glibc maps a second heap for it, and on `free` it unmaps
any such heap left empty, whatever `M_TRIM_THRESHOLD` says, unless the heap before it has less
room than the pad; with a pad of a whole heap it never has. Without the pad the 35 MiB of the
`local_reparam` step at H = 1200 were mapped and faulted in afresh at most calls (tens to
hundreds of page faults a call; docs/performance.md). Blocks over 64 MiB fit no heap, and are
still mapped at each call. The cost: the process keeps its peak host memory until it exits.
Accelerators are unaffected (their buffers live in device memory) and so is anything but Linux
with glibc, where this does nothing. `BBB_KEEP_FREED_MEMORY=0` in the environment turns it off.

`restart_with_huge_pages` backs that memory with transparent huge pages (2 MiB). Where the
kernel gives them only to memory that asks (`/sys/kernel/mm/transparent_hugepage/enabled` is
`madvise`, the common default), glibc asks for its heap only when started with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc ≥ 2.35), read once at start-up, so the scripts
re-execute themselves once with it (the same command line and process id), before any compute.
With 4 KiB pages, a step that streams ~70 MiB of temporaries (the paper's step at H = 1200,
scale-mixture prior and MC KL) spends much of its time translating addresses (its time
jumped between ~25 and ~45 ms from one process to the next with the pages it was given); with
huge pages it ran 1.6–1.7× faster, for every estimator; the closed-form Gaussian step, which
streams less, ran as fast as before, and so did everything at H = 400 (docs/performance.md).
`BBB_HUGE_PAGES=0` turns it off.

Both are for XLA:CPU: the scripts apply them only where JAX will compute on the CPU
(`jax_computes_on_cpu`: `JAX_PLATFORMS` says cpu, or no GPU/TPU plugin is installed), so on an
accelerator host the process neither re-executes itself nor keeps its peak host memory.

The same policies can be given to any other process through its environment (`PEER_ENV`;
`peer_environment` builds the benchmark's peer's from this process's own).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import sys

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # The largest int: never trim.
# glibc's largest heap of a per-thread arena on 64-bit hosts (HEAP_MAX_SIZE, twice the largest
# mmap threshold): as a top pad, it keeps every emptied heap mapped (the module docstring).
HEAP_BYTES = 64 * 2**20
ENV_SWITCH = "BBB_KEEP_FREED_MEMORY"
HUGE_PAGES_SWITCH = "BBB_HUGE_PAGES"
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_RESTARTED = "BBB_HUGE_PAGES_RESTARTED"  # Set in the re-executed process: never twice.
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
# Freed memory kept, for a process started with this environment (glibc reads it at start-up).
KEEP_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD),
    "MALLOC_TOP_PAD_": str(HEAP_BYTES),
}
# Both policies: freed memory kept, and the heap on huge pages.
PEER_ENV = {**KEEP_ENV, "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}
# Every environment variable glibc's malloc reads at start-up (the aliases of its
# glibc.malloc.* tunables), KEEP_ENV's among them.
MALLOC_ENV = (
    "MALLOC_ARENA_MAX",
    "MALLOC_ARENA_TEST",
    "MALLOC_CHECK_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_PERTURB_",
    "MALLOC_TOP_PAD_",
    "MALLOC_TRIM_THRESHOLD_",
)

_applied = False
# Distributions whose presence means JAX computes on an accelerator by default.
ACCELERATOR_PACKAGES = re.compile(
    r"^(jax[-_]cuda\d+[-_](plugin|pjrt)|libtpu|jax[-_]rocm\d*[-_](plugin|pjrt))"
)


def jax_computes_on_cpu(environ: dict[str, str] | None = None) -> bool:
    """Whether JAX will compute on the CPU: `JAX_PLATFORMS` names cpu first, or, unset, no
    CUDA, ROCm or TPU plugin of JAX is installed (read from package metadata, without
    importing JAX, so a script can decide before any compute)."""
    import importlib.metadata

    platforms = (os.environ if environ is None else environ).get("JAX_PLATFORMS", "")
    if platforms.strip():
        return platforms.split(",")[0].strip().lower() == "cpu"
    names = (dist.metadata["Name"] or "" for dist in importlib.metadata.distributions())
    return not any(ACCELERATOR_PACKAGES.match(name.lower()) for name in names)


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
    _applied = all(
        mallopt(param, value) == 1
        for param, value in (
            (_M_MMAP_MAX, 0),
            (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
            (_M_TOP_PAD, HEAP_BYTES),
        )
    )
    return _applied


def is_kept() -> bool:
    """Whether `keep_freed_memory` has put the policy in effect in this process."""
    return _applied


def thp_mode(path: str = _THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode: "always", "madvise", "never", or None."""
    try:
        with open(path) as f:
            match = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return match.group(1) if match else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library if it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = (int(part) for part in version.split(".")[:2])
    except (AttributeError, ValueError, OSError):
        return None
    return (major, minor) if name == "glibc" else None


def huge_pages_environment(
    environ: dict[str, str], mode: str | None, glibc: tuple[int, int] | None
) -> dict[str, str] | None:
    """The environment to re-execute with for huge pages, or None if it would change nothing.

    Args:
      environ: the current environment.
      mode: `thp_mode()`; only "madvise" needs glibc's tunable ("always" gives huge pages to
        every large mapping already, "never" to none).
      glibc: `glibc_version()`; the tunable exists from 2.35.

    Returns:
      `environ` with `glibc.malloc.hugetlb=1` added to GLIBC_TUNABLES, or None when it is off
      (BBB_HUGE_PAGES=0), already decided (the tunable is set, or this is the re-executed
      process) or of no use here.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (
        environ.get(HUGE_PAGES_SWITCH, "1") == "0"
        or environ.get(_RESTARTED) == "1"
        or "glibc.malloc.hugetlb" in tunables
        or mode != "madvise"
        or glibc is None
        or glibc < (2, 35)
    ):
        return None
    return {
        **environ,
        "GLIBC_TUNABLES": ":".join(t for t in (tunables, HUGE_PAGES_TUNABLE) if t),
        _RESTARTED: "1",
    }


def restart_with_huge_pages() -> None:
    """Re-executes this process once with glibc's huge-page tunable (the module docstring).

    Same interpreter, command line (`sys.orig_argv`), process id and open files; returns
    without doing anything where huge pages are off, already in effect or of no use. Call it
    only from a script's start, before any compute: the process image is replaced.
    """
    env = huge_pages_environment(dict(os.environ), thp_mode(), glibc_version())
    if env is None or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    if sys.argv[:1] in ([""], ["-"]):  # Interactive, or a program read from stdin: no rerun.
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def huge_pages_in_effect() -> bool:
    """Whether glibc gives this process's heap huge pages (the tunable, or THP "always")."""
    mode = thp_mode()
    if mode == "always":
        return True
    return mode == "madvise" and HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "")


def peer_environment(
    environ: dict[str, str], *, keep_freed: bool, huge_pages: bool
) -> dict[str, str]:
    """The environment for a process that bbb starts but does not run (the benchmark's peer).

    Every malloc setting is taken out of `environ` (glibc's `MALLOC_*` variables and the
    `glibc.malloc.*` entries of GLIBC_TUNABLES; other tunables stay), then the policies asked
    for are put back, so that the process runs under exactly these policies and no others.

    Args:
      environ: the environment to start from.
      keep_freed: keep freed memory (`keep_freed_memory`'s policy, through KEEP_ENV).
      huge_pages: add the huge-page tunable to GLIBC_TUNABLES.
    """
    env = {k: v for k, v in environ.items() if k not in MALLOC_ENV}
    tunables = [
        t
        for t in env.pop("GLIBC_TUNABLES", "").split(":")
        if t and not t.startswith("glibc.malloc.")
    ]
    if keep_freed:
        env.update(KEEP_ENV)
    if huge_pages:
        tunables.append(HUGE_PAGES_TUNABLE)
    if tunables:
        env["GLIBC_TUNABLES"] = ":".join(tunables)
    return env
