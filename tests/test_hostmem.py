"""bbb.hostmem: freed host memory is kept and reused, so reallocating it takes no page faults."""

import glob
import json
import os
import subprocess
import sys

import pytest

from bbb import hostmem
from tests.conftest import REPO

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Allocates a 64 MiB block with the C library's malloc (as XLA:CPU does), touches every page,
# reads where malloc took it from (mallinfo2: bytes in mmapped blocks) and frees it, three
# times, counting the minor page faults of each round. With glibc's defaults the block is
# mmapped afresh every time (16,384 faults of 4 KiB pages); with the policy it comes from the
# heap, and after the first round its pages are already mapped.
# Both probes start so: the policy applied or not, the C library's malloc and free at hand.
_PREAMBLE = """
import ctypes, json, resource, sys, threading
sys.path.insert(0, {root!r})
from bbb import hostmem
kept = hostmem.keep_freed_memory() if {keep} else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
"""
_PROBE = """
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
size = 64 * 2**20
faults, mmapped = [], []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    mmapped.append(libc.mallinfo2().hblkhd)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"kept": kept, "is_kept": hostmem.is_kept(), "faults": faults,
                  "mmapped": mmapped}}))
"""


def _run_probe(body: str, keep: bool, env: dict, **fields) -> dict:
    program = (_PREAMBLE + body).format(root=_ROOT, keep=keep, **fields)
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _probe(keep: bool, env: dict | None = None) -> dict:
    return _run_probe(_PROBE, keep, {**os.environ, **(env or {})})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.skipif(
    hostmem.thp_mode() == "always", reason="huge pages everywhere: 64 MiB take ~32 page faults"
)
def test_kept_memory_is_reused_without_page_faults():
    default = _probe(keep=False)
    kept = _probe(keep=True)
    assert not default["kept"] and kept["kept"] and kept["is_kept"]
    size = 64 * 2**20
    # Without the policy the block is mmapped, and every round faults all 16,384 pages in again.
    assert min(default["mmapped"]) >= size
    assert min(default["faults"]) >= 16_000
    # With it the block comes from the heap, and only the first round maps its pages.
    assert max(kept["mmapped"]) < size
    assert kept["faults"][0] >= 16_000
    assert max(kept["faults"][1:]) < 500
    # The environment form (for processes bbb does not start, e.g. the benchmark's peer).
    by_env = _probe(keep=False, env=hostmem.PEER_ENV)
    assert max(by_env["mmapped"]) < size and max(by_env["faults"][1:]) < 500


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_switched_off_by_the_environment():
    probe = _probe(keep=True, env={hostmem.ENV_SWITCH: "0"})
    assert not probe["kept"]
    assert min(probe["mmapped"]) >= 64 * 2**20  # glibc's default: the block is mmapped again.


# On a thread of its own (as XLA:CPU runs a program), holds a 40 MiB block, then allocates,
# touches and frees a 32 MiB one three times, counting the minor page faults of each round. The
# 32 MiB do not fit the 24 MiB left in the thread's arena's first heap (64 MiB at most), so glibc
# maps a second heap for them; with glibc's default top pad it unmaps that heap again on `free`
# (trim threshold or not), and every round faults its 8,192 pages in afresh.
_THREAD_PROBE = """
if {top_pad} is not None:
    libc.mallopt(-2, {top_pad})  # M_TOP_PAD
faults = []
def work():
    held = libc.malloc(40 * 2**20)
    ctypes.memset(held, 1, 40 * 2**20)
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(32 * 2**20)
        ctypes.memset(block, 1, 32 * 2**20)
        libc.free(block)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(held)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps({{"kept": kept, "faults": faults}}))
"""


def _thread_probe(keep: bool, top_pad: int | None = None, env: dict | None = None) -> dict:
    # Without the caller's malloc settings or huge pages (4 KiB pages: 8,192 faults a round).
    base = hostmem.peer_environment(dict(os.environ), keep_freed=False, huge_pages=False)
    return _run_probe(_THREAD_PROBE, keep, {**base, **(env or {})}, top_pad=top_pad)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.skipif(hostmem.thp_mode() == "always", reason="huge pages everywhere")
def test_a_threads_second_heap_is_kept_between_calls():
    # The mechanism, on this glibc: freed memory kept, but the top pad back at glibc's default
    # (0), and every round maps the second heap afresh.
    unpadded = _thread_probe(keep=True, top_pad=0)
    assert unpadded["kept"] and min(unpadded["faults"]) >= 8_000
    # The policy's top pad keeps the emptied heap: only the first round maps its pages.
    kept = _thread_probe(keep=True)
    assert kept["kept"] and kept["faults"][0] >= 8_000 and max(kept["faults"][1:]) < 500
    # The same by the environment (the benchmark's peer).
    by_env = _thread_probe(keep=False, env=hostmem.KEEP_ENV)
    assert by_env["faults"][0] >= 8_000 and max(by_env["faults"][1:]) < 500


@pytest.mark.parametrize(
    "environ, mode, glibc, restarts",
    [
        ({}, "madvise", (2, 36), True),
        ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, "madvise", (2, 36), True),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", (2, 36), False),  # The user's.
        ({hostmem.HUGE_PAGES_SWITCH: "0"}, "madvise", (2, 36), False),
        ({"BBB_HUGE_PAGES_RESTARTED": "1"}, "madvise", (2, 36), False),  # Never twice.
        ({}, "always", (2, 36), False),  # The kernel gives huge pages already.
        ({}, "never", (2, 36), False),
        ({}, None, (2, 36), False),
        ({}, "madvise", (2, 34), False),  # No such tunable before glibc 2.35.
        ({}, "madvise", None, False),  # Not glibc.
    ],
)
def test_huge_pages_environment_only_where_it_changes_something(environ, mode, glibc, restarts):
    env = hostmem.huge_pages_environment({"PATH": "/bin", **environ}, mode, glibc)
    if not restarts:
        assert env is None
        return
    assert env["PATH"] == "/bin" and env["BBB_HUGE_PAGES_RESTARTED"] == "1"
    tunables = env["GLIBC_TUNABLES"].split(":")
    assert tunables[-1] == "glibc.malloc.hugetlb=1"
    assert tunables[:-1] == [t for t in [environ.get("GLIBC_TUNABLES")] if t]


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hostmem.thp_mode(str(path)) == "madvise"
    assert hostmem.thp_mode(str(tmp_path / "missing")) is None


# Runs its top half twice (before and after the re-execution), then allocates 64 MiB on the
# heap (the kept policy: no mmap), touches it, and reports how much of it the kernel backed
# with transparent huge pages.
_RESTART_PROBE = """
import ctypes, json, os, sys
sys.path.insert(0, {root!r})
from bbb import hostmem
print("start", os.getpid(), flush=True)
hostmem.restart_with_huge_pages()
hostmem.keep_freed_memory()
def huge():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("AnonHugePages")) * 1024
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
before = huge()
block = libc.malloc(64 * 2**20)
ctypes.memset(block, 1, 64 * 2**20)
print(json.dumps({{"pid": os.getpid(), "huge": huge() - before,
                  "in_effect": hostmem.huge_pages_in_effect(),
                  "tunables": os.environ.get("GLIBC_TUNABLES", "")}}))
"""


_needs_huge_pages = pytest.mark.skipif(
    hostmem.thp_mode() != "madvise" or (hostmem.glibc_version() or (0, 0)) < (2, 35),
    reason="needs transparent huge pages in madvise mode and glibc >= 2.35",
)


def _restart_probe(program_on_stdin: bool, env: dict | None = None) -> list[str]:
    """The probe's output lines, run by `python -c` or from stdin, in this environment minus
    any huge-page setting of its own (plus `env`)."""
    mine = ("GLIBC_TUNABLES", hostmem.HUGE_PAGES_SWITCH, "BBB_HUGE_PAGES_RESTARTED")
    code = _RESTART_PROBE.format(root=_ROOT)
    return subprocess.run(
        [sys.executable, "-"] if program_on_stdin else [sys.executable, "-c", code],
        input=code if program_on_stdin else None,
        capture_output=True,
        text=True,
        check=True,
        env={**{k: v for k, v in os.environ.items() if k not in mine}, **(env or {})},
    ).stdout.splitlines()


@_needs_huge_pages
@pytest.mark.parametrize("switch", ["1", "0"])
def test_restart_gives_the_heap_huge_pages_once(switch):
    out = _restart_probe(program_on_stdin=False, env={hostmem.HUGE_PAGES_SWITCH: switch})
    starts = [line for line in out if line.startswith("start")]
    result = json.loads(out[-1])
    assert {int(line.split()[1]) for line in starts} == {result["pid"]}  # exec: the same process
    if switch == "1":
        assert len(starts) == 2  # The top half ran again after the re-execution, once.
        assert result["tunables"] == "glibc.malloc.hugetlb=1" and result["in_effect"]
        assert result["huge"] >= 32 * 2**20
    else:
        assert len(starts) == 1 and not result["in_effect"]
        assert result["huge"] < 8 * 2**20


def test_scripts_restart_after_parsing_their_flags(monkeypatch):
    """cli.parse_flags_or_exit, every script's flag parser, asks for the restart (and a bad
    flag exits with code 2 before it: nothing is re-executed to report an error)."""
    from absl import flags

    from bbb import cli

    calls = []
    monkeypatch.setattr(hostmem, "restart_with_huge_pages", lambda: calls.append("restart"))
    cli.parse_flags_or_exit(["prog"])
    assert calls == ["restart"]
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_flags_or_exit(["prog", "--no_such_flag_anywhere=1"])
    assert exit_info.value.code == 2 and calls == ["restart"]
    flags.FLAGS.unparse_flags()
    # Every absl script uses it (scripts/grad_variance.py did not: a bad flag exited with 1).
    scripts = sorted(glob.glob(os.path.join(REPO, "scripts", "*.py")))
    absl_scripts = [p for p in scripts if "app.run(" in open(p).read()]
    assert len(absl_scripts) >= 10
    for path in absl_scripts:
        assert "app.run(main, flags_parser=cli.parse_flags_or_exit)" in open(path).read(), path


@pytest.mark.parametrize(
    ("platforms", "installed", "on_cpu"),
    [
        ("", ["jax", "jaxlib", "numpy"], True),
        ("", ["jax", "jax-cuda12-plugin", "jax-cuda12-pjrt"], False),
        ("", ["jax", "jax_cuda13_plugin"], False),
        ("", ["jax", "libtpu"], False),
        ("", ["jax", "jax-rocm60-plugin"], False),
        ("cpu", ["jax", "jax-cuda12-plugin"], True),
        ("cuda", ["jax", "jaxlib"], False),
        ("tpu,cpu", ["jax"], False),
        (" CPU ,cuda", ["jax", "libtpu"], True),
    ],
)
def test_host_memory_policies_only_where_jax_computes_on_the_cpu(
    monkeypatch, platforms, installed, on_cpu
):
    """On a GPU or TPU host the scripts neither re-execute themselves for huge pages nor keep
    their peak host memory: `JAX_PLATFORMS` decides where set, else an installed accelerator
    plugin of JAX (a CUDA, ROCm or TPU package) means JAX will not compute on the CPU."""
    import importlib.metadata
    import types

    from absl import flags

    from bbb import cli

    monkeypatch.setattr(
        importlib.metadata,
        "distributions",
        lambda: [types.SimpleNamespace(metadata={"Name": name}) for name in installed],
    )
    assert hostmem.jax_computes_on_cpu({"JAX_PLATFORMS": platforms}) == on_cpu
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    calls = []
    monkeypatch.setattr(hostmem, "restart_with_huge_pages", lambda: calls.append("restart"))
    monkeypatch.setattr(hostmem, "keep_freed_memory", lambda: calls.append("keep"))
    cli.parse_flags_or_exit(["prog"])
    flags.FLAGS.unparse_flags()
    assert calls == (["restart", "keep"] if on_cpu else [])


@_needs_huge_pages
def test_a_program_read_from_stdin_is_not_rerun():
    """Its text is gone once read: a re-execution would run nothing."""
    out = _restart_probe(program_on_stdin=True)
    assert len([line for line in out if line.startswith("start")]) == 1
    assert not json.loads(out[-1])["in_effect"]


@pytest.mark.parametrize(
    "environ, keep_freed, huge_pages, expected",
    [
        # glibc's defaults: every malloc setting goes, other tunables and variables stay.
        (
            {
                "PATH": "/bin",
                "MALLOC_MMAP_MAX_": "0",
                "MALLOC_TRIM_THRESHOLD_": "7",
                "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.rtld.nns=2",
            },
            False,
            False,
            {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.rtld.nns=2"},
        ),
        ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, False, False, {}),
        # Both policies, the user's other tunables kept ahead of bbb's.
        (
            {"GLIBC_TUNABLES": "glibc.rtld.nns=2", "MALLOC_TRIM_THRESHOLD_": "7"},
            True,
            True,
            {**hostmem.KEEP_ENV, "GLIBC_TUNABLES": "glibc.rtld.nns=2:glibc.malloc.hugetlb=1"},
        ),
        # Each alone (the other switched off in this process).
        ({}, True, False, hostmem.KEEP_ENV),
        ({}, False, True, {"GLIBC_TUNABLES": hostmem.HUGE_PAGES_TUNABLE}),
    ],
)
def test_peer_environment_has_exactly_the_policies_asked_for(
    environ, keep_freed, huge_pages, expected
):
    env = hostmem.peer_environment(environ, keep_freed=keep_freed, huge_pages=huge_pages)
    assert env == expected


def test_huge_pages_from_the_first_glibc_with_the_tunable():
    """glibc 2.35 itself has glibc.malloc.hugetlb: it restarts there."""
    env = hostmem.huge_pages_environment({}, "madvise", (2, 35))
    assert env == {"GLIBC_TUNABLES": hostmem.HUGE_PAGES_TUNABLE, "BBB_HUGE_PAGES_RESTARTED": "1"}


@pytest.mark.parametrize(
    "confstr, expected",
    [("glibc 2.36", (2, 36)), ("glibc 2.35.1", (2, 35)), ("musl 1.2", None), ("glibc", None)],
)
def test_glibc_version_reads_the_major_and_minor_of_glibc_only(monkeypatch, confstr, expected):
    monkeypatch.setattr(hostmem.os, "confstr", lambda name: confstr)
    assert hostmem.glibc_version() == expected


@pytest.mark.parametrize(
    "mode, tunables, expected",
    [
        ("always", "", True),  # The kernel backs every large mapping.
        ("madvise", "glibc.rtld.nns=2:glibc.malloc.hugetlb=1", True),
        ("madvise", "glibc.rtld.nns=2", False),  # madvise, and glibc does not ask.
        ("never", "glibc.malloc.hugetlb=1", False),
        (None, "glibc.malloc.hugetlb=1", False),
    ],
)
def test_huge_pages_in_effect_by_mode_and_tunable(monkeypatch, mode, tunables, expected):
    monkeypatch.setattr(hostmem, "thp_mode", lambda: mode)
    monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    assert hostmem.huge_pages_in_effect() is expected


def test_thp_mode_without_a_bracketed_choice_is_unknown(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always madvise never\n")
    assert hostmem.thp_mode(str(path)) is None


@pytest.mark.parametrize(
    "argv, orig_argv, reruns",
    [
        (["script.py", "--x=1"], ["python3", "script.py", "--x=1"], True),
        (["-c"], ["python3", "-c", "print(1)"], True),
        ([""], ["python3"], False),  # Interactive.
        (["-"], ["python3", "-"], False),  # The program came from stdin: it is gone.
        (["script.py"], [], False),  # Nothing to re-execute with.
    ],
)
def test_restart_re_executes_the_original_command_line(monkeypatch, argv, orig_argv, reruns):
    """Where huge pages need the tunable, the process re-executes `sys.orig_argv` (the
    interpreter's own options included) with the new environment; never when there is no
    program to run again."""
    calls = []
    monkeypatch.setattr(hostmem, "thp_mode", lambda: "madvise")
    monkeypatch.setattr(hostmem, "glibc_version", lambda: (2, 36))
    for name in ("GLIBC_TUNABLES", hostmem.HUGE_PAGES_SWITCH, "BBB_HUGE_PAGES_RESTARTED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hostmem.sys, "argv", argv)
    monkeypatch.setattr(hostmem.sys, "orig_argv", orig_argv, raising=False)
    monkeypatch.setattr(hostmem.os, "execve", lambda *args: calls.append(args))
    hostmem.restart_with_huge_pages()
    if not reruns:
        assert calls == []
        return
    [(executable, command, env)] = calls
    assert executable == hostmem.sys.executable and command == orig_argv
    assert env["GLIBC_TUNABLES"] == hostmem.HUGE_PAGES_TUNABLE
    assert env["BBB_HUGE_PAGES_RESTARTED"] == "1"


def test_a_policy_in_effect_is_reported_as_such_by_later_calls(monkeypatch):
    """Once applied, mallopt's settings stay for the life of the process: a later call says
    so even if the switch is now off (it cannot undo them), without calling mallopt again."""
    monkeypatch.setattr(hostmem, "_applied", True)
    monkeypatch.setenv(hostmem.ENV_SWITCH, "0")
    monkeypatch.setattr(hostmem.ctypes, "CDLL", lambda *args: pytest.fail("mallopt called again"))
    assert hostmem.keep_freed_memory() is True and hostmem.is_kept()


def test_peer_environment_removes_every_glibc_malloc_variable():
    """Not only the two that bbb sets: a user's MALLOC_MMAP_THRESHOLD_, MALLOC_ARENA_MAX...
    would give the "default" peer a malloc that is not glibc's default (and the "kept" one a
    policy besides bbb's)."""
    user = {
        "MALLOC_MMAP_THRESHOLD_": "4096",
        "MALLOC_TOP_PAD_": "1",
        "MALLOC_ARENA_MAX": "2",
        "MALLOC_ARENA_TEST": "1",
        "MALLOC_PERTURB_": "7",
        "MALLOC_CHECK_": "3",
    }
    assert hostmem.peer_environment(
        {**user, "PATH": "/bin"}, keep_freed=False, huge_pages=False
    ) == {"PATH": "/bin"}
    kept = hostmem.peer_environment(user, keep_freed=True, huge_pages=False)
    assert kept == hostmem.KEEP_ENV
