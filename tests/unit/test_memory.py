"""kvmrkt.host.memory: after ``lean()``, large blocks a long-lived process frees go back to the host instead of
staying in its heap (glibc's dynamic mmap threshold otherwise keeps them); without glibc both calls do nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmrkt.host import memory

REPO = Path(__file__).resolve().parents[2]

_FRAGMENT = """
import sys
from kvmrkt.host import memory
def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
if sys.argv[1] == "lean":
    memory.lean()
x = b"x" * (1 << 20); del x  # a freed mmapped block: glibc would raise its mmap threshold to 1 MiB
before = anon_kib()
blocks = [b"y" * (1 << 20) for _ in range(8)]  # 1 MiB blocks, as a file hash reads them
last = blocks.pop()
del blocks
print((anon_kib() - before) // 1024)
"""


def _retained_mib(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_freed_large_blocks_are_not_kept_resident() -> None:
    assert _retained_mib("plain") >= 6  # glibc's default: the seven freed blocks stay in the heap
    assert _retained_mib("lean") <= 2  # the one block still alive, and no more


def test_without_glibc_both_do_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_libc", lambda: None)
    memory.lean()
    memory.release()
    monkeypatch.setattr(memory, "_libc", lambda: object())  # a C library without mallopt or malloc_trim
    memory.lean()
    memory.release()
