"""Per-pod leases of scarce host identities (SELinux MCS pairs, jail uids): unique among live pods across
concurrent kvmrkt processes.

Role: one allocation discipline for every such identity. A lease table (a JSON object ``{pod: value}`` in the data
directory) is only read and written under an exclusive flock, and is rebuilt from the pods that still exist each
time something is allocated, so values come back after gc and after a crash. Writes are atomic (temp file, fsync,
rename). Trust boundary: the table lives in a root-only directory; a table edited by hand is rebuilt from live
pods rather than trusted to be well-formed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from kvmrkt.host.files import write_json

# Keys of the table that are not pod leases (allocator bookkeeping, e.g. where a cyclic search resumes).
META_PREFIX = "@"


@contextlib.contextmanager
def locked_table(path: Path) -> Iterator[dict[str, Any]]:
    """The lease table at ``path``, held under an exclusive lock; changes to it are written back on exit."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            table = json.loads(path.read_text())
        except FileNotFoundError:
            table = {}
        except ValueError:
            table = {}  # a torn file cannot happen (atomic writes); an edited one is rebuilt from live pods
        if not isinstance(table, dict):
            table = {}
        yield table
        write_json(path, table)
    finally:
        os.close(fd)


def lease(path: Path, pod: str, live: Iterable[str] | None, choose: Callable[[dict[str, Any]], Any]) -> Any:
    """The value leased to ``pod``, allocating one with ``choose(table)`` (the table without stale leases; it
    may record bookkeeping under ``@``-keys) when it has none. Leases of pods not in ``live`` are freed first
    (``None``: free nothing)."""
    keep = None if live is None else set(live) | {pod}
    with locked_table(path) as table:
        for stale in [k for k in table if not k.startswith(META_PREFIX) and keep is not None and k not in keep]:
            del table[stale]
        if pod not in table:
            table[pod] = choose(table)
        return table[pod]


def used(table: dict[str, Any]) -> list[Any]:
    """The values currently leased (bookkeeping keys left out)."""
    return [v for k, v in table.items() if not k.startswith(META_PREFIX)]


def release(path: Path, pod: str) -> None:
    """Free a pod's lease (gc)."""
    with locked_table(path) as table:
        table.pop(pod, None)
