"""Scratch space for unpacked image trees and partial files, and removal of hostile trees.

Role: every work directory or temporary file kvmrkt creates while importing or building an image (``unpack-*``
trees, ``work-*`` directories, ``blob-*`` partial downloads) is made here, inside a base directory that is
kvmrkt's own (created 0700, checked to be a directory owned by this uid and closed to others before use). The
maker holds an exclusive ``flock`` on each entry for as long as it lives, so a maker killed with SIGKILL leaves
an unlocked entry that the next build or ``gc`` recognises as dead and removes at once; a live one is never
touched. Removal is iterative and fd-relative (no recursion, no long paths, no symlink followed), and an entry
is removed only after its owner and inode were checked on the descriptor that is locked.

Trust boundary: the trees removed here were written from hostile layers (any depth, any names, any modes). The
legacy ``/dev/shm/kvmrkt-unpack-*`` names are world-creatable: there only directories owned by this uid are
removed, anything else is left alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from kvmrkt.errors import ImageError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_ATTEMPTS = 100


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _open_dir(parent_fd: int, name: str, expected: os.stat_result) -> int:
    """Open parent/name as a directory, never through a symlink, and check it is the inode lstat saw."""
    fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    if not _same(os.fstat(fd), expected):
        os.close(fd)
        raise OSError(errno.ESTALE, f"{name!r} changed while it was being removed")
    return fd


def remove_tree(parent_fd: int, name: str) -> None:
    """Remove parent_fd/name (a whole tree for a directory) without following symlinks; missing is fine.

    Iterative and relative to one open directory at a time, so neither depth nor path length matters."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return
    names, ids = [name], [st]
    fd = _open_dir(parent_fd, name, st)
    try:
        while True:
            child: tuple[str, os.stat_result] | None = None
            removed = False
            with os.scandir(fd) as entries:
                for entry in entries:
                    est = entry.stat(follow_symlinks=False)
                    if stat.S_ISDIR(est.st_mode):
                        child = (entry.name, est)
                        break
                    os.unlink(entry.name, dir_fd=fd)
                    removed = True
            if child is not None:
                nfd = _open_dir(fd, *child)
                os.close(fd)
                fd = nfd
                names.append(child[0])
                ids.append(child[1])
                continue
            if removed:
                continue  # look again: entries unlinked while listing may have hidden others
            gone = names.pop()
            ids.pop()
            if not names:
                os.close(fd)
                fd = -1
                os.rmdir(gone, dir_fd=parent_fd)
                return
            up = _open_dir(fd, "..", ids[-1])
            os.close(fd)
            fd = up
            os.rmdir(gone, dir_fd=fd)
    finally:
        if fd >= 0:
            os.close(fd)


def remove_path(path: Path) -> None:
    """``remove_tree`` for a path (its parent is opened without following a symlink in the last component)."""
    pfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_tree(pfd, path.name)
    finally:
        os.close(pfd)


def own_dir(path: Path) -> bool:
    """Create ``path`` (0700) or check that it is a real directory owned by this uid that no one else may
    enter; False when it is not (someone else's, a symlink, a file, group/world accessible)."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


class Entry:
    """A locked scratch directory or file: ``path``, ``fd`` (the locked descriptor). ``close()`` removes it."""

    def __init__(self, path: Path, fd: int, st: os.stat_result) -> None:
        self.path, self.fd, self._st = path, fd, st

    def close(self) -> None:
        """Remove the entry (if it is still the one created), then release the lock."""
        if self.fd < 0:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                if _same(os.lstat(self.path), self._st):
                    remove_path(self.path)
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Entry:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def create(base: Path, prefix: str, *, directory: bool = True) -> Entry:
    """A new 0700 directory (or 0600 file, open read-write) in ``base``, exclusively locked by this process.

    A sweeper may remove an entry in the instant between its creation and its lock; then it is made again.
    Raises:
        ImageError: ``base`` is not kvmrkt's own directory.
    """
    if not own_dir(base):
        raise ImageError(f"scratch directory {base} is not a 0700 directory owned by uid {os.geteuid()}",
                         hint="remove it (it is not kvmrkt's) or point images.scratch at disk")
    for _ in range(_ATTEMPTS):
        path = base / f"{prefix}{secrets.token_hex(8)}"
        try:
            if directory:
                os.mkdir(path, 0o700)
                fd = os.open(path, _DIR_FLAGS)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except (FileExistsError, FileNotFoundError):
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st = os.fstat(fd)
            if _same(os.lstat(path), st):
                return Entry(path, fd, st)
        except OSError:
            pass
        os.close(fd)
    raise ImageError(f"cannot create a scratch entry in {base}")


def sweep(base: Path, prefix: str = "", *, older_than: float | None = None, now: float = 0.0) -> list[str]:
    """Remove the entries of ``base`` (named ``prefix*``) whose maker is gone: nobody holds their lock, and
    they belong to this uid. ``older_than`` (seconds, against ``now``) also requires that age, for entries of
    makers that never locked (legacy ``/dev/shm`` trees). Entries in use, or not ours, are left alone.
    Returns the names removed."""
    removed: list[str] = []
    try:
        bfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return removed
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return removed
        raise
    try:
        for name in os.listdir(bfd):
            if name.startswith(prefix) and _reap(bfd, name, older_than, now):
                removed.append(name)
    finally:
        os.close(bfd)
    return removed


def _reap(bfd: int, name: str, older_than: float | None, now: float) -> bool:
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(name, dir_fd=bfd, follow_symlinks=False)
        if st.st_uid != os.geteuid() or (older_than is not None and now - st.st_mtime <= older_than):
            return False
        if stat.S_ISLNK(st.st_mode):
            os.unlink(name, dir_fd=bfd)
            return True
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            return False
        try:
            fd = _open_dir(bfd, name, st) if stat.S_ISDIR(st.st_mode) else os.open(name, _FILE_FLAGS, dir_fd=bfd)
        except OSError:
            return False  # changed under us: look again next time
        try:
            if not _same(os.fstat(fd), st):
                return False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # its maker is alive
            if not _same(os.stat(name, dir_fd=bfd, follow_symlinks=False), st):
                return False
            remove_tree(bfd, name)
            return True
        finally:
            os.close(fd)
    return False


@contextlib.contextmanager
def directory(base: Path, prefix: str) -> Iterator[Path]:
    """A locked scratch directory for the duration of the block, removed (whatever it holds) at the end."""
    with create(base, prefix) as entry:
        yield entry.path
