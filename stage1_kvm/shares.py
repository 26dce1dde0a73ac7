"""Access for a pod's unprivileged VMM to the host directories it shares into the guest (host volumes, OCI bundle
roots), as POSIX ACL entries on the shared directory itself, revoked when the pod is done.

Role: the VMM runs as the pod's own uid and exports shares with ``security_model=mapped-xattr``, so nothing the
guest writes becomes a privileged file on the host; to reach a share at all, that uid gets ``rwx`` (``r-x`` for a
read-only share) on the share's top directory, and nothing else. Several pods can share one directory: a table
under ``DATA_DIR/jail`` (a ``kvmrkt.net.leases`` table) keeps the directory's original ACL and every pod's grant, so
the ACL written is always "the original plus the grants of the pods still holding it", and the original comes
back byte for byte when the last one lets go (its mode too: an ACL's mask shows as the group bits while pods run).
Grants of pods that no longer exist are dropped the next time the table is touched, so a crash leaks nothing
for long. The ACL encoding (``system.posix_acl_access``, version 2) is pure and tested on its own.

Trust boundary: share paths come from the pod manifest (operator input, absolute) and OCI bundles; the directory
is opened without following a final symlink and must be a directory (or a regular file bound into a pod's shared
export); the guest never reaches this code.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kvmrkt.errors import JailError
from kvmrkt.net import leases

XATTR = "system.posix_acl_access"
VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
UNDEFINED_ID = 0xFFFFFFFF

Entry = tuple[int, int, int]  # (tag, perm, id)


def encode(entries: Iterable[Entry]) -> bytes:
    """An ACL xattr value (entries sorted by tag, then id, as the kernel requires)."""
    ordered = sorted(entries, key=lambda e: (e[0], e[2]))
    return struct.pack("<I", VERSION) + b"".join(struct.pack("<HHI", *e) for e in ordered)


def decode(data: bytes) -> list[Entry]:
    """Parse an ACL xattr value.

    Raises:
        ValueError: not a version 2 ACL.
    """
    if len(data) < 4 or (len(data) - 4) % 8 or struct.unpack_from("<I", data)[0] != VERSION:
        raise ValueError("not a POSIX ACL (version 2)")
    return [struct.unpack_from("<HHI", data, off) for off in range(4, len(data), 8)]


def from_mode(mode: int) -> list[Entry]:
    """The minimal ACL equivalent to permission bits."""
    return [(USER_OBJ, (mode >> 6) & 7, UNDEFINED_ID), (GROUP_OBJ, (mode >> 3) & 7, UNDEFINED_ID),
            (OTHER, mode & 7, UNDEFINED_ID)]


def with_users(base: list[Entry], users: dict[int, int]) -> list[Entry]:
    """``base`` plus named-user entries (uid -> perm; an existing entry for the uid is widened), with the mask
    recomputed as the union of the group class, so every entry gets what it says."""
    out = [e for e in base if e[0] != MASK]
    for uid, perm in users.items():
        old = next((e for e in out if e[0] == USER and e[2] == uid), None)
        if old:
            out.remove(old)
            perm |= old[1]
        out.append((USER, perm, uid))
    group_class = [e for e in out if e[0] in (USER, GROUP_OBJ, GROUP)]
    if any(e[0] in (USER, GROUP) for e in out):
        mask = 0
        for e in group_class:
            mask |= e[1]
        out.append((MASK, mask, UNDEFINED_ID))
    return out


def _table(data_dir: Path) -> Path:
    return data_dir / "jail" / "shares.json"


def _open_dir(path: Path, *, file_ok: bool = True) -> int:
    """The shared directory (or, ``file_ok``, regular file: a file bound into a pod's shared export), not through a
    final symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise JailError(f"cannot share {path}: {exc.strerror}", hint="a shared path must be an existing directory "
                        "or file (not a symlink)") from exc
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISDIR(mode) or (file_ok and stat.S_ISREG(mode))):
        os.close(fd)
        raise JailError(f"cannot share {path}: " + ("neither a directory nor a regular file" if file_ok
                                                      else os.strerror(errno.ENOTDIR)))
    return fd


def _read_acl(fd: int) -> bytes | None:
    try:
        return os.getxattr(fd, XATTR)
    except OSError as exc:
        if exc.errno in (61, 95):  # ENODATA: no ACL; EOPNOTSUPP handled by the write
            return None
        raise


def _apply(path: str, entry: dict[str, Any]) -> None:
    """Write the directory's original ACL plus the grants of its holders (or the original, when none is left)."""
    fd = _open_dir(Path(path))
    try:
        st = os.fstat(fd)
        if [st.st_dev, st.st_ino] != entry["inode"]:
            return  # the directory was replaced since: what is there now is not ours to change
        original = bytes.fromhex(entry["original"]) if entry["original"] is not None else None
        users = {int(uid): int(perm) for uid, perm in entry["holders"].values()}
        ours = {int(u) for u in entry.get("granted", [])}
        current = _read_acl(fd)
        # What is there now, less what this table granted: entries someone else added meanwhile (another kvmrkt
        # data directory, an operator) are kept, and what they removed is not brought back.
        kept = [e for e in (decode(current) if current else from_mode(st.st_mode))
                if e[0] != MASK and not (e[0] == USER and e[2] in ours)]
        if users:
            os.setxattr(fd, XATTR, encode(with_users(kept, users)))
            return
        named = sorted(e for e in kept if e[0] in (USER, GROUP))
        base = decode(original) if original is not None else []
        if original is not None and named == sorted(e for e in base if e[0] in (USER, GROUP)):
            os.setxattr(fd, XATTR, original)  # byte for byte, mask included
            os.chmod(fd, entry["mode"])
        elif not named:
            if current is not None:
                os.removexattr(fd, XATTR)
            perms = {tag: perm for tag, perm, _ in kept}
            os.chmod(fd, (entry["mode"] & 0o7000) | perms.get(USER_OBJ, 0) << 6 | perms.get(GROUP_OBJ, 0) << 3
                     | perms.get(OTHER, 0))
        else:
            os.setxattr(fd, XATTR, encode(with_users(kept, {})))
    finally:
        os.close(fd)


def grant(data_dir: Path, pod: str, live: Iterable[str], path: Path, uid: int, *, write: bool,
          perm: int | None = None, file_ok: bool = False) -> None:
    """Let ``uid`` (the pod's VMM) reach a shared directory: ``rwx``, or ``r-x`` without ``write`` (``perm``: these
    permission bits instead, e.g. 1 to let it only traverse a directory); ``file_ok``: a regular file is fine too.

    Raises:
        JailError: the path is not a directory, or its filesystem has no POSIX ACLs.
    """
    path = path.resolve()  # an operator's symlink to a directory is fine; its target gets the grant
    key = str(path)
    alive = set(live) | {pod}
    want = perm if perm is not None else 7 if write else 5
    with leases.locked_table(_table(data_dir)) as table:
        fd = _open_dir(path, file_ok=file_ok)
        try:
            st = os.fstat(fd)
            if key not in table and st.st_mode & want == want:
                return  # everybody has that much already (a read-only share may be on a read-only filesystem)
            entry = table.get(key)
            if entry is None or entry.get("inode") != [st.st_dev, st.st_ino]:
                acl = _read_acl(fd)
                entry = {"inode": [st.st_dev, st.st_ino], "mode": stat.S_IMODE(st.st_mode),
                         "original": acl.hex() if acl is not None else None, "holders": {}}
        finally:
            os.close(fd)
        entry["holders"] = {p: h for p, h in entry["holders"].items() if p in alive}
        entry["holders"][pod] = [uid, want]
        entry["granted"] = sorted({*entry.get("granted", []), uid})
        table[key] = entry
        try:
            _apply(key, entry)
        except OSError as exc:
            raise JailError(f"cannot give the pod's VMM (uid {uid}) access to {path}: {exc.strerror}",
                            hint="shared directories need a filesystem with POSIX ACLs and user xattrs "
                                 "(ext4, xfs, btrfs, tmpfs)") from exc


def revoke(data_dir: Path, pod: str, live: Iterable[str] | None = None) -> list[str]:
    """Drop a pod's grants (and those of pods not in ``live``); returns the directories that could not be
    restored (kept in the table for the next try)."""
    alive = None if live is None else set(live) - {pod}
    failed = []
    with leases.locked_table(_table(data_dir)) as table:
        for key in list(table):
            entry = table[key]
            if not isinstance(entry, dict) or not isinstance(entry.get("holders"), dict):
                del table[key]
                continue
            before = dict(entry["holders"])
            entry["holders"] = {p: h for p, h in before.items()
                                if p != pod and (alive is None or p in alive)}
            if entry["holders"] == before:
                continue
            if not os.path.lexists(key):
                del table[key]  # the directory is gone, and its ACL with it
                continue
            try:
                _apply(key, entry)
            except (OSError, JailError) as exc:
                entry["holders"] = before
                failed.append(f"{key}: {exc}")
                continue
            if not entry["holders"]:
                del table[key]
    return failed
