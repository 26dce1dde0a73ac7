"""appc ACIs (rkt's native image format): manifest parsing and import into the store.

Role: an ACI is a tar (plain, gzip, bzip2 or xz) holding ``manifest`` (the appc image manifest) and ``rootfs/``.
kvmrkt stores it decompressed, named by the SHA-512 of the plain tar (the appc image ID), maps the manifest's
app (exec, user, group, environment, working directory, ports, mount points, isolators) onto its app model and
resolves dependencies from the store. A detached ``FILE.aci.asc`` signature is kept beside the blob for the
trust policy. Trust boundary: ACIs are hostile: the manifest is parsed strictly with a size limit, rootfs
members are applied by ``kvmrkt.layers`` like any layer, and decompression is bounded.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import re
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from kvmrkt.errors import ImageError, ImageNotFoundError, ManifestError
from kvmrkt.oci import load_json
from kvmrkt.store import Gate, ImageRecord, Progress, Provenance, Store, no_progress, normalise_name, open_gate

AC_NAME = re.compile(r"^[a-z0-9]+([-._~/][a-z0-9]+)*\Z")
MAX_MANIFEST = 1 << 20


@dataclass(frozen=True, slots=True)
class Dependency:
    """An image this ACI is layered on."""

    image_name: str
    image_id: str | None
    labels: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class AciManifest:
    """The parts of an appc image manifest kvmrkt uses."""

    name: str
    labels: tuple[tuple[str, str], ...]
    exec: tuple[str, ...]
    user: str
    group: str
    working_dir: str
    env: tuple[str, ...]
    ports: tuple[tuple[str, str, int], ...]
    mount_points: tuple[tuple[str, str, bool], ...]
    isolators: tuple[tuple[str, str], ...]
    dependencies: tuple[Dependency, ...]

    @property
    def version(self) -> str:
        """The ``version`` label, or latest."""
        return dict(self.labels).get("version", "latest")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ManifestError(f"ACI manifest: {msg}")


def _named_list(value: Any, where: str, keys: set[str]) -> list[dict[str, Any]]:
    _check(value is None or isinstance(value, list), f"{where} must be a list")
    out = []
    for item in value or []:
        _check(isinstance(item, dict), f"{where} entries must be objects")
        unknown = set(item) - keys
        _check(not unknown, f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        out.append(item)
    return out


def parse_manifest(doc: dict[str, Any]) -> AciManifest:
    """Validate an appc ImageManifest.

    Raises:
        ManifestError: anything that is not a valid image manifest for linux/amd64.
    """
    _check(doc.get("acKind") == "ImageManifest", "acKind must be ImageManifest")
    _check(isinstance(doc.get("acVersion"), str), "acVersion is required")
    name = doc.get("name")
    _check(isinstance(name, str) and bool(AC_NAME.match(name)), f"invalid name {name!r}")
    label_list = _named_list(doc.get("labels"), "labels", {"name", "value"})
    labels = {str(x.get("name")): str(x.get("value")) for x in label_list}
    _check(labels.get("os", "linux") == "linux" and labels.get("arch", "amd64") == "amd64",
           f"image is for {labels.get('os')}/{labels.get('arch')}, kvmrkt runs linux/amd64")
    app = doc.get("app") or {}
    _check(isinstance(app, dict), "app must be an object")
    exec_ = app.get("exec") or []
    _check(isinstance(exec_, list) and all(isinstance(a, str) for a in exec_), "app.exec must be a list of strings")
    user, group = app.get("user", "0"), app.get("group", "0")
    _check(isinstance(user, str) and isinstance(group, str), "app.user and app.group must be strings")
    wd = app.get("workingDirectory", "/")
    _check(isinstance(wd, str), "app.workingDirectory must be a string")
    env_list = _named_list(app.get("environment"), "app.environment", {"name", "value"})
    env = [f"{e.get('name')}={e.get('value')}" for e in env_list]
    ports = []
    for p in _named_list(app.get("ports"), "app.ports", {"name", "protocol", "port", "count", "socketActivated"}):
        _check(isinstance(p.get("port"), int) and 0 < p["port"] < 65536, "app.ports[].port must be 1-65535")
        ports.append((str(p.get("name")), str(p.get("protocol", "tcp")), int(p["port"])))
    mounts = [(str(m.get("name")), str(m.get("path")), bool(m.get("readOnly", False)))
              for m in _named_list(app.get("mountPoints"), "app.mountPoints", {"name", "path", "readOnly"})]
    isolators = [(str(i.get("name")), json.dumps(i.get("value"), sort_keys=True))
                 for i in _named_list(app.get("isolators"), "app.isolators", {"name", "value"})]
    deps = []
    for d in _named_list(doc.get("dependencies"), "dependencies", {"imageName", "imageID", "labels", "size"}):
        _check(isinstance(d.get("imageName"), str), "dependencies[].imageName is required")
        dlabels = _named_list(d.get("labels"), "dependencies[].labels", {"name", "value"})
        deps.append(Dependency(d["imageName"], d.get("imageID"),
                               tuple(sorted((str(x["name"]), str(x["value"])) for x in dlabels))))
    return AciManifest(
        name=name, labels=tuple(sorted(labels.items())), exec=tuple(exec_), user=user, group=group,  # type: ignore[arg-type]
        working_dir=wd, env=tuple(env), ports=tuple(ports), mount_points=tuple(mounts),
        isolators=tuple(isolators), dependencies=tuple(deps),
    )


def _decompressed(fh: IO[bytes]) -> IO[bytes] | io.BufferedIOBase:
    magic = fh.read(6)
    fh.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=fh, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(fh, mode="rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMAFile(fh, mode="rb")
    return fh


def read_manifest(store: Store, digest: Any) -> AciManifest:
    """The manifest inside a stored ACI blob."""
    with store.open_blob(digest) as reader:
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                for member in tar:
                    if member.name.lstrip("./") == "manifest" and member.isreg():
                        if member.size > MAX_MANIFEST:
                            raise ManifestError(f"ACI manifest is larger than {MAX_MANIFEST} bytes")
                        fh = tar.extractfile(member)
                        assert fh is not None
                        return parse_manifest(load_json(fh.read(), "ACI manifest"))
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise ImageError(f"the ACI is not a valid tar archive: {exc}") from exc
    raise ManifestError("the ACI has no manifest")


def import_aci(store: Store, path: Path, *, name: str | None, progress: Progress = no_progress,
               gate: Gate = open_gate) -> ImageRecord:
    """Import ``FILE.aci``, judged with its detached signature ``FILE.aci.asc`` (rkt's rule: the signature
    covers the ACI file's bytes, which are kept so the signature can be checked again at every run).

    Raises:
        ImageError, ManifestError: unreadable or invalid ACI; ImageNotFoundError: a dependency is not in the
        store (import it first).
    """
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror}") from exc
    with fh:
        original = store.put_blob(fh, what=f"ACI {path.name}", progress=progress)
    signature = Path(f"{path}.asc")
    files = {"detached.asc": signature.read_bytes()[: 1 << 20]} if signature.is_file() else {}
    try:
        with store.open_blob(original) as raw:
            head = raw.read(6)
        with store.blob_path(original).open("rb") as fh2:
            if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head == b"\xfd7zXZ\x00":
                digest = store.put_blob(_decompressed(fh2), algorithm="sha512", what=f"ACI {path.name}",
                                        max_bytes=store.limits.max_total_bytes)
            else:
                digest = store.put_blob(fh2, algorithm="sha512", what=f"ACI {path.name}")
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise ImageError(f"cannot decompress {path}: {exc}") from exc
    manifest = read_manifest(store, digest)
    identity = normalise_name(name or f"{manifest.name}:{manifest.version}")
    gate(Provenance("appc", identity), original, files)
    store.save_signatures(original, files)
    deps = []
    for dep in manifest.dependencies:
        try:
            if dep.image_id:
                found = store.resolve(dep.image_id)
            else:
                found = store.resolve(f"{dep.image_name}:{dict(dep.labels).get('version', 'latest')}")
        except ImageNotFoundError as exc:
            raise ImageNotFoundError(
                f"{path.name} depends on {dep.image_name} ({dep.image_id or dict(dep.labels)}), "
                "which is not in the store",
                hint="import the dependency first",
            ) from exc
        deps.append(found.id)
    record = ImageRecord(
        id=str(digest), name=identity, source=str(path.resolve()), kind="aci",
        imported=time.time(), layers=(str(digest),), rootfs="", rootfs_size=0, entrypoint=manifest.exec,
        env=manifest.env, working_dir=manifest.working_dir, user=manifest.user, group=manifest.group,
        ports=manifest.ports, mount_points=manifest.mount_points, isolators=manifest.isolators,
        labels=manifest.labels, dependencies=tuple(deps), transport="appc", identity=identity,
        signed_digest=str(original),
    )  # fmt: skip
    return store.add_image(record, progress=progress)
