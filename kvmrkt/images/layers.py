"""Apply OCI image layers (tar streams) onto a root filesystem directory.

Role: turn the ordered layer blobs of an image into one directory tree, honouring OCI whiteouts and opaque
directories, numeric ownership, permission bits (setuid/setgid/sticky included) and mtimes.

Trust boundary: layer tars are hostile input. Member names are normalised and validated, and every path
component is opened with O_NOFOLLOW relative to a directory fd that started at the root, so nothing outside
the root is ever created, modified or removed, whatever symlinks earlier members planted. Symlink targets
are stored verbatim (they are resolved inside the guest) but never followed on the host. Device nodes are
not created. Size, entry-count, depth and ratio limits bound the work one image can cause; sizes count what is
written (a sparse member's holes, a hardlink's target size), and the ratio compares both the decompressed
stream and the bytes written with the layer bytes read. Any violation raises LayerError; the caller then
deletes the whole root. The root directory itself (created by the caller) is never chmod/chown-ed: a layer's
"./" entry is ignored. Nothing here recurses over the tree (trees of any depth are removed iteratively).
"""

from __future__ import annotations

import contextlib
import errno
import lzma
import os
import pathlib
import stat
import tarfile
import typing
import zlib
from dataclasses import dataclass

from kvmrkt.errors import LayerError
from kvmrkt.images.decompress import Cursor, Meter, open_stream
from kvmrkt.images.scratch import remove_tree

_CHUNK = 1024 * 1024
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_MAX_ID = 2**32 - 2  # -1 / 2**32-1 mean "unchanged" to chown
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SYMLINK_ERRNOS = (errno.ELOOP, errno.ENOTDIR)
_MEMBER_ERRORS = (
    OSError, ValueError, OverflowError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError, RecursionError
)

_Path = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LayerLimits:
    """Resource limits for one apply run (all layers applied through one LayerApplier)."""

    max_total_bytes: int = 8 * 1024**3  # file bytes written (sparse holes, hardlinks' sizes), across all layers
    max_entries: int = 1_000_000  # number of tar members across all layers
    max_ratio: int = 200  # decompressed, and written, bytes / layer bytes read, for each layer
    max_depth: int = 256  # path components of a member (mkfs.erofs crashes near 2,000)


def _bad(member: str, what: str) -> LayerError:
    return LayerError(f"layer member {member!r}: {what}")


def _normalise(name: str, member: str) -> _Path:
    """Split a member (or hardlink target) name into checked components; () is the root itself."""
    if name.startswith("/"):
        raise _bad(member, f"absolute path {name!r}")
    if "\x00" in name:
        raise _bad(member, "NUL byte in path")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise _bad(member, f"'..' component in {name!r}")
    if any(p.startswith(_WHITEOUT) for p in parts[:-1]):
        raise _bad(member, f"whiteout name used as a directory in {name!r}")
    return parts


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(dir_fd: int, name: str) -> None:
    """Remove dir_fd/name (a whole tree for a directory) without following symlinks; missing is fine."""
    st = _lstat(name, dir_fd)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree(dir_fd, name)
    else:
        os.unlink(name, dir_fd=dir_fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class LayerApplier:
    """Applies the layers of one image, in order, onto ``root`` (an existing directory, mode 0700)."""

    def __init__(self, root: pathlib.Path, limits: LayerLimits = LayerLimits()) -> None:
        self._root = root
        self._limits = limits
        self._entries = 0
        self._bytes = 0
        self._dir_mtimes: dict[_Path, float] = {}
        self._dir_fds: dict[_Path, int] = {}  # directories opened (safely) during this layer, by path
        self._written: Meter | None = None  # this layer's bytes written, against its bytes read
        self.skipped_devices: list[str] = []
        """Paths of character/block device members, which are never created on the host."""

    def apply(
        self,
        fileobj: typing.BinaryIO,
        *,
        compressed_size: int | None = None,
        subdir: str | None = None,
        on_other: typing.Callable[[tarfile.TarFile, tarfile.TarInfo], None] | None = None,
    ) -> None:
        """Apply one layer read from ``fileobj`` (plain, gzip, bzip2 or xz tar, detected by magic bytes).

        ``compressed_size`` is the blob size declared by the manifest, if known; a longer stream is rejected.
        ``subdir`` (appc's ``rootfs``) applies only members below that directory, with the prefix removed;
        other members go to ``on_other`` (which may read them) or are ignored.
        Raises LayerError on malformed or hostile content or when a LayerLimits limit is exceeded.
        """
        cursor = Cursor()
        touched: set[_Path] = set()  # paths this layer created (with their ancestors): opaque dirs keep them
        rootfd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with contextlib.ExitStack() as stack:
                stream, raw = stack.enter_context(open_stream(
                    fileobj, max_ratio=self._limits.max_ratio, cursor=cursor, declared=compressed_size))
                self._written = Meter(raw, self._limits.max_ratio, cursor, "expands on disk")
                tar = stack.enter_context(tarfile.open(fileobj=stream, mode="r|"))
                while (member := tar.next()) is not None:
                    tar.members.clear()  # type: ignore[attr-defined]  # else stream mode keeps every TarInfo
                    cursor.where = f"layer member {member.name!r}"
                    if subdir is not None:
                        head, _, rest = member.name.lstrip("./").partition("/")
                        if head != subdir:
                            if on_other is not None:
                                on_other(tar, member)
                            continue
                        member.name = rest or "."
                        if member.islnk():
                            lhead, _, lrest = member.linkname.lstrip("./").partition("/")
                            if lhead != subdir:
                                raise _bad(member.name, f"hardlink to {member.linkname!r} outside {subdir}/")
                            member.linkname = lrest
                    try:
                        self._apply_member(tar, member, rootfd, touched)
                    except LayerError:
                        raise
                    except _MEMBER_ERRORS as exc:
                        raise _bad(member.name, str(exc)) from exc
                    cursor.where = f"the tar header after {member.name!r}"
        except LayerError:
            raise
        except _MEMBER_ERRORS as exc:
            raise LayerError(f"layer is not a valid tar stream ({cursor.where}): {exc}") from exc
        finally:
            self._invalidate()
            os.close(rootfd)

    def _invalidate(self) -> None:
        """Forget the directory fds cache: called before anything is removed or replaced, so a cached fd never
        outlives the directory entry it was opened through."""
        for fd in self._dir_fds.values():
            os.close(fd)
        self._dir_fds.clear()

    def _remove_entry(self, dir_fd: int, name: str) -> None:
        """Remove an entry; removing a directory first drops the fd cache (it may hold fds below it)."""
        st = _lstat(name, dir_fd)
        if st is not None and stat.S_ISDIR(st.st_mode):
            self._invalidate()
        _remove(dir_fd, name)

    def finish(self) -> None:
        """Set directory mtimes, deepest first, once all layers are applied, so the tree is deterministic."""
        rootfd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for path in sorted(self._dir_mtimes, key=len, reverse=True):
                fd = self._open_dir(rootfd, path, "", create=False, strict=False)
                if fd is not None:
                    try:
                        os.utime(fd, (self._dir_mtimes[path], self._dir_mtimes[path]))
                    finally:
                        os.close(fd)
        finally:
            self._invalidate()
            os.close(rootfd)

    def _open_dir(self, rootfd: int, path: _Path, member: str, *, create: bool, strict: bool) -> int | None:
        """Open root/path one component at a time, never following a symlink; return the fd.

        Missing directories are created (0755, root-owned) when ``create``, else None is returned. A symlink
        or non-directory component raises LayerError when ``strict``, else None is returned.
        """
        start = 0
        for cut in range(len(path), 0, -1):
            if path[:cut] in self._dir_fds:
                start = cut
                break
        if start == len(path) and start:
            return os.dup(self._dir_fds[path])
        fd = os.dup(self._dir_fds[path[:start]]) if start else os.dup(rootfd)
        try:
            for depth, comp in enumerate(path[start:], start=start + 1):
                try:
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    os.mkdir(comp, 0o700, dir_fd=fd)
                    nfd = os.open(comp, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(nfd, 0o755)
                    self._dir_mtimes[path[:depth]] = 0
                except OSError as exc:
                    if exc.errno not in _SYMLINK_ERRNOS:
                        raise
                    if not strict:
                        os.close(fd)
                        return None
                    where = "/".join(path[:depth])
                    raise _bad(member, f"{where!r} is a symlink or not a directory") from exc
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        if path:
            if len(self._dir_fds) >= 512:
                self._invalidate()
            self._dir_fds[path] = os.dup(fd)
        return fd

    def _apply_member(
        self, tar: tarfile.TarFile, member: tarfile.TarInfo, rootfd: int, touched: set[_Path]
    ) -> None:
        name = member.name
        self._entries += 1
        if self._entries > self._limits.max_entries:
            raise _bad(name, f"more than {self._limits.max_entries} entries in the image")
        parts = _normalise(name, name)
        if len(parts) > self._limits.max_depth:
            raise _bad(name[:200], f"deeper than {self._limits.max_depth} directories")
        if parts and parts[-1].startswith(_WHITEOUT):
            self._whiteout(parts, name, rootfd, touched)
            return
        if member.ischr() or member.isblk():
            self.skipped_devices.append("/".join(parts))
            return
        if not (member.isdir() or member.isreg() or member.issym() or member.islnk() or member.isfifo()):
            raise _bad(name, f"unsupported tar member type {member.type!r}")
        if not parts:
            if member.isdir():
                return  # the root's own metadata stays as the caller made it
            raise _bad(name, "only a directory may name the layer root")
        if not (0 <= member.uid <= _MAX_ID and 0 <= member.gid <= _MAX_ID):
            raise _bad(name, f"invalid owner {member.uid}:{member.gid}")
        if member.isreg() and self._bytes + member.size > self._limits.max_total_bytes:
            limit = self._limits.max_total_bytes
            raise _bad(
                name, f"size {member.size} exceeds the image limit of {limit} bytes ({self._bytes} used)"
            )
        for depth in range(len(parts), 0, -1):
            if parts[:depth] in touched:
                break
            touched.add(parts[:depth])
        pfd = self._open_dir(rootfd, parts[:-1], name, create=True, strict=True)
        assert pfd is not None  # create=True never returns None
        try:
            leaf = parts[-1]
            if member.isdir():
                self._make_dir(member, pfd, leaf)
                self._dir_mtimes[parts] = member.mtime
            elif member.islnk():
                self._make_hardlink(member, parts, pfd, rootfd)
            else:
                self._remove_entry(pfd, leaf)
                if member.issym():
                    os.symlink(member.linkname, leaf, dir_fd=pfd)
                    os.chown(leaf, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)
                    os.utime(leaf, (member.mtime, member.mtime), dir_fd=pfd, follow_symlinks=False)
                elif member.isfifo():
                    os.mkfifo(leaf, 0o600, dir_fd=pfd)
                    fd = os.open(leaf, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                    self._finish_fd(fd, member)
                else:
                    self._write_file(tar, member, pfd, leaf)
        finally:
            os.close(pfd)

    def _make_dir(self, member: tarfile.TarInfo, pfd: int, leaf: str) -> None:
        st = _lstat(leaf, pfd)
        if st is None or not stat.S_ISDIR(st.st_mode):
            if st is not None:
                os.unlink(leaf, dir_fd=pfd)  # not a directory: no cached fd goes through it
            os.mkdir(leaf, 0o700, dir_fd=pfd)
        fd = os.open(leaf, _DIR_FLAGS, dir_fd=pfd)
        try:
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, member.mode & 0o7777)
        finally:
            os.close(fd)

    def _make_hardlink(self, member: tarfile.TarInfo, parts: _Path, pfd: int, rootfd: int) -> None:
        name = member.name
        target = _normalise(member.linkname, name)
        if not target or target == parts:
            raise _bad(name, f"invalid hardlink target {member.linkname!r}")
        sfd = self._open_dir(rootfd, target[:-1], name, create=False, strict=True)
        try:
            st = _lstat(target[-1], sfd) if sfd is not None else None
            if st is None:
                raise _bad(name, f"hardlink target {member.linkname!r} does not exist")
            if stat.S_ISDIR(st.st_mode):
                raise _bad(name, f"hardlink target {member.linkname!r} is a directory")
            assert sfd is not None
            self._count(name, st.st_size)  # each link is the whole file to whoever reads the tree
            self._remove_entry(pfd, parts[-1])
            os.link(target[-1], parts[-1], src_dir_fd=sfd, dst_dir_fd=pfd, follow_symlinks=False)
        finally:
            if sfd is not None:
                os.close(sfd)

    def _write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, pfd: int, leaf: str) -> None:
        src = tar.extractfile(member)
        if src is None:
            raise _bad(member.name, "no file data")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(leaf, flags, 0o600, dir_fd=pfd)
        try:
            while chunk := src.read(_CHUNK):
                self._count(member.name, len(chunk))
                _write_all(fd, chunk)
        except BaseException:
            os.close(fd)
            raise
        self._finish_fd(fd, member)

    def _count(self, name: str, size: int) -> None:
        """Charge ``size`` bytes of file data to the image total and to this layer's written/read ratio."""
        self._bytes += size
        if self._bytes > self._limits.max_total_bytes:
            raise _bad(name, f"image exceeds {self._limits.max_total_bytes} bytes")
        assert self._written is not None
        self._written.charge(size)

    @staticmethod
    def _finish_fd(fd: int, member: tarfile.TarInfo) -> None:
        """Set owner, then mode (chown clears setuid), then mtime on fd, and close it."""
        try:
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, member.mode & 0o7777)
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)

    def _whiteout(self, parts: _Path, member: str, rootfd: int, touched: set[_Path]) -> None:
        parent, leaf = parts[:-1], parts[-1]
        for depth in range(1, len(parent) + 1):
            touched.add(parent[:depth])
        if leaf == _OPAQUE:
            dfd = self._open_dir(rootfd, parent, member, create=True, strict=True)
            assert dfd is not None
            os.close(dfd)
            self._purge(rootfd, parent, member, touched)
            return
        if leaf.startswith(_WHITEOUT + _WHITEOUT):
            return  # other AUFS metadata (.wh..wh.plnk, ...): never created, nothing to remove
        target = leaf[len(_WHITEOUT) :]
        if target in ("", ".", ".."):
            raise _bad(member, "invalid whiteout name")
        if (*parent, target) in touched:
            return  # whiteouts only hide lower layers
        dfd = self._open_dir(rootfd, parent, member, create=False, strict=True)
        if dfd is not None:
            try:
                self._remove_entry(dfd, target)
            finally:
                os.close(dfd)

    def _purge(self, rootfd: int, top: _Path, member: str, touched: set[_Path]) -> None:
        """Remove everything below root/top that this layer did not create (iteratively, directory by directory)."""
        todo = [top]
        while todo:
            path = todo.pop()
            dfd = self._open_dir(rootfd, path, member, create=False, strict=True)
            if dfd is None:
                continue
            try:
                for name in os.listdir(dfd):
                    child = (*path, name)
                    if child not in touched:
                        self._remove_entry(dfd, name)
                        continue
                    st = _lstat(name, dfd)
                    if st is not None and stat.S_ISDIR(st.st_mode):
                        todo.append(child)
            finally:
                os.close(dfd)
