"""Content-addressed image store (minimal OCI layout import; issue [2/7] completes formats and registries).

Role: the only module that writes image files. Layout under ``DATA_DIR/cas``::

    blobs/sha256/<hex>     OCI blobs (manifests, configs, layers), named by their digest
    images/<hex>.json      one record per image, named by its manifest digest (the image ID)
    rootfs/<hex>.erofs     the guest root filesystem built from the layers, named by its own digest
    tmp/                   work area (0700); nothing here is ever visible as an image
    lock                   flock held while writing

Every write goes to ``tmp`` first and is renamed into place, so an interrupted import leaves no half image.
Trust boundary: images are hostile input. Blob bytes are hashed while copied and must match their
descriptor digest; layers are applied by ``kvmrkt.layers`` (no escapes, no device nodes) in a root-only
directory; manifests and configs are parsed strictly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmrkt import _proc
from kvmrkt.digest import Digest
from kvmrkt.errors import DigestMismatchError, ImageError, ImageNotFoundError, ManifestError
from kvmrkt.layers import LayerApplier
from kvmrkt.pod import write_json

Progress = Callable[[str], None]

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
}
REF_NAME = "org.opencontainers.image.ref.name"
_MAX_JSON = 4 << 20


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """An imported image: identity, run defaults from its config, the guest rootfs, and its user tables."""

    id: str
    name: str
    source: str
    imported: float
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: tuple[str, ...]
    working_dir: str
    user: str
    rootfs: str
    rootfs_size: int
    layers: tuple[str, ...]
    passwd: tuple[tuple[str, int, int], ...] = ()
    groups: tuple[tuple[str, int, tuple[str, ...]], ...] = ()
    skipped_devices: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as stored and as printed by ``image list --format json``."""
        return {
            "id": self.id,
            "name": self.name,
            "source": self.source,
            "imported": self.imported,
            "config": {
                "entrypoint": list(self.entrypoint),
                "cmd": list(self.cmd),
                "env": list(self.env),
                "workingDir": self.working_dir,
                "user": self.user,
            },
            "rootfs": {"digest": self.rootfs, "size": self.rootfs_size, "format": "erofs"},
            "layers": list(self.layers),
            "passwd": [list(p) for p in self.passwd],
            "groups": [[g[0], g[1], list(g[2])] for g in self.groups],
            "skippedDevices": list(self.skipped_devices),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageRecord:
        """Parse a stored record."""
        c = d["config"]
        return cls(
            id=d["id"],
            name=d["name"],
            source=d["source"],
            imported=float(d["imported"]),
            entrypoint=tuple(c["entrypoint"]),
            cmd=tuple(c["cmd"]),
            env=tuple(c["env"]),
            working_dir=c["workingDir"],
            user=c["user"],
            rootfs=d["rootfs"]["digest"],
            rootfs_size=int(d["rootfs"]["size"]),
            layers=tuple(d["layers"]),
            passwd=tuple((p[0], int(p[1]), int(p[2])) for p in d.get("passwd", [])),
            groups=tuple((g[0], int(g[1]), tuple(g[2])) for g in d.get("groups", [])),
            skipped_devices=tuple(d.get("skippedDevices", [])),
        )

    def resolve_user(self, user: str, group: str | None) -> tuple[int, int, tuple[int, ...]]:
        """Numeric uid, gid and supplementary gids for ``user``/``group`` (names looked up in the image's
        /etc/passwd and /etc/group, as the OCI image spec says).

        Raises:
            ImageError: a name the image does not define.
        """
        uid: int | None = None
        gid: int | None = None
        uname: str | None = None
        if user.isdigit():
            uid = int(user)
            for name, puid, pgid in self.passwd:
                if puid == uid:
                    uname, gid = name, pgid
                    break
        else:
            for name, puid, pgid in self.passwd:
                if name == user:
                    uname, uid, gid = name, puid, pgid
                    break
            if uid is None:
                raise ImageError(f"user {user!r} is not defined in the image's /etc/passwd ({self.name})")
        if group:
            if group.isdigit():
                gid = int(group)
            else:
                match = [g[1] for g in self.groups if g[0] == group]
                if not match:
                    raise ImageError(f"group {group!r} is not defined in the image's /etc/group ({self.name})")
                gid = match[0]
        supplementary = tuple(sorted({g[1] for g in self.groups if uname and uname in g[2]} - {gid or 0}))
        return uid, gid or 0, supplementary


def _read_json(path: Path, what: str) -> Any:
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_JSON + 1)
    except OSError as exc:
        raise ImageError(f"cannot read {what} {path}: {exc.strerror}") from exc
    if len(data) > _MAX_JSON:
        raise ManifestError(f"{what} {path} is larger than {_MAX_JSON} bytes")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ManifestError(f"{what} {path} is not valid JSON: {exc}") from exc


def _passwd_tables(root: Path) -> tuple[tuple[tuple[str, int, int], ...], tuple[tuple[str, int, tuple[str, ...]], ...]]:
    def lines(rel: str) -> list[list[str]]:
        path = root / rel
        if path.is_symlink() or not path.is_file() or path.stat().st_size > (1 << 20):
            return []
        return [ln.split(":") for ln in path.read_text("utf-8", "replace").splitlines() if ln and ln[0] != "#"]

    passwd = tuple(
        (f[0], int(f[2]), int(f[3])) for f in lines("etc/passwd") if len(f) >= 4 and f[2].isdigit() and f[3].isdigit()
    )
    groups = tuple(
        (f[0], int(f[2]), tuple(m for m in f[3].split(",") if m))
        for f in lines("etc/group")
        if len(f) >= 4 and f[2].isdigit()
    )
    return passwd, groups


class Store:
    """The image store under ``data_dir/cas``."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "cas"

    def _dirs(self) -> None:
        for sub in ("blobs/sha256", "images", "rootfs", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self._dirs()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # --- reading ----------------------------------------------------------------------------------------

    def images(self) -> list[ImageRecord]:
        """All images, oldest import first."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for path in (self.root / "images").glob("*.json"):
                try:
                    out.append(ImageRecord.from_dict(json.loads(path.read_text())))
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    raise ImageError(f"corrupt image record {path}: {exc}") from exc
        return sorted(out, key=lambda r: r.imported)

    def resolve(self, ref: str) -> ImageRecord:
        """Find an image by name (``name`` means ``name:latest``), full ID, or ID prefix (6+ hex digits).

        Raises:
            ImageNotFoundError: no match, or an ambiguous prefix.
        """
        images = self.images()
        hexpart = ref.removeprefix("sha256:")
        if len(hexpart) >= 6 and all(c in "0123456789abcdef" for c in hexpart):
            found = [r for r in images if r.id.removeprefix("sha256:").startswith(hexpart)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise ImageNotFoundError(f"image ID prefix {ref!r} is ambiguous")
        name = ref if ":" in ref.rsplit("/", 1)[-1] else f"{ref}:latest"
        found = [r for r in images if r.name == name]
        if not found:
            raise ImageNotFoundError(
                f"no image {ref!r} in the store",
                hint="`kvmrkt image list` shows imported images; import one with `kvmrkt image import oci:DIR:TAG`",
            )
        return found[-1]

    def rootfs_path(self, digest: str) -> Path:
        """Path of a guest rootfs image.

        Raises:
            ImageError: it is missing (the store was tampered with or partly deleted).
        """
        path = self.root / "rootfs" / f"{Digest.parse(digest).hex}.erofs"
        if not path.is_file():
            raise ImageError(f"guest root filesystem {digest} is missing from the store", hint="re-import the image")
        return path

    # --- writing ----------------------------------------------------------------------------------------

    def _ingest(self, src: Path, digest: Digest) -> Path:
        """Copy a blob into the store, hashing as it goes.

        Raises:
            DigestMismatchError: the bytes do not match the digest.
        """
        dest = self.root / "blobs" / digest.algorithm / digest.hex
        if dest.is_file():
            return dest
        h = hashlib.new(digest.algorithm)
        fd, tmpname = tempfile.mkstemp(dir=self.root / "tmp", prefix="blob-")
        try:
            with src.open("rb") as fin, os.fdopen(fd, "wb") as fout:
                while chunk := fin.read(1 << 20):
                    h.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            if h.hexdigest() != digest.hex:
                raise DigestMismatchError(
                    f"blob {src} does not match its digest {digest} (found sha256:{h.hexdigest()})"
                )
            os.rename(tmpname, dest)
        except FileNotFoundError as exc:
            raise ImageError(f"blob {digest} is missing from {src.parent}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmpname)
        return dest

    def import_oci_layout(
        self, layout: Path, tag: str | None, *, name: str | None = None, progress: Progress = lambda _m: None
    ) -> ImageRecord:
        """Import one image from an OCI image layout directory (as written by umoci or skopeo).

        Raises:
            ImageError, ManifestError, LayerError, DigestMismatchError: unusable or hostile input.
        """
        index = _read_json(layout / "index.json", "OCI index")
        if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
            raise ManifestError(f"{layout}/index.json: not an OCI image index (no manifests list)")
        descs = [d for d in index["manifests"] if isinstance(d, dict)]
        tags = [d.get("annotations", {}).get(REF_NAME) for d in descs]
        if tag is not None:
            descs = [d for d in descs if d.get("annotations", {}).get(REF_NAME) == tag]
            if not descs:
                raise ImageNotFoundError(f"no tag {tag!r} in {layout}", hint=f"tags: {', '.join(map(str, tags))}")
        elif len(descs) != 1:
            raise ImageError(f"{layout} holds {len(descs)} images: name a tag (oci:DIR:TAG)", hint=f"tags: {tags}")
        desc = descs[0]
        name = name or f"{layout.name}:{tag or 'latest'}"
        if ":" not in name.rsplit("/", 1)[-1]:
            name += ":latest"
        with self._locked():
            manifest_digest, manifest = self._load_manifest(layout, desc)
            return self._import(layout, manifest_digest, manifest, name,
                                f"oci:{layout}:{tag or ''}".rstrip(":"), progress)

    def _load_manifest(self, layout: Path, desc: dict[str, Any]) -> tuple[Digest, dict[str, Any]]:
        for _depth in range(3):
            digest = Digest.parse(str(desc.get("digest", "")))
            path = self._ingest(layout / "blobs" / digest.algorithm / digest.hex, digest)
            doc = _read_json(path, "manifest")
            if not isinstance(doc, dict):
                raise ManifestError(f"manifest {digest}: expected an object")
            media = doc.get("mediaType", desc.get("mediaType"))
            if media == MT_OCI_INDEX or "manifests" in doc:
                plats = [
                    m for m in doc.get("manifests", [])
                    if isinstance(m, dict) and m.get("platform", {}).get("architecture") == "amd64"
                    and m.get("platform", {}).get("os") == "linux"
                ]  # fmt: skip
                if not plats:
                    raise ImageError(f"image index {digest} has no linux/amd64 image")
                desc = plats[0]
                continue
            if media not in (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST, None) or doc.get("schemaVersion") != 2:
                raise ManifestError(f"manifest {digest}: unsupported media type {media!r} or schemaVersion")
            return digest, doc
        raise ManifestError("image indexes nested too deeply")

    def _import(
        self, layout: Path, mdigest: Digest, manifest: dict[str, Any], name: str, source: str, progress: Progress
    ) -> ImageRecord:
        cfg_desc = manifest.get("config")
        layers = manifest.get("layers")
        if not isinstance(cfg_desc, dict) or not isinstance(layers, list):
            raise ManifestError(f"manifest {mdigest}: missing config or layers")
        cdigest = Digest.parse(str(cfg_desc.get("digest", "")))
        config = _read_json(self._ingest(layout / "blobs" / cdigest.algorithm / cdigest.hex, cdigest), "image config")
        if not isinstance(config, dict):
            raise ManifestError(f"image config {cdigest}: expected an object")
        if config.get("architecture", "amd64") != "amd64" or config.get("os", "linux") != "linux":
            raise ImageError(f"image {name} is for {config.get('os')}/{config.get('architecture')}, not linux/amd64")
        run = config.get("config") or {}
        if not isinstance(run, dict):
            raise ManifestError(f"image config {cdigest}: config must be an object")
        layer_digests = []
        blobs = []
        for layer in layers:
            if not isinstance(layer, dict) or layer.get("mediaType") not in LAYER_TYPES:
                media = layer.get("mediaType") if isinstance(layer, dict) else layer
                raise ImageError(f"image {name}: unsupported layer type {media!r}")
            ld = Digest.parse(str(layer.get("digest", "")))
            progress(f"verifying layer {ld.hex[:12]}")
            blobs.append(self._ingest(layout / "blobs" / ld.algorithm / ld.hex, ld))
            layer_digests.append(str(ld))
        work = Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix="unpack-"))
        try:
            tree = work / "rootfs"
            tree.mkdir(mode=0o700)
            applier = LayerApplier(tree)
            for blob, ld_str in zip(blobs, layer_digests, strict=True):
                progress(f"applying layer {ld_str[7:19]}")
                with blob.open("rb") as fh:
                    applier.apply(fh, compressed_size=blob.stat().st_size)
            applier.finish()
            passwd, groups = _passwd_tables(tree)
            progress("building the erofs guest root filesystem")
            out = work / "rootfs.erofs"
            fs_uuid = str(uuidlib.UUID(hex=mdigest.hex[:32]))
            _proc.run(["mkfs.erofs", "-T0", f"-U{fs_uuid}", out, tree], timeout=3600, what="mkfs.erofs")
            rdigest = Digest.of_file(out)
            os.rename(out, self.root / "rootfs" / f"{rdigest.hex}.erofs")
            size = (self.root / "rootfs" / f"{rdigest.hex}.erofs").stat().st_size
            skipped = tuple(applier.skipped_devices)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        record = ImageRecord(
            id=str(mdigest),
            name=name,
            source=source,
            imported=time.time(),
            entrypoint=tuple(run.get("Entrypoint") or ()),
            cmd=tuple(run.get("Cmd") or ()),
            env=tuple(run.get("Env") or ()),
            working_dir=run.get("WorkingDir") or "/",
            user=run.get("User") or "",
            rootfs=str(rdigest),
            rootfs_size=size,
            layers=tuple(layer_digests),
            passwd=passwd,
            groups=groups,
            skipped_devices=skipped,
        )
        # One name points at one image: an older image of the same name keeps its ID but loses the name.
        for other in self.images():
            if other.name == name and other.id != record.id:
                write_json(self.root / "images" / f"{Digest.parse(other.id).hex}.json",
                           {**other.to_dict(), "name": f"<untagged {other.id[7:19]}>"})
        write_json(self.root / "images" / f"{mdigest.hex}.json", record.to_dict())
        return record

    def remove(self, record: ImageRecord) -> None:
        """Delete an image record and its rootfs (blobs shared with other images stay)."""
        with self._locked():
            (self.root / "images" / f"{Digest.parse(record.id).hex}.json").unlink(missing_ok=True)
            still_used = {r.rootfs for r in self.images()}
            if record.rootfs not in still_used:
                (self.root / "rootfs" / f"{Digest.parse(record.rootfs).hex}.erofs").unlink(missing_ok=True)
            used_blobs = {b for r in self.images() for b in (r.id, *r.layers)}
            for blob in (record.id, *record.layers):
                if blob not in used_blobs:
                    (self.root / "blobs" / "sha256" / Digest.parse(blob).hex).unlink(missing_ok=True)
