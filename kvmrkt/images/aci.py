"""appc ACIs (rkt's native image format): manifest parsing and import into the store.

Role: an ACI is a tar (plain, gzip, bzip2 or xz) holding ``manifest`` (the appc image manifest) and ``rootfs/``.
kvmrkt stores it decompressed, named by the SHA-512 of the plain tar (the appc image ID), maps the manifest's
app (exec, user, group, environment, working directory, ports, mount points, isolators) onto its app model and
resolves dependencies from the store. A detached ``FILE.aci.asc`` signature is kept beside the blob for the
trust policy. Trust boundary: ACIs are hostile: the file is judged by the trust policy before any of it is
decompressed, the manifest is parsed strictly with a size limit, decompression is bounded by the image limits
(ratio and bytes), and rootfs members are applied by ``kvmrkt.images.layers`` like any layer.
"""

from __future__ import annotations

import contextlib
import io
import json
import lzma
import re
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmrkt.errors import ImageError, ImageNotFoundError, ManifestError
from kvmrkt.images.decompress import Cursor, open_stream
from kvmrkt.images.layers import LayerLimits
from kvmrkt.images.oci import load_json
from kvmrkt.images.records import Gate, ImageRecord, Progress, Provenance, no_progress, normalise_name
from kvmrkt.images.store import Store
from kvmrkt.trust import sigfiles

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


@contextlib.contextmanager
def _plain(path: Path, limits: LayerLimits) -> Iterator[io.RawIOBase]:
    """The tar inside an ACI file, decompressed within the image limits (ratio and bytes)."""
    cursor = Cursor()
    cursor.where = f"ACI {path.name}"
    with path.open("rb") as fh, open_stream(fh, max_ratio=limits.max_ratio, cursor=cursor,
                                             max_bytes=limits.max_total_bytes) as (stream, _raw):
        yield stream


def _scan_manifest(path: Path, limits: LayerLimits) -> AciManifest:
    """The manifest of an ACI file, found by streaming its tar: decompressed within the image limits, nothing
    written, no member but ``manifest`` read (actool writes it last, after ``rootfs/``)."""
    try:
        with _plain(path, limits) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for _ in range(limits.max_entries):
                member = tar.next()
                if member is None:
                    raise ManifestError("the ACI has no manifest")
                tar.members.clear()  # type: ignore[attr-defined]  # else stream mode keeps every TarInfo
                if member.name.lstrip("./") == "manifest" and member.isreg():
                    if member.size > MAX_MANIFEST:
                        raise ManifestError(f"ACI manifest is larger than {MAX_MANIFEST} bytes")
                    fh2 = tar.extractfile(member)
                    assert fh2 is not None
                    return parse_manifest(load_json(fh2.read(), "ACI manifest"))
            raise ImageError(f"the ACI has more than {limits.max_entries} entries before its manifest")
    except tarfile.TarError as exc:
        raise ImageError(f"the ACI is not a valid tar archive: {exc}") from exc
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        raise ImageError(f"cannot decompress {path}: {exc}") from exc


def _dependencies(store: Store, path: Path, manifest: AciManifest) -> tuple[str, ...]:
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
    return tuple(deps)


def import_aci(store: Store, path: Path, *, name: str | None, progress: Progress = no_progress,
               gate: Gate) -> ImageRecord:
    """Import ``FILE.aci``, judged with its detached signature ``FILE.aci.asc`` (rkt's rule: the signature
    covers the ACI file's bytes, which are kept so the signature can be checked again at every run).

    The file is copied as it is into the store's work area and judged there before any of it is decompressed:
    under ``name`` when one is given, else against every appc scope (the name is inside the compressed tar).
    Only then is the manifest read (bounded, nothing written) and the image judged under the name it gives.
    A refused or invalid ACI leaves nothing in the store.

    Raises:
        ImageError, ManifestError: unreadable or invalid ACI; ImageNotFoundError: a dependency is not in the
        store (import it first); PolicyDeniedError: the gate refused it.
    """
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {exc.strerror}") from exc
    signature = Path(f"{path}.asc")
    files = {sigfiles.DETACHED: signature.read_bytes()[: 1 << 20]} if signature.is_file() else {}
    named = normalise_name(name) if name else None
    with fh, store.staged_blob(fh, what=f"ACI {path.name}", progress=progress) as original:
        gate(Provenance("appc", named or path.name, content=original.path, named=bool(named)), original.digest,
             files)
        manifest = _scan_manifest(original.path, store.limits)
        identity = named or normalise_name(f"{manifest.name}:{manifest.version}")
        if not named:
            gate(Provenance("appc", identity, content=original.path), original.digest, files)
        deps = _dependencies(store, path, manifest)
        try:
            with _plain(original.path, store.limits) as plain, store.staged_blob(
                    plain, algorithm="sha512", what=f"ACI {path.name}", max_bytes=store.limits.max_total_bytes) as tar:
                store.commit(original)
                digest = store.commit(tar)
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
            raise ImageError(f"cannot decompress {path}: {exc}") from exc
    record = ImageRecord(
        id=str(digest), name=identity, source=str(path.resolve()), kind="aci",
        imported=time.time(), layers=(str(digest),), rootfs="", rootfs_size=0, entrypoint=manifest.exec,
        env=manifest.env, working_dir=manifest.working_dir, user=manifest.user, group=manifest.group,
        ports=manifest.ports, mount_points=manifest.mount_points, isolators=manifest.isolators,
        labels=manifest.labels, dependencies=deps, transport="appc", identity=identity,
        signed_digest=str(original.digest),
    )  # fmt: skip
    with store.discarded_on_refusal([original.digest, digest]):
        store.save_signatures(original.digest, files)
        return store.add_image(record, progress=progress)
