"""Pure parsing of OCI (and Docker v2) image documents: indexes, manifests, configs, references.

Role: turn untrusted JSON bytes into small frozen values, strictly: wrong types, unknown schema versions,
unsupported media types and bad digests are ``ManifestError``/``ImageError`` naming the document. No I/O.
Trust boundary: every byte here comes from an image author or a registry; sizes are bounded by the caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kvmrkt import jsondoc
from kvmrkt.digest import Digest
from kvmrkt.errors import ConfigError, ImageError, ManifestError

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
LAYER_TYPES = frozenset({
    MT_OCI_LAYER,
    MT_OCI_LAYER_GZIP,
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
})
REF_NAME = "org.opencontainers.image.ref.name"
MAX_DOCUMENT = 4 << 20


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A content descriptor: what a digest points at."""

    media_type: str
    digest: Digest
    size: int
    annotations: tuple[tuple[str, str], ...] = ()
    platform: tuple[str, str] | None = None

    def annotation(self, key: str) -> str | None:
        """An annotation value or None."""
        return dict(self.annotations).get(key)


@dataclass(frozen=True, slots=True)
class Manifest:
    """An image manifest: its config and its ordered layers."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True)
class RunConfig:
    """The parts of an image config that decide how the image runs."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()


def load_json(data: bytes, what: str) -> dict[str, Any]:
    """Parse a JSON object, rejecting oversized documents and duplicate keys.

    Raises:
        ManifestError: not a JSON object, too large, or a key appears twice.
    """
    if len(data) > MAX_DOCUMENT:
        raise ManifestError(f"{what} is larger than {MAX_DOCUMENT} bytes")

    def no_dups(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise ManifestError(f"{what}: duplicate key(s) {', '.join(sorted(dup))}")
        return dict(pairs)

    try:
        doc = jsondoc.loads(data, object_pairs_hook=no_dups)
    except ValueError as exc:
        raise ManifestError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ManifestError(f"{what}: expected a JSON object")
    return doc


def _strs(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{where}: expected a list of strings")
    return tuple(value)


def parse_descriptor(d: Any, where: str) -> Descriptor:
    """Parse one descriptor object."""
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: descriptor must be an object")
    media = d.get("mediaType", "")
    size = d.get("size", -1)
    if not isinstance(media, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{where}: descriptor needs a mediaType string and a non-negative size")
    ann = d.get("annotations") or {}
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise ManifestError(f"{where}: annotations must map strings to strings")
    plat = d.get("platform")
    platform = None
    if isinstance(plat, dict):
        platform = (str(plat.get("os", "")), str(plat.get("architecture", "")))
    return Descriptor(media, Digest.parse(str(d.get("digest", ""))), size, tuple(sorted(ann.items())), platform)


def is_index(doc: dict[str, Any]) -> bool:
    """True for an OCI image index or a Docker manifest list."""
    return doc.get("mediaType") in INDEX_TYPES or ("manifests" in doc and "layers" not in doc)


def parse_index(doc: dict[str, Any], what: str) -> tuple[Descriptor, ...]:
    """The manifests of an index."""
    if doc.get("schemaVersion") != 2 or not isinstance(doc.get("manifests"), list):
        raise ManifestError(f"{what}: not an image index (schemaVersion 2 with a manifests list)")
    return tuple(parse_descriptor(m, f"{what}.manifests[{i}]") for i, m in enumerate(doc["manifests"]))


def select_platform(manifests: tuple[Descriptor, ...], what: str) -> Descriptor:
    """The linux/amd64 entry of an index (entries without a platform are taken as a single image).

    Raises:
        ImageError: no linux/amd64 image.
    """
    for m in manifests:
        if m.platform == ("linux", "amd64"):
            return m
    plain = [m for m in manifests if m.platform is None and m.media_type in MANIFEST_TYPES]
    if len(plain) == 1:
        return plain[0]
    found = ", ".join(f"{p[0]}/{p[1]}" for p in (m.platform for m in manifests) if p) or "none"
    raise ImageError(f"{what} has no linux/amd64 image (platforms: {found})")


def parse_manifest(doc: dict[str, Any], what: str) -> Manifest:
    """Parse an image manifest strictly.

    Raises:
        ManifestError: wrong schema; ImageError: a layer type kvmrkt cannot apply.
    """
    media = doc.get("mediaType", MT_OCI_MANIFEST)
    if doc.get("schemaVersion") != 2 or media not in MANIFEST_TYPES:
        raise ManifestError(f"{what}: unsupported manifest (mediaType {media!r}, schemaVersion "
                            f"{doc.get('schemaVersion')!r})")
    if not isinstance(doc.get("layers"), list):
        raise ManifestError(f"{what}: layers must be a list")
    config = parse_descriptor(doc.get("config"), f"{what}.config")
    layers = tuple(parse_descriptor(m, f"{what}.layers[{i}]") for i, m in enumerate(doc["layers"]))
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            raise ImageError(f"{what}: unsupported layer media type {layer.media_type!r}",
                             hint="kvmrkt applies tar and tar+gzip layers")
    return Manifest(media, config, layers)


def parse_config(doc: dict[str, Any], what: str) -> RunConfig:
    """The run settings of an image config; refuses images not built for linux/amd64."""
    arch, os_ = doc.get("architecture", "amd64"), doc.get("os", "linux")
    if (os_, arch) != ("linux", "amd64"):
        raise ImageError(f"{what} is for {os_}/{arch}; kvmrkt runs linux/amd64 images")
    cfg = doc.get("config") or {}
    if not isinstance(cfg, dict):
        raise ManifestError(f"{what}: config must be an object")
    labels = cfg.get("Labels") or {}
    ports = cfg.get("ExposedPorts") or {}
    for key in ("WorkingDir", "User"):
        if not isinstance(cfg.get(key) or "", str):
            raise ManifestError(f"{what}: config.{key} must be a string")
    if not isinstance(labels, dict) or not isinstance(ports, dict):
        raise ManifestError(f"{what}: config.Labels and config.ExposedPorts must be objects")
    return RunConfig(
        entrypoint=_strs(cfg.get("Entrypoint"), f"{what}.Entrypoint"),
        cmd=_strs(cfg.get("Cmd"), f"{what}.Cmd"),
        env=_strs(cfg.get("Env"), f"{what}.Env"),
        working_dir=cfg.get("WorkingDir") or "",
        user=cfg.get("User") or "",
        exposed_ports=tuple(sorted(str(p) for p in ports)),
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
    )


_REPO_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*\Z")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")


@dataclass(frozen=True, slots=True)
class RegistryRef:
    """``HOST[:PORT]/REPO[:TAG|@DIGEST]`` as used by ``docker://`` references."""

    host: str
    repo: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return str(self.digest) if self.digest else (self.tag or "latest")

    @property
    def name(self) -> str:
        """The image name kvmrkt stores it under."""
        base = f"{self.host}/{self.repo}"
        return f"{base}@{self.digest}" if self.digest else f"{base}:{self.tag or 'latest'}"

    def __str__(self) -> str:
        return self.name


def parse_registry_ref(text: str) -> RegistryRef:
    """Parse ``HOST[:PORT]/REPO[:TAG|@sha256:...]``; a reference without a host means docker.io.

    Raises:
        ConfigError: a malformed reference.
    """
    rest, digest = text, None
    if "@" in rest:
        rest, _, dig = rest.partition("@")
        digest = Digest.parse(dig)
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        host, path = first, remainder
    else:
        host, path = "docker.io", rest if "/" in rest else f"library/{rest}"
    tag = None
    if ":" in path.rsplit("/", 1)[-1]:
        path, _, tag = path.rpartition(":")
        if not _TAG_RE.match(tag):
            raise ConfigError(f"invalid tag {tag!r} in {text!r}")
    if not _REPO_RE.match(path):
        raise ConfigError(f"invalid repository name {path!r} in {text!r}")
    return RegistryRef(host, path, tag, digest)
