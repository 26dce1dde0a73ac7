"""The pod's shared export: one host directory, ``POD/shared``, exported to the VM over a single virtio-9p device,
into which the host bind-mounts files and directories before the VM starts or while it runs (Kata's model).

Role: ``up`` makes ``POD/shared`` a mount point with a shared peer group of its own (a bind onto itself, made
private, then shared), so that a mount the host makes under it later propagates into the VMM jail's mount
namespace (the jail is a slave of the host's, and binds the export with its submounts) and so into the guest,
which mounts the export at ``/kvmrkt/shared``, outside every app's root. ``bind`` binds one source onto
``POD/shared/binds/<name>``: cloned detached (``open_tree``), given its flags while still detached
(``mount_setattr``: read-only binds are read-only on the host before any namespace can see them, since a later
remount would not propagate), then attached (``move_mount``). The export is recorded in the pod's jail record
first, and ``PodJail.down`` detaches everything there and removes the mount points (when the VM is gone, when the
pod is removed, by gc after a crash). ``add_container`` binds a container's root and volumes into a running VM's
export, with its guest configuration (``ctr/<name>.cfg``), and ``remove_container`` takes them out again.

Trust boundary: what is bound is what the pod manifest names (written from an OCI bundle by the engine, which is
trusted); the guest is not: ``POD/shared`` and ``binds`` are root's with the pod's group allowed only to read
and traverse, so the VMM (and a guest driving it) can create nothing there, and every mount point is made by
kvmrkt with ``O_EXCL``/``O_NOFOLLOW`` under directories only root can write.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from kvmrkt.errors import JailError
from kvmrkt.pods.manifest import PodManifest, Volume
from kvmrkt.pods.pod import Pod
from kvmrkt.stage1 import JailSpec
from stage1_kvm import shares
from stage1_kvm.jail import MS_BIND, MS_PRIVATE, MS_SHARED, PodJail, unbind_on_host
from stage1_kvm.vmspec import BIND_KINDS, EXPORT_DIR, container_config_path, export_path

BINDS = "binds"

# <linux/mount.h>, <fcntl.h>; x86_64 syscall numbers
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
OPEN_TREE_CLONE, AT_RECURSIVE, AT_SYMLINK_NOFOLLOW, AT_EMPTY_PATH = 1, 0x8000, 0x100, 0x1000
MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_T_EMPTY_PATH = 0x4, 0x40
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc


NEW_MOUNT_API = "the host kernel needs open_tree/move_mount/mount_setattr (Linux 5.12 or later)"


def _fail(what: str, hint: str | None = None) -> JailError:
    return JailError(f"the pod's shared export: {what}: {os.strerror(ctypes.get_errno())}", hint=hint)


def _mkdir(path: Path, gid: int) -> None:
    path.mkdir(mode=0o750)
    os.chown(path, 0, gid)
    os.chmod(path, 0o750)  # noqa: S103 (the group is the pod's own: its VMM may read and traverse, not write)


def up(pod: Pod, manifest: PodManifest, jail: JailSpec, data_dir: Path) -> Path:
    """Create ``POD/shared`` (and ``binds`` in it), make it a mount point with a peer group of its own, and bind
    the pod's bind volumes into it; recorded first, so that ``PodJail.down`` undoes a partial setup.

    Raises:
        JailError: a source cannot be bound, or a mount failed.
    """
    export = pod.file(EXPORT_DIR)
    PodJail(pod, data_dir).record(export=EXPORT_DIR)
    _export(export, jail.gid)
    live = Pod.live_uuids(data_dir)
    for volume in manifest.volumes:
        if volume.kind in BIND_KINDS:
            bind(export, volume, data_dir=data_dir, pod=pod.uuid, live=live, uid=jail.uid, gid=jail.gid)
    return export


def _export(export: Path, gid: int) -> None:
    _mkdir(export, gid)
    _mkdir(export / BINDS, gid)
    libc, target = _libc(), str(export).encode()
    for flags, what in ((MS_BIND, "binding it onto itself"), (MS_PRIVATE, "making it private"),
                        (MS_SHARED, "making it shared")):
        if libc.mount(target if flags == MS_BIND else None, target, None, flags, None) != 0:
            raise _fail(what)


def bind(export: Path, volume: Volume, *, data_dir: Path, pod: str, live: Iterable[str], uid: int, gid: int) -> None:
    """Bind ``volume``'s source (a file or a directory; the engine's path, symlinks followed as runc does) onto
    its place in the export (``vmspec.export_path``; the directory holding it is the pod's ``gid``'s), read-only
    on the host if the volume is, and let the VMM's ``uid`` reach it.

    Raises:
        JailError: the source is neither a file nor a directory, or a mount failed.
    """
    source = Path(os.path.realpath(volume.source or "/nonexistent"))
    try:
        mode = os.stat(source).st_mode
    except OSError as exc:
        raise JailError(f"cannot bind {volume.source} into the pod: {exc.strerror}") from None
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise JailError(f"cannot bind {volume.source} into the pod: only files and directories reach a VM")
    directory = stat.S_ISDIR(mode)
    point = export / export_path(volume)
    _mkdir(point.parent, gid)
    if directory:
        point.mkdir(mode=0o700)
    else:
        os.close(os.open(point, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    shares.grant(data_dir, pod, live, source, uid, write=not volume.read_only,
                 perm=None if directory else 4 if volume.read_only else 6, file_ok=True)
    libc = _libc()
    flags = OPEN_TREE_CLONE | os.O_CLOEXEC | AT_SYMLINK_NOFOLLOW | (AT_RECURSIVE if volume.kind == "rbind" else 0)
    tree = libc.syscall(SYS_OPEN_TREE, -100, str(source).encode(), flags)  # AT_FDCWD
    if tree < 0:
        raise _fail(f"cloning {source}", NEW_MOUNT_API)
    try:
        attr = _MountAttr(MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_RDONLY if volume.read_only else 0))
        if libc.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH | (flags & AT_RECURSIVE), ctypes.byref(attr),
                        ctypes.sizeof(attr)) != 0:
            raise _fail(f"setting the flags of the bind of {source}", NEW_MOUNT_API)
        dest = os.open(point, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if libc.syscall(SYS_MOVE_MOUNT, tree, b"", dest, b"",
                            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) != 0:
                raise _fail(f"binding {source} onto {point}", NEW_MOUNT_API)
        finally:
            os.close(dest)
    finally:
        os.close(tree)


def add_container(export: Path, name: str, root: Volume, volumes: Iterable[Volume], config: bytes, *,
                  data_dir: Path, pod: str, uid: int, gid: int) -> None:
    """Bind a container's root (``root``, a bind volume) and its bind volumes into the export of a running VM
    and write its guest configuration to ``ctr/<name>.cfg`` (root's, readable by the pod's group only: it holds
    the container's environment). Every volume is named ``<name>-...``, so ``remove_container`` finds them. On
    failure what was done is undone.

    Raises:
        JailError: a source cannot be bound, a mount failed, or the container exists already.
    """
    live = Pod.live_uuids(data_dir)
    try:
        for volume in (root, *volumes):
            if volume.kind in BIND_KINDS:
                bind(export, volume, data_dir=data_dir, pod=pod, live=live, uid=uid, gid=gid)
        configs = export / container_config_path(name)
        if not configs.parent.is_dir():
            _mkdir(configs.parent, gid)
        fd = os.open(configs, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        with os.fdopen(fd, "wb") as fh:
            os.fchown(fh.fileno(), 0, gid)
            fh.write(config)
    except FileExistsError:
        raise JailError(f"container {name} already exists in the pod's export") from None
    except BaseException:
        remove_container(export, name)
        raise


def remove_container(export: Path, name: str) -> bool:
    """Detach and remove what ``add_container`` put in the export for ``name`` (idempotent). False if something
    is still mounted there (for the pod's own teardown to detach)."""
    ok = True
    binds = export / BINDS
    for entry in list(binds.iterdir()) if binds.is_dir() else []:
        if entry.name.startswith(f"{name}-"):
            ok = unbind_on_host(entry) and ok
    with contextlib.suppress(FileNotFoundError):
        (export / container_config_path(name)).unlink()
    return ok
