"""bbb.hostmem: freed host memory is kept and reused, so reallocating it takes no page faults."""

import json
import os
import subprocess
import sys

import pytest

from bbb import hostmem

# Allocates a 64 MiB block with the C library's malloc (as XLA:CPU does), touches every page,
# reads where malloc took it from (mallinfo2: bytes in mmapped blocks) and frees it, three
# times, counting the minor page faults of each round. With glibc's defaults the block is
# mmapped afresh every time (16,384 faults of 4 KiB pages); with the policy it comes from the
# heap, and after the first round its pages are already mapped.
_PROBE = """
import ctypes, json, resource, sys
sys.path.insert(0, {root!r})
from bbb import hostmem
kept = hostmem.keep_freed_memory() if {keep} else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
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


def _probe(keep: bool, env: dict | None = None) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(root=root, keep=keep)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
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


def test_switched_off_by_the_environment():
    assert not _probe(keep=True, env={hostmem.ENV_SWITCH: "0"})["kept"]
