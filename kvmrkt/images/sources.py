"""Image sources: where images come from and how each format becomes a store image.

Role: parse an image reference (``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]``, ``docker-archive:FILE[:TAG]``,
``FILE.aci``, ``docker://`` / ``oci://`` registry references) and import it through the store: every blob is
copied in by ``Store.put_blob`` (hashed, size-bounded), then ``Store.add_image`` builds the guest rootfs.
Trust boundary: all input here is hostile (archives, layouts, registry responses, ACI manifests); documents
are parsed by ``kvmrkt.images.oci``/``kvmrkt.images.aci`` with size limits, archive members are only ever looked
up by the exact names the format defines, never extracted by the names they carry.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from kvmrkt import jsondoc
from kvmrkt.digest import Digest
from kvmrkt.errors import ConfigError, ImageError, ImageNotFoundError, ManifestError
from kvmrkt.images import aci as aci_format
from kvmrkt.images import oci
from kvmrkt.images.records import (
    UNSAFE_ACCEPT_ANYTHING,
    Gate,
    ImageRecord,
    Progress,
    Provenance,
    no_progress,
    normalise_name,
)
from kvmrkt.images.store import Store
from kvmrkt.trust import sigfiles

BlobOpener = Callable[[oci.Descriptor], contextlib.AbstractContextManager[IO[bytes]]]
Collector = Callable[[Digest], dict[str, bytes]]
"""Finds the signatures of a signed digest, as files for ``Store.save_signatures``."""


def no_signatures(_digest: Digest) -> dict[str, bytes]:
    """A collector for sources that carry no signatures."""
    return {}


def local_signatures(path: Path) -> Collector:
    """Signatures stored next to a local source, in ``SOURCE.signatures/``: ``signature-N`` files
    (simple signing, as written by ``skopeo standalone-sign``) and ``cosign-N.payload`` + ``cosign-N.sig``
    (base64 DER), all for the image's manifest digest."""

    def collect(_digest: Digest) -> dict[str, bytes]:
        sigdir = Path(f"{path}.signatures")
        files: dict[str, bytes] = {}
        if not sigdir.is_dir():
            return files
        for f in sorted(sigdir.iterdir()):
            if f.name.startswith(sigfiles.SOURCE_PREFIX) and f.is_file():
                files[sigfiles.simple_name(f.name.removeprefix(sigfiles.SOURCE_PREFIX))] = f.read_bytes()[: 1 << 20]
            elif sigfiles.is_cosign_signature(f.name) and f.is_file():
                payload = f.with_name(sigfiles.cosign_payload_of(f.name))
                try:
                    files[f.name] = base64.b64decode(f.read_bytes(), validate=True)
                except ValueError as exc:
                    raise ImageError(f"{f}: not base64") from exc
                files[payload.name] = payload.read_bytes()[: 1 << 20] if payload.is_file() else b""
        return files

    return collect
SCHEMES = ("oci:", "oci-archive:", "docker-archive:", "docker://", "oci://")


def is_remote(ref: str) -> bool:
    """True for registry references."""
    return ref.startswith(("docker://", "oci://"))


def is_source(ref: str) -> bool:
    """True when ``ref`` names something to import rather than an image already in the store."""
    return ref.startswith(SCHEMES) or ref.endswith(".aci")


def split_path_tag(rest: str) -> tuple[Path, str | None]:
    """``PATH[:TAG]`` -> (path, tag); a path that exists as given wins over a tag split."""
    path = Path(rest)
    if path.exists() or ":" not in rest:
        return path, None
    head, _, tag = rest.rpartition(":")
    return Path(head), tag


def _document(store: Store, opener: BlobOpener, desc: oci.Descriptor, what: str) -> bytes:
    if not store.has_blob(desc.digest):
        if desc.size > oci.MAX_DOCUMENT:
            raise ManifestError(f"{what} {desc.digest} claims {desc.size} bytes, more than {oci.MAX_DOCUMENT}")
        with opener(desc) as src:
            store.put_blob(src, desc.digest, size=desc.size if desc.size else None, max_bytes=oci.MAX_DOCUMENT,
                           what=f"{what} {desc.digest.hex[:12]}")
    return store.read_blob(desc.digest, max_bytes=oci.MAX_DOCUMENT)


def import_oci(
    store: Store, opener: BlobOpener, desc: oci.Descriptor, *, name: str, source: str, progress: Progress,
    transport: str, gate: Gate, collect: Collector = no_signatures,
) -> ImageRecord:
    """Import the image a descriptor points at (an index, resolved to linux/amd64, or a manifest).

    The gate sees the top-level digest and its signatures before any document is parsed or blob fetched.
    An image whose layers are refused while its rootfs is built leaves none of its files behind (a transfer
    that fails keeps its complete blobs, for a rerun).
    """
    signed = desc.digest
    identity = normalise_name(name)
    files = collect(signed)
    gate(Provenance(transport, identity), signed, files)
    store.save_signatures(signed, files)
    documents = [signed]
    for _depth in range(4):
        doc = oci.load_json(_document(store, opener, desc, "manifest"), f"manifest {desc.digest}")
        if oci.is_index(doc):
            desc = oci.select_platform(oci.parse_index(doc, f"index {desc.digest}"), f"index {desc.digest}")
            documents.append(desc.digest)
            continue
        manifest = oci.parse_manifest(doc, f"manifest {desc.digest}")
        break
    else:
        raise ManifestError("image indexes nested too deeply")
    config_doc = oci.load_json(_document(store, opener, manifest.config, "config"), f"config {manifest.config.digest}")
    run = oci.parse_config(config_doc, f"image config {manifest.config.digest}")
    for i, layer in enumerate(manifest.layers, 1):
        if store.has_blob(layer.digest):
            progress(f"layer {i}/{len(manifest.layers)} {layer.digest.hex[:12]} (already in the store)", 0, None)
            continue
        with opener(layer) as src:
            store.put_blob(src, layer.digest, size=layer.size, what=f"layer {i}/{len(manifest.layers)} "
                           f"{layer.digest.hex[:12]}", progress=progress)
    record = ImageRecord(
        id=str(desc.digest), name=normalise_name(name), source=source, kind="oci", imported=time.time(),
        layers=tuple(str(layer.digest) for layer in manifest.layers), rootfs="", rootfs_size=0,
        entrypoint=run.entrypoint, cmd=run.cmd, env=run.env, working_dir=run.working_dir, user=run.user,
        ports=tuple((p, p.partition("/")[2] or "tcp", int(p.partition("/")[0])) for p in run.exposed_ports
                    if p.partition("/")[0].isdigit()),
        labels=run.labels, config_digest=str(manifest.config.digest), transport=transport, identity=identity,
        signed_digest=str(signed),
    )  # fmt: skip
    with store.discarded_on_refusal([*documents, manifest.config.digest, *(layer.digest for layer in manifest.layers)]):
        return store.add_image(record, progress=progress)


def _pick(descs: tuple[oci.Descriptor, ...], tag: str | None, where: str) -> oci.Descriptor:
    if tag is not None:
        found = [d for d in descs if d.annotation(oci.REF_NAME) == tag]
        if not found:
            tags = ", ".join(str(d.annotation(oci.REF_NAME)) for d in descs)
            raise ImageNotFoundError(f"no tag {tag!r} in {where}", hint=f"tags: {tags or 'none'}")
        return found[0]
    if len(descs) != 1:
        tags = ", ".join(str(d.annotation(oci.REF_NAME)) for d in descs)
        raise ImageError(f"{where} holds {len(descs)} images: name one with :TAG", hint=f"tags: {tags}")
    return descs[0]


def import_layout(store: Store, path: Path, tag: str | None, *, name: str | None, progress: Progress,
                  gate: Gate) -> ImageRecord:
    """``oci:DIR[:TAG]``: an OCI image layout directory (umoci, skopeo, buildah)."""
    if not (path / "index.json").is_file():
        raise ImageError(f"{path} is not an OCI image layout (no index.json)")
    index = oci.load_json((path / "index.json").read_bytes()[: oci.MAX_DOCUMENT + 1], f"{path}/index.json")
    desc = _pick(oci.parse_index(index, f"{path}/index.json"), tag, str(path))

    @contextlib.contextmanager
    def opener(d: oci.Descriptor) -> Iterator[IO[bytes]]:
        blob = path / "blobs" / d.digest.algorithm / d.digest.hex
        try:
            fh = blob.open("rb")
        except FileNotFoundError as exc:
            raise ImageError(f"blob {d.digest} is missing from {path}") from exc
        with fh:
            yield fh

    return import_oci(store, opener, desc, name=name or f"{path.resolve().name}:{tag or 'latest'}",
                      source=f"oci:{path.resolve()}" + (f":{tag}" if tag else ""), progress=progress,
                      transport="oci", gate=gate, collect=local_signatures(path))


@contextlib.contextmanager
def _member(tar: tarfile.TarFile, name: str, where: str) -> Iterator[IO[bytes]]:
    try:
        info = tar.getmember(name)
    except KeyError as exc:
        raise ImageError(f"{where} has no member {name!r}") from exc
    if not info.isreg():
        raise ImageError(f"{where}: {name!r} is not a regular file")
    fh = tar.extractfile(info)
    assert fh is not None
    with fh:
        yield fh


def _open_archive(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:*")
    except (OSError, tarfile.TarError) as exc:
        raise ImageError(f"cannot read archive {path}: {exc}") from exc


def import_oci_archive(store: Store, path: Path, tag: str | None, *, name: str | None,
                       progress: Progress, gate: Gate) -> ImageRecord:
    """``oci-archive:FILE[:TAG]``: a tar of an OCI image layout."""
    with _open_archive(path) as tar:
        with _member(tar, "index.json", str(path)) as fh:
            index = oci.load_json(fh.read(oci.MAX_DOCUMENT + 1), f"{path}:index.json")
        desc = _pick(oci.parse_index(index, f"{path}:index.json"), tag, str(path))

        def opener(d: oci.Descriptor) -> contextlib.AbstractContextManager[IO[bytes]]:
            return _member(tar, f"blobs/{d.digest.algorithm}/{d.digest.hex}", str(path))

        return import_oci(store, opener, desc, name=name or f"{path.stem}:{tag or 'latest'}",
                          source=f"oci-archive:{path.resolve()}" + (f":{tag}" if tag else ""), progress=progress,
                          transport="oci-archive", gate=gate, collect=local_signatures(path))


def import_docker_archive(store: Store, path: Path, tag: str | None, *, name: str | None,
                          progress: Progress, gate: Gate) -> ImageRecord:
    """``docker-archive:FILE[:TAG]``: ``docker save`` format (manifest.json + config + layer tars).

    The archive names no manifest digest, so kvmrkt writes an OCI manifest for it (config and layers named by
    the digests of their bytes, checked against the config's ``rootfs.diff_ids``); that manifest's digest is
    the image ID, the same for the same archive content.
    """
    with _open_archive(path) as tar:
        names = set(tar.getnames())
        if "index.json" in names and "manifest.json" not in names:
            return import_oci_archive(store, path, tag, name=name, progress=progress, gate=gate)
        with _member(tar, "manifest.json", str(path)) as fh:
            try:
                entries = jsondoc.loads(fh.read(oci.MAX_DOCUMENT + 1))
            except ValueError as exc:
                raise ManifestError(f"{path}:manifest.json is not valid JSON: {exc}") from exc
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ManifestError(f"{path}:manifest.json must be a list of objects")
        if tag is not None:
            entries = [
                e for e in entries if any(str(t).endswith(f":{tag}") or t == tag for t in e.get("RepoTags") or [])
            ]
        if len(entries) != 1:
            raise ImageError(f"{path} holds {len(entries)} matching images: name one with :TAG")
        entry = entries[0]
        if not isinstance(entry.get("Config"), str) or not isinstance(entry.get("Layers"), list):
            raise ManifestError(f"{path}:manifest.json entry needs Config and Layers")
        members = [str(entry["Config"]), *(str(m) for m in entry["Layers"])]
        hashed = [_hash_member(tar, m, str(path)) for m in members]  # nothing stored, parsed or decompressed
        by_digest = dict(zip((d for d, _s, _c in hashed), members, strict=True))
        config_digest, config_size, _ = hashed[0]
        layers = [{"mediaType": oci.MT_OCI_LAYER, "digest": str(d), "size": n} for d, n, _c in hashed[1:]]
        manifest = {
            "schemaVersion": 2, "mediaType": oci.MT_OCI_MANIFEST,
            "config": {"mediaType": oci.MT_OCI_CONFIG, "digest": str(config_digest), "size": config_size},
            "layers": layers,
        }  # fmt: skip
        data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        mdigest = Digest.of_bytes(data)
        repo_tags = [str(t) for t in entry.get("RepoTags") or []]
        identity = name or (repo_tags[0] if repo_tags else f"{path.stem}:{tag or 'latest'}")
        # The archive names no manifest digest, so nothing in it can have been signed: a policy can only
        # accept (insecureAcceptAnything) or reject docker-archive images. Judged before anything is stored.
        gate(Provenance("docker-archive", normalise_name(identity)), mdigest, {})
        if config_size > oci.MAX_DOCUMENT:
            raise ManifestError(f"{path}:{entry['Config']} is larger than {oci.MAX_DOCUMENT} bytes")
        with _member(tar, str(entry["Config"]), str(path)) as fh:
            config_doc = oci.load_json(fh.read(oci.MAX_DOCUMENT + 1), f"{path}:{entry['Config']}")
        oci.parse_config(config_doc, f"{path}:{entry['Config']}")
        diff_ids = (config_doc.get("rootfs") or {}).get("diff_ids") or []
        for i, (digest, _n, compressed) in enumerate(hashed[1:]):
            if not compressed and i < len(diff_ids) and diff_ids[i] != str(digest):
                raise ImageError(f"{path}: layer {members[i + 1]} does not match diff_id {diff_ids[i]} of the "
                                 "image config")
        desc = oci.Descriptor(oci.MT_OCI_MANIFEST, mdigest, len(data))

        @contextlib.contextmanager
        def opener(d: oci.Descriptor) -> Iterator[IO[bytes]]:
            if d.digest == mdigest:
                yield io.BytesIO(data)
            elif d.digest in by_digest:
                with _member(tar, by_digest[d.digest], str(path)) as fh:
                    yield fh
            else:
                raise ImageError(f"unexpected blob {d.digest} requested from {path}")

        # Judged above: the gate saw this manifest's digest (the one import_oci checks its bytes against).
        return import_oci(store, opener, desc, name=identity,
                          source=f"docker-archive:{path.resolve()}" + (f":{tag}" if tag else ""), progress=progress,
                          transport="docker-archive", gate=UNSAFE_ACCEPT_ANYTHING)


def _hash_member(tar: tarfile.TarFile, name: str, where: str) -> tuple[Digest, int, bool]:
    """sha256, size and whether it starts like gzip, of an archive member (read, not kept)."""
    h, size, head = hashlib.sha256(), 0, b""
    with _member(tar, name, where) as fh:
        while chunk := fh.read(1 << 20):
            head = head or chunk[:2]
            h.update(chunk)
            size += len(chunk)
    return Digest("sha256", h.hexdigest()), size, head == b"\x1f\x8b"


def import_local(store: Store, ref: str, *, name: str | None, progress: Progress = no_progress,
                 gate: Gate) -> ImageRecord:
    """Import a local source (layout, archive, ACI).

    Raises:
        ConfigError: an unknown reference form; ImageError and subclasses for bad images.
    """
    if ref.startswith("oci:"):
        path, tag = split_path_tag(ref[4:])
        return import_layout(store, path, tag, name=name, progress=progress, gate=gate)
    if ref.startswith("oci-archive:"):
        path, tag = split_path_tag(ref[len("oci-archive:"):])
        return import_oci_archive(store, path, tag, name=name, progress=progress, gate=gate)
    if ref.startswith("docker-archive:"):
        path, tag = split_path_tag(ref[len("docker-archive:"):])
        return import_docker_archive(store, path, tag, name=name, progress=progress, gate=gate)
    if ref.endswith(".aci"):
        return aci_format.import_aci(store, Path(ref), name=name, progress=progress, gate=gate)
    raise ConfigError(
        f"cannot import {ref!r}",
        hint="use oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:TAG], FILE.aci or docker://HOST/REPO:TAG",
    )
