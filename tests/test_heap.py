"""A gen process keeps freed heap for the next prompt (runtime.keep_freed_heap): glibc otherwise unmaps large
temporaries when freed and hands freed heap back, so every prompt's activations fault their pages in again.

Each check runs in its own process (malloc's settings are the process's): six 8 MB blocks allocated, written and
freed, five times over, counting the page faults of each round. A round's pages are the oracle: 6 × 8 MB / 4 KiB."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc settings"
)
PAGES = 6 * (8 << 20) // 4096
ROUNDS = """
import ctypes, json, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(8 << 20) for _ in range(6)]
    for b in blocks:
        ctypes.memset(b, 1, 8 << 20)
    for b in blocks:
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _faults(prelude: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", prelude + ROUNDS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_by_default_every_round_faults_its_pages_in_again():
    faults = _faults("")
    assert all(f >= PAGES * 0.9 for f in faults), faults  # what the setting is for: without it nothing is kept


def test_kept_heap_serves_later_rounds_without_a_fault():
    faults = _faults("from gen_cli.runtime import keep_freed_heap\nassert keep_freed_heap()\n")
    assert faults[0] >= PAGES * 0.9 and sum(faults[1:]) <= PAGES * 0.01, faults


def test_the_gen_command_keeps_it():
    prelude = "import sys\nsys.argv = ['gen', '--version']\nfrom gen_cli.cli import main\n"
    faults = _faults(prelude + "try:\n    main()\nexcept SystemExit:\n    pass\n")
    assert sum(faults[1:]) <= PAGES * 0.01, faults
