"""Mount points in a writable OCI bundle root, made on the host before the VM starts (as runc makes them).

Role: a writable bundle root reaches the guest over 9p, where the VMM's unprivileged uid cannot create the
directories and files the bundle's mounts need (``/dev/termination-log``, ``/var/run/secrets/...`` in most
images are not there); kvmrkt-oci makes each missing one as root on the host: directories, and an empty file last
for a bind of a file. A read-only root is left alone (the guest mounts an overlay over it and makes them there).

Trust boundary: the rootfs is the image's (hostile): every path is resolved inside it (``openat2`` with
``RESOLVE_IN_ROOT``), so its symlinks cannot lead out of it, and each component is made relative to a
descriptor of its resolved parent, never through a symlink (``O_EXCL``/``O_NOFOLLOW``).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable
from pathlib import Path

from kvmrkt.errors import ManifestError
from kvmrkt.ocirt.bundle import Bundle

SYS_OPENAT2 = 437  # x86_64
RESOLVE_NO_MAGICLINKS, RESOLVE_IN_ROOT = 0x02, 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _in_root(libc: ctypes.CDLL, root: int, path: str, flags: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    fd = int(libc.syscall(SYS_OPENAT2, root, (path or ".").encode(), ctypes.byref(how), ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def make(rootfs: Path, points: Iterable[tuple[str, bool]]) -> None:
    """Make each missing mount point ``(destination, is a directory)`` inside ``rootfs``.

    Raises:
        ManifestError: a mount point cannot be made (named).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for dest, directory in points:
            parts = [p for p in dest.split("/") if p]
            try:
                for i, name in enumerate(parts):
                    path = "/".join(parts[: i + 1])
                    try:
                        os.close(_in_root(libc, root, path, os.O_PATH))
                        continue
                    except FileNotFoundError:
                        pass
                    parent = _in_root(libc, root, "/".join(parts[:i]), os.O_PATH | os.O_DIRECTORY)
                    try:
                        if directory or i < len(parts) - 1:
                            os.mkdir(name, 0o755, dir_fd=parent)
                        else:
                            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                             | os.O_CLOEXEC, 0o644, dir_fd=parent))
                    finally:
                        os.close(parent)
            except OSError as exc:
                if exc.errno == errno.EEXIST:  # a dangling symlink of the image's: the guest refuses it
                    continue
                raise ManifestError(f"cannot make the mount point {dest} in {rootfs}: {exc.strerror}") from None
    finally:
        os.close(root)


def for_bundle(bundle: Bundle) -> None:
    """The mount points of a writable bundle root (a read-only one is left alone).

    Raises:
        ManifestError: a mount point cannot be made.
    """
    if bundle.readonly:
        return
    sources = {v.name: v.source for v in bundle.volumes}
    make(bundle.rootfs, [(m.target, not sources.get(m.volume) or os.path.isdir(sources[m.volume] or ""))
                         for m in bundle.mounts])
