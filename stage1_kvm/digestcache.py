"""Digests of guest asset files remembered by the files' identity, so a launch need not re-hash the ~19 MB it
hashed at the previous launch (the kernel, the initramfs, the VMM guard: ~20 ms a launch on a 2-core host).

Role: ``file_digest(path, algorithm, record_dir)`` returns a file's digest. A digest is remembered, in
``record_dir``/``RECORD``, under the file's (device, inode, size, mtime, ctime) as read from the descriptor that
was hashed, before and after hashing; it is returned for a later call only when the file still has exactly
that identity. Any write to a file, a rename onto its path or a change of its owner or mode changes its ctime or
inode, and ctime cannot be set through the file system, so a changed file is always hashed again.

Trust boundary: remembered digests stand in for the file's bytes in the launch's measurement, so the record is
trusted only as far as root's own files are: it is used only when ``record_dir`` is a directory owned by root that
no one else can enter or write (stage1's assets directory, 0700), the record is a regular file owned by root that
no one else can read or write, and the file is a regular, root-owned file that no one else can write (``O_NOFOLLOW``:
never a symlink). Anything else, and any record that does not parse as expected, means: hash the file, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

from kvmrkt.digest import Digest
from kvmrkt.host.files import write_json

RECORD = "verified-digests.json"
MAX_ENTRIES = 16  # a few kinds of kernel, each with its initramfs, and the guard


def _identity(st: os.stat_result, algorithm: str) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{algorithm}"


def _root_only(st: os.stat_result, *, kind: int, others: int) -> bool:
    return stat.S_IFMT(st.st_mode) == kind and st.st_uid == 0 and not st.st_mode & others


def _record(record_dir: Path) -> dict[str, dict[str, str]] | None:
    """The remembered digests, or None when the directory or the record cannot be trusted."""
    try:
        if not _root_only(os.lstat(record_dir), kind=stat.S_IFDIR, others=0o077):
            return None
        path = record_dir / RECORD
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not _root_only(os.fstat(fh.fileno()), kind=stat.S_IFREG, others=0o077):
            return None
        try:
            doc = json.loads(fh.read(1 << 16))
        except ValueError:
            return {}
    if not isinstance(doc, dict):
        return {}
    return {str(k): v for k, v in doc.items()
            if isinstance(v, dict) and isinstance(v.get("identity"), str) and isinstance(v.get("digest"), str)}


def _hash(fd: int, algorithm: str) -> Digest:
    with os.fdopen(os.dup(fd), "rb") as fh:
        return Digest.of_stream(fh, algorithm)


def file_digest(path: Path, algorithm: str, record_dir: Path) -> Digest:
    """``path``'s digest: remembered if its identity is unchanged and everything qualifies, else hashed (and,
    if everything qualifies, remembered)."""
    record = _record(record_dir)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        before = os.fstat(fd)
        usable = record is not None and _root_only(before, kind=stat.S_IFREG, others=0o022)
        identity = _identity(before, algorithm)
        entry = (record or {}).get(str(path))
        if usable and entry is not None and entry["identity"] == identity:
            with contextlib.suppress(ValueError):  # a hand-edited entry: hash instead
                remembered = Digest.parse(f"{algorithm}:{entry['digest']}")
                if remembered.algorithm == algorithm:
                    return remembered
        digest = _hash(fd, algorithm)
        if not usable or record is None or _identity(os.fstat(fd), algorithm) != identity:
            return digest  # not ours to remember, or it changed while it was read
    finally:
        os.close(fd)
    others = {k: v for k, v in record.items() if k != str(path)}
    kept = dict(list(others.items())[-(MAX_ENTRIES - 1):])
    with contextlib.suppress(OSError):  # remembering is an optimisation; the digest is right either way
        write_json(record_dir / RECORD, {**kept, str(path): {"identity": identity, "digest": digest.hex}})
    return digest
