"""Files written atomically: readers see the old content or the new, never a torn one, and a path given by a user
is replaced, never written through.

Role: the one way kvmrkt writes its state files (pod records, stores, evidence, pid files). Trust boundary: the
directory may be shared with other users (``--uuid-file-save`` into /tmp): temp files are created exclusively
under random names, and the rename replaces a planted symlink instead of following it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def temp_beside(path: Path, mode: int = 0o600) -> tuple[int, Path]:
    """A new, empty temp file in ``path``'s directory, created exclusively under a random name (a file or
    symlink planted there by another user is never opened), for a later ``os.replace(tmp, path)``."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, mode)
    return fd, Path(name)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file so readers see the old or the new content, never a torn one (temp, fsync, rename). The
    rename replaces whatever is at ``path``, a symlink included, and never writes through it: this is how
    kvmrkt writes files at paths users give it (--uuid-file-save, pid files, evidence)."""
    fd, tmp = temp_beside(path, mode)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def write_json(path: Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
