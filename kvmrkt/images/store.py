"""Content-addressed image store: blobs, image records in SQLite, and guest root filesystems.

Role: the only module that writes image files. Layout under ``DATA_DIR/cas``::

    blobs/<alg>/<hex>      blobs named by their digest (OCI: sha256; appc ACIs: sha512 of the plain tar)
    rootfs/<hex>.erofs     guest root filesystems built from an image's layers, named by their own digest
    index.db               SQLite: images (records, names, last use) and remote references
    tmp/                   work area (0700): partial downloads, unpacked trees; never visible as an image
                           (each entry locked by its maker, see ``kvmrkt.images.scratch``; gc removes dead ones at once)
    lock                   flock held by writers
    imports.lock           flock held shared by running imports, exclusively by gc (``importing``)

Every write lands in ``tmp`` and is renamed into place, so an interrupted import or fetch leaves no half image,
and what completed (whole blobs) is reused by a rerun. Trust boundary: images are hostile input. Blobs are
hashed while written and again whenever they are read (a blob whose bytes no longer match its digest is an
error and is deleted, never used); layers are applied by ``kvmrkt.images.layers`` inside a root-only directory; the
erofs image is rebuilt from verified layers when missing or corrupt, and must come out byte-identical.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from kvmrkt.digest import Digest
from kvmrkt.errors import CommandError, DigestMismatchError, ImageError, ImageNotFoundError
from kvmrkt.host import proc as _proc
from kvmrkt.images import scratch
from kvmrkt.images.index import Index
from kvmrkt.images.layers import LayerApplier, LayerLimits
from kvmrkt.images.records import ImageRecord, Progress, Readable, Staged, no_progress, normalise_name, passwd_tables


class _HashingReader:
    """Reads a file while hashing it; ``check()`` at the end raises if the bytes were not the digest's."""

    def __init__(self, fh: BinaryIO, digest: Digest, path: Path) -> None:
        self.fh, self.digest, self.path = fh, digest, path
        self.h = hashlib.new(digest.algorithm)

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.h.update(data)
        return data

    def check(self) -> None:
        while self.read(1 << 20):
            pass
        if self.h.hexdigest() != self.digest.hex:
            raise DigestMismatchError(
                f"stored blob {self.digest} is corrupt "
                f"(its bytes hash to {self.digest.algorithm}:{self.h.hexdigest()})",
                hint="it was deleted; fetch or import the image again",
            )


SHM = Path("/dev/shm")
LEGACY_SCRATCH_PREFIX = "kvmrkt-unpack-"  # world-creatable names of older versions: only our own are removed


def memory_scratch() -> Path:
    """kvmrkt's own 0700 directory in memory (``/dev/shm`` is world-writable: this uid's directory in it is
    created and checked by ``kvmrkt.images.scratch``, never used when someone else made it)."""
    return SHM / f"kvmrkt-{os.geteuid()}"


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Store:
    """The image store under ``data_dir/cas``."""

    def __init__(self, data_dir: Path, *, limits: LayerLimits | None = None, scratch: str = "auto") -> None:
        self.root = data_dir / "cas"
        self.limits = limits or LayerLimits()
        self.scratch = scratch
        self._db: Index | None = None

    # --- plumbing ---------------------------------------------------------------------------------------

    def _dirs(self) -> None:
        for sub in ("blobs/sha256", "blobs/sha512", "rootfs", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)

    @property
    def db(self) -> Index:
        """The index (created on first use; WAL so readers never block on a writer)."""
        if self._db is None:
            self._dirs()
            db = Index(self.root / "index.db")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=60000")
            db.execute("CREATE TABLE IF NOT EXISTS images (id TEXT PRIMARY KEY, "
                       "record TEXT NOT NULL, imported REAL NOT NULL, last_used REAL NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS names (name TEXT PRIMARY KEY, image_id TEXT NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS remotes (ref TEXT PRIMARY KEY, image_id TEXT NOT NULL, "
                       "fetched REAL NOT NULL)")
            self._db = db
        return self._db

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's writer lock (blocks other writers, not readers)."""
        self._dirs()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def importing(self) -> Iterator[None]:
        """Held (shared) by an import or fetch from its first blob to its record, so that ``gc_files``, which takes
        it exclusively, never deletes a blob or rootfs an import has written (or found in the store) but not yet
        recorded; gc waits for the imports running when it starts."""
        with self._imports_lock(fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def _imports_lock(self, how: int) -> Iterator[None]:
        self._dirs()
        fd = os.open(self.root / "imports.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, how)
            yield
        finally:
            os.close(fd)

    def tmpdir(self) -> contextlib.AbstractContextManager[Path]:
        """A private work directory inside the store (same filesystem, so results can be renamed in), locked
        while it is used and removed after (a dead maker's is removed by the next build or gc)."""
        self._dirs()
        return scratch.directory(self.root / "tmp", "work-")

    @property
    def unpack_prefix(self) -> str:
        """How this store's unpack directories are named (the memory scratch is shared by every store)."""
        return f"unpack-{hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:12]}-"

    def sweep(self, *, legacy_age: float | None = None) -> list[str]:
        """Remove work entries whose maker died (unlocked), in the store's tmp and the memory scratch; with
        ``legacy_age``, also older versions' ``/dev/shm/kvmrkt-unpack-*`` trees of this uid older than that."""
        removed = scratch.sweep(self.root / "tmp") + scratch.sweep(memory_scratch())
        if legacy_age is not None:
            removed += scratch.sweep(SHM, LEGACY_SCRATCH_PREFIX, older_than=legacy_age, now=time.time())
        return removed

    # --- blobs ------------------------------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        """Where a blob lives (whether or not it is present)."""
        return self.root / "blobs" / digest.algorithm / digest.hex

    def has_blob(self, digest: Digest) -> bool:
        """True when the blob is present (complete: blobs appear by rename)."""
        return self.blob_path(digest).is_file()

    def put_blob(
        self, src: Readable, expected: Digest | None = None, *, algorithm: str = "sha256", size: int | None = None,
        what: str = "blob", progress: Progress = no_progress, max_bytes: int | None = None,
    ) -> Digest:
        """Copy a stream into the store, hashing as it goes; the blob appears only when complete and correct.

        Raises:
            DigestMismatchError: the bytes do not match ``expected``.
            ImageError: more bytes than ``max_bytes`` (or the declared ``size``).
        """
        if expected and self.has_blob(expected):
            return expected
        with self.staged_blob(src, expected, algorithm=algorithm, size=size, what=what, progress=progress,
                              max_bytes=max_bytes) as staged:
            return self.commit(staged)

    @contextlib.contextmanager
    def staged_blob(
        self, src: Readable, expected: Digest | None = None, *, algorithm: str = "sha256", size: int | None = None,
        what: str = "blob", progress: Progress = no_progress, max_bytes: int | None = None,
    ) -> Iterator[Staged]:
        """``put_blob`` up to, not including, the blob's appearance: the block sees the bytes (hashed, checked)
        in a locked work file and ``commit`` makes them a blob; a blob not committed is deleted at the end."""
        self._dirs()
        algorithm = expected.algorithm if expected else algorithm
        h = hashlib.new(algorithm)
        limit = max_bytes if max_bytes is not None else size
        with scratch.create(self.root / "tmp", "blob-", directory=False) as entry:
            done = 0
            with os.fdopen(entry.fd, "wb", closefd=False) as out:
                while chunk := src.read(1 << 20):
                    done += len(chunk)
                    if limit is not None and done > limit:
                        raise ImageError(f"{what} is larger than its declared size of {limit} bytes")
                    h.update(chunk)
                    out.write(chunk)
                    progress(what, done, size)
                out.flush()
                os.fsync(out.fileno())
            actual = Digest(algorithm, h.hexdigest())
            if expected and not expected.matches(actual):
                raise DigestMismatchError(f"{what} does not match its digest {expected} (its bytes hash to {actual})")
            yield Staged(actual, entry.path)

    def commit(self, staged: Staged) -> Digest:
        """Make a staged blob a blob of the store."""
        os.rename(staged.path, self.blob_path(staged.digest))
        return staged.digest

    @contextlib.contextmanager
    def open_blob(self, digest: Digest) -> Iterator[_HashingReader]:
        """Read a blob, verified: leaving the block checks the whole blob against its digest (a corrupt blob is
        deleted and raises DigestMismatchError, so what was read from it must be discarded by the caller)."""
        path = self.blob_path(digest)
        try:
            fh = path.open("rb")
        except FileNotFoundError as exc:
            raise ImageError(
                f"blob {digest} is missing from the store", hint="fetch or import the image again"
            ) from exc
        with fh:
            reader = _HashingReader(fh, digest, path)
            yield reader
            try:
                reader.check()
            except DigestMismatchError:
                path.unlink(missing_ok=True)
                raise

    def read_blob(self, digest: Digest, *, max_bytes: int = 4 << 20) -> bytes:
        """A small blob's bytes, verified."""
        with self.open_blob(digest) as r:
            data = r.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ImageError(f"blob {digest} is larger than {max_bytes} bytes")
        return data

    # --- signatures -------------------------------------------------------------------------------------

    def save_signatures(self, digest: Digest, files: dict[str, bytes]) -> None:
        """Store the signatures found for a signed digest (replacing what was stored for it before)."""
        self._dirs()
        final = self.root / "signatures" / f"{digest.algorithm}-{digest.hex}"
        final.parent.mkdir(mode=0o700, exist_ok=True)
        with self.tmpdir() as tmp:
            staged = Path(tmp) / "sigs"
            staged.mkdir()
            for name, data in files.items():
                if "/" in name or name.startswith("."):
                    raise ImageError(f"invalid signature file name {name!r}")
                (staged / name).write_bytes(data)
            with self.locked():
                if final.exists():
                    shutil.rmtree(final)
                os.rename(staged, final)

    def signature_files(self, digest: Digest) -> dict[str, bytes]:
        """The stored signatures of a signed digest (empty when there are none)."""
        path = self.root / "signatures" / f"{digest.algorithm}-{digest.hex}"
        if not path.is_dir():
            return {}
        return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}

    # --- images -----------------------------------------------------------------------------------------

    def images(self) -> list[ImageRecord]:
        """All images, oldest import first."""
        rows = self.db.execute("SELECT record FROM images ORDER BY imported").fetchall()
        return [ImageRecord.from_dict(json.loads(r[0])) for r in rows]

    def get(self, image_id: str) -> ImageRecord:
        """An image by full ID.

        Raises:
            ImageNotFoundError: not in the store.
        """
        row = self.db.execute("SELECT record FROM images WHERE id = ?", (image_id,)).fetchone()
        if row is None:
            raise ImageNotFoundError(f"image {image_id} is not in the store")
        return ImageRecord.from_dict(json.loads(row[0]))

    def resolve(self, ref: str) -> ImageRecord:
        """Find an image by name (``name`` means ``name:latest``), full ID, or ID prefix (6+ hex digits).

        Raises:
            ImageNotFoundError: no match, or an ambiguous prefix.
        """
        alg, hexpart = "", ref
        for prefix in ("sha256:", "sha512:", "sha512-"):
            if ref.startswith(prefix):
                alg, hexpart = prefix[:6], ref[7:]
        if len(hexpart) >= 6 and all(c in "0123456789abcdef" for c in hexpart):
            pattern = f"{alg or '%'}:{hexpart}%"
            rows = self.db.execute("SELECT record FROM images WHERE id LIKE ?", (pattern,)).fetchall()
            if len(rows) == 1:
                return ImageRecord.from_dict(json.loads(rows[0][0]))
            if len(rows) > 1:
                raise ImageNotFoundError(f"image ID prefix {ref!r} is ambiguous")
        row = self.db.execute(
            "SELECT record FROM images JOIN names ON names.image_id = images.id WHERE names.name = ?",
            (normalise_name(ref),),
        ).fetchone()
        if row is None:
            raise ImageNotFoundError(
                f"no image {ref!r} in the store",
                hint="`kvmrkt image list` shows the store; `kvmrkt fetch REF` or `kvmrkt image import REF` adds images",
            )
        return ImageRecord.from_dict(json.loads(row[0]))

    def remote(self, ref: str) -> str | None:
        """The image ID a remote reference was last fetched as, if any."""
        row = self.db.execute("SELECT image_id FROM remotes WHERE ref = ?", (ref,)).fetchone()
        return row[0] if row else None

    def record_remote(self, ref: str, image_id: str) -> None:
        """Remember what a remote reference pointed at (for ``--pull-policy new``)."""
        self.db.execute("INSERT OR REPLACE INTO remotes VALUES (?, ?, ?)", (ref, image_id, time.time()))

    def touch(self, image_id: str) -> None:
        """Record a use of an image (image gc spares recently used images)."""
        self.db.execute("UPDATE images SET last_used = ? WHERE id = ?", (time.time(), image_id))

    def add_image(self, record: ImageRecord, *, progress: Progress = no_progress) -> ImageRecord:
        """Build the guest rootfs from the record's layers (already in the store) and index the image.

        ``record.rootfs``/``rootfs_size``/``passwd``/``groups`` are filled in here. A previous image of the same
        name keeps its ID but loses the name.
        """
        with self.locked():
            row = self.db.execute("SELECT record FROM images WHERE id = ?", (record.id,)).fetchone()
            old = ImageRecord.from_dict(json.loads(row[0])) if row else None
            if old and self._rootfs_present(old):
                progress("the image is already in the store", 0, None)
                record = replace(record, rootfs=old.rootfs, rootfs_size=old.rootfs_size, passwd=old.passwd,
                                 groups=old.groups, skipped_devices=old.skipped_devices,
                                 verity_root=old.verity_root, verity_salt=old.verity_salt)
            else:
                record = self._build_rootfs(record, progress)
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("INSERT OR REPLACE INTO names VALUES (?, ?)", (record.name, record.id))
                self.db.execute(
                    "INSERT INTO images VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                    "record = excluded.record, imported = excluded.imported",
                    (record.id, json.dumps(record.to_dict()), record.imported, record.imported),
                )
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return record

    def layer_chain(self, record: ImageRecord) -> list[tuple[ImageRecord, str]]:
        """The (image, layer digest) pairs to apply for an image: its dependencies' first (appc)."""
        chain: list[tuple[ImageRecord, str]] = []
        for dep in record.dependencies:
            chain += self.layer_chain(self.get(dep))
        return chain + [(record, layer) for layer in record.layers]

    def render(self, record: ImageRecord, dest: Path, progress: Progress = no_progress) -> LayerApplier:
        """Apply an image's layers (verified) into ``dest`` (an empty 0700 directory)."""
        applier = LayerApplier(dest, self.limits)
        for owner, layer in self.layer_chain(record):
            digest = Digest.parse(layer)
            progress(f"applying layer {digest.hex[:12]}", 0, None)
            with self.open_blob(digest) as reader:
                applier.apply(reader, subdir="rootfs" if owner.kind == "aci" else None)  # type: ignore[arg-type]
        applier.finish()
        return applier

    def _scratch(self, record: ImageRecord) -> contextlib.AbstractContextManager[Path]:
        """Where to unpack a tree that only lives until its erofs image is built: memory (kvmrkt's own 0700
        directory in ``/dev/shm``) when the layers comfortably fit in a quarter of the available memory, else
        the store's tmp. Creating files is the slow part of unpacking on many disks (about 1 ms a file on this
        build host, against 10 us in memory), and the tree is thrown away anyway."""
        layers = sum(self.blob_path(Digest.parse(d)).stat().st_size
                     for _owner, d in self.layer_chain(record) if self.has_blob(Digest.parse(d)))
        fits = self.scratch == "memory" or (self.scratch == "auto" and layers * 5 < _available_memory() // 4)
        if fits and SHM.is_dir() and (self.scratch == "memory" or scratch.own_dir(memory_scratch())):
            return scratch.directory(memory_scratch(), self.unpack_prefix)
        return scratch.directory(self.root / "tmp", self.unpack_prefix)

    def _build_rootfs(self, record: ImageRecord, progress: Progress) -> ImageRecord:
        self.sweep()
        with self.tmpdir() as work, self._scratch(record) as unpack:
            tree = unpack / "rootfs"
            tree.mkdir(mode=0o700)
            applier = self.render(record, tree, progress)
            passwd, groups = passwd_tables(tree)
            progress("building the erofs guest root filesystem", 0, None)
            out = work / "rootfs.erofs"
            seed = hashlib.sha256(record.id.encode()).hexdigest()[:32]
            try:
                _proc.run(["mkfs.erofs", "-T0", f"-U{uuidlib.UUID(hex=seed)}", out, tree], timeout=3600,
                          what="mkfs.erofs")
            except CommandError as exc:
                raise ImageError(f"cannot build the guest root filesystem of {record.name}: {exc.message}",
                                 hint=f"{exc.hint}; the image's files may hit a limit of mkfs.erofs") from exc
            digest = Digest.of_file(out)
            if record.rootfs and record.rootfs != str(digest):
                raise ImageError(f"rebuilt rootfs of {record.name} is {digest}, not the recorded {record.rootfs}",
                                 hint="the layers or mkfs.erofs changed; re-import the image")
            progress("building the dm-verity hash tree", 0, None)
            salt = hashlib.sha256(b"kvmrkt-verity-salt\0" + digest.hex.encode()).hexdigest()
            tree_file = work / "rootfs.verity"
            proc = _proc.run(["veritysetup", "format", out, tree_file, f"--salt={salt}", "--hash=sha256",
                              "--data-block-size=4096", "--hash-block-size=4096",
                              f"--uuid={uuidlib.UUID(hex=salt[:32])}"], what="veritysetup format")
            root = next((ln.split(":", 1)[1].strip() for ln in proc.stdout.decode().splitlines()
                         if ln.startswith("Root hash:")), "")
            if len(root) != 64 or (record.verity_root and record.verity_root != root):
                raise ImageError(f"dm-verity root hash of {record.name} is {root!r}, expected {record.verity_root!r}")
            os.rename(tree_file, self.root / "rootfs" / f"{digest.hex}.verity")
            os.rename(out, self.root / "rootfs" / f"{digest.hex}.erofs")
        size = (self.root / "rootfs" / f"{digest.hex}.erofs").stat().st_size
        return replace(record, rootfs=str(digest), rootfs_size=size, passwd=passwd, groups=groups,
                       skipped_devices=tuple(applier.skipped_devices), verity_root=root, verity_salt=salt)

    def _rootfs_present(self, record: ImageRecord) -> bool:
        """The erofs image (of the recorded size) and its dm-verity tree are there (a cheap check, no hashing)."""
        path = self.root / "rootfs" / f"{Digest.parse(record.rootfs).hex}.erofs"
        return bool(record.verity_root) and path.with_suffix(".verity").is_file() and path.is_file() and (
            path.stat().st_size == record.rootfs_size)

    def rootfs_path(self, record: ImageRecord, *, progress: Progress = no_progress, rehash: bool = False) -> Path:
        """The guest rootfs of an image (its dm-verity hash tree is beside it, ``.verity``); rebuilt from the
        layers when it is missing, has the wrong size or (with ``rehash``, as ``image verify`` does) when its
        bytes no longer match its digest. Launches do not rehash: the guest reads the image through dm-verity
        with the measured root hash, so altered bytes fail to read inside the VM.

        Raises:
            ImageError: it cannot be rebuilt (layers gone or corrupt).
        """
        digest = Digest.parse(record.rootfs)
        path = self.root / "rootfs" / f"{digest.hex}.erofs"
        tree = path.with_suffix(".verity")
        if self._rootfs_present(record) and (not rehash or Digest.of_file(path).matches(digest)):
            return path
        progress(f"rootfs of {record.name} is {'corrupt' if path.exists() else 'missing'}: rebuilding", 0, None)
        with self.locked():
            path.unlink(missing_ok=True)
            tree.unlink(missing_ok=True)
            rebuilt = self._build_rootfs(record, progress)
            if rebuilt.verity_root != record.verity_root:  # a record from before hash trees were kept
                self.db.execute("UPDATE images SET record = ? WHERE id = ?",
                                (json.dumps(rebuilt.to_dict()), record.id))
        return path

    def names(self, image_id: str) -> list[str]:
        """Every name that points at an image."""
        rows = self.db.execute("SELECT name FROM names WHERE image_id = ? ORDER BY name", (image_id,)).fetchall()
        return [r[0] for r in rows]

    def untag(self, name: str) -> None:
        """Remove one name (the image stays while other names or the ID are used)."""
        with self.locked():
            self.db.execute("DELETE FROM names WHERE name = ?", (normalise_name(name),))

    def remove(self, record: ImageRecord) -> None:
        """Delete an image and its names; files no image needs are deleted at once."""
        with self.locked():
            self.db.execute("DELETE FROM names WHERE image_id = ?", (record.id,))
            self.db.execute("DELETE FROM images WHERE id = ?", (record.id,))
            self.db.execute("DELETE FROM remotes WHERE image_id = ?", (record.id,))
        self.gc_files()

    @staticmethod
    def _referenced(records: list[ImageRecord]) -> set[str]:
        """The blobs images refer to."""
        return {d for r in records for d in (r.id, r.config_digest, r.signed_digest, *r.layers) if d}

    @contextlib.contextmanager
    def discarded_on_refusal(self, digests: list[Digest]) -> Iterator[None]:
        """When the block raises ImageError (an image refused while its rootfs is built), delete those of
        ``digests`` (blobs and their signatures) that no image refers to, so the refused image leaves nothing."""
        try:
            yield
        except ImageError:
            with self.locked():
                keep = self._referenced(self.images())
                for digest in {d for d in digests if str(d) not in keep}:
                    self.blob_path(digest).unlink(missing_ok=True)
                    sigs = self.root / "signatures" / f"{digest.algorithm}-{digest.hex}"
                    if sigs.is_dir():
                        shutil.rmtree(sigs)
            raise

    def gc_files(self, tmp_age: float = 3600.0) -> list[str]:
        """Delete blobs and rootfs files no image refers to, and work entries whose maker is gone (older
        versions' unlocked ``/dev/shm`` trees once they are ``tmp_age`` old)."""
        removed: list[str] = []
        with self._imports_lock(fcntl.LOCK_EX), self.locked():
            records = self.images()
            keep_blobs = self._referenced(records)
            keep_rootfs = {Digest.parse(r.rootfs).hex for r in records}
            keep_sigs = {Digest.parse(r.signed_digest) for r in records if r.signed_digest}
            sig_root = self.root / "signatures"
            for path in sig_root.iterdir() if sig_root.is_dir() else []:
                alg, _, hexpart = path.name.partition("-")
                if Digest(alg, hexpart) not in keep_sigs:
                    shutil.rmtree(path)
            for alg in ("sha256", "sha512"):
                for path in (self.root / "blobs" / alg).iterdir():
                    if f"{alg}:{path.name}" not in keep_blobs:
                        path.unlink()
                        removed.append(f"{alg}:{path.name}")
            for path in (self.root / "rootfs").iterdir():
                if path.name.removesuffix(".erofs").removesuffix(".verity") not in keep_rootfs:
                    path.unlink()
                    removed.append(path.name)
            removed += self.sweep(legacy_age=tmp_age)
        return removed
