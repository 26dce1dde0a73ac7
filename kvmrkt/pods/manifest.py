"""Pod and app manifests: the frozen description of what a pod runs.

Role: the data model shared by stage0 and stage1 (``AppSpec``, ``Volume``, ``PodManifest``), with strict
``from_dict`` (unknown or missing fields are errors) and canonical JSON for hashing and for the ``pod`` file
in each pod directory. Trust boundary: ``--pod-manifest`` files are user input and are validated here; names
that end up as file or device names are restricted to a safe character set.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from kvmrkt.errors import ManifestError
from kvmrkt.pods.confinement import DEFAULT as DEFAULT_CONFINEMENT
from kvmrkt.pods.confinement import Confinement

POD_MANIFEST_KIND = "kvmrkt.pod/v1"
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
# A DNS name (RFC 1123 labels, optional final dot): host names, /etc/hosts entries, search domains.
DNS_NAME_RE = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
                         r"(\.[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*\.?\Z")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*\Z")


def check_name(kind: str, name: str) -> str:
    """Validate an app or volume name (lowercase letters, digits, inner dashes; 1-63 characters).

    Raises:
        ManifestError: the name is not allowed.
    """
    if not _NAME_RE.match(name):
        raise ManifestError(
            f"invalid {kind} name {name[:80]!r}",
            hint="use 1-63 lowercase letters, digits and inner dashes (like a DNS label)",
        )
    return name


def check_env(pairs: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Validate environment keys; later duplicates win (like a shell), order kept by first appearance."""
    out: dict[str, str] = {}
    for key, value in pairs:
        if not _ENV_KEY_RE.match(key):
            raise ManifestError(f"invalid environment variable name {key[:80]!r}")
        if "\0" in value:
            raise ManifestError(f"environment variable {key} contains a NUL byte")
        out[key] = value
    return tuple(out.items())


def _take(d: dict[str, Any], where: str, required: set[str], optional: set[str]) -> None:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected an object")
    unknown = set(d) - required - optional
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    missing = required - set(d)
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(sorted(missing))}")


def _str(d: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = d.get(key, default)
    if not isinstance(value, str):
        raise ManifestError(f"{where}.{key}: expected a string")
    return value


def _strlist(d: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = d.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{where}.{key}: expected a list of strings")
    return tuple(value)


def _int(d: dict[str, Any], key: str, where: str, *, optional: bool = False) -> int | None:
    value = d.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ManifestError(f"{where}.{key}: expected a non-negative integer")
    return value


@dataclass(frozen=True, slots=True)
class MountPoint:
    """A volume mounted into an app at ``target``."""

    volume: str
    target: str


@dataclass(frozen=True, slots=True)
class Volume:
    """A pod volume: ``host`` (a host directory shared into the VM), ``empty`` (guest memory), ``bind``/``rbind``
    (a host file or directory bound into the pod's shared export, ``rbind`` with the mounts under it: kvmrkt-oci's
    bind mounts)."""

    name: str
    kind: str
    source: str | None = None
    read_only: bool = False

    def __post_init__(self) -> None:
        check_name("volume", self.name)
        if self.kind not in ("host", "empty", "bind", "rbind"):
            raise ManifestError(f"volume {self.name}: kind must be host, empty, bind or rbind, not {self.kind!r}")
        if self.kind != "empty" and not (self.source and self.source.startswith("/")):
            raise ManifestError(f"volume {self.name}: kind={self.kind} needs an absolute source=PATH")


@dataclass(frozen=True, slots=True)
class AppSpec:
    """One app (stage2) of a pod, fully resolved: numeric credentials and the image it runs."""

    name: str
    image_id: str
    image_name: str
    rootfs_digest: str
    exec: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    working_dir: str = "/"
    user: str = "0"
    group: str = "0"
    uid: int = 0
    gid: int = 0
    supplementary_gids: tuple[int, ...] = ()
    memory_mib: int | None = None
    cpus: int | None = None
    mounts: tuple[MountPoint, ...] = ()
    confinement: Confinement = DEFAULT_CONFINEMENT

    def __post_init__(self) -> None:
        check_name("app", self.name)
        if not self.exec:
            raise ManifestError(
                f"app {self.name}: nothing to execute",
                hint="the image has no entrypoint or cmd: give one with --exec",
            )
        if not self.working_dir.startswith("/"):
            raise ManifestError(f"app {self.name}: working directory must be absolute")
        for m in self.mounts:
            if not m.target.startswith("/") or ".." in m.target.split("/"):
                raise ManifestError(f"app {self.name}: mount target {m.target!r} must be absolute, without '..'")


@dataclass(frozen=True, slots=True)
class PodManifest:
    """What a pod runs; written as the ``pod`` file of the pod directory and shown by ``cat-manifest``."""

    uuid: str
    apps: tuple[AppSpec, ...]
    volumes: tuple[Volume, ...] = ()
    hostname: str = ""
    annotations: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.apps:
            raise ManifestError("a pod needs at least one app")
        if not self.hostname:  # the one place the default hostname is decided
            object.__setattr__(self, "hostname", f"kvmrkt-{self.uuid[:8]}")
        if len(self.hostname) > 64 or self.hostname.endswith(".") or not DNS_NAME_RE.match(self.hostname):
            raise ManifestError(f"invalid hostname {self.hostname[:80]!r}",
                                hint="letters, digits, '-' and '.', at most 64 characters")
        names = [a.name for a in self.apps]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ManifestError(f"duplicate app name(s): {', '.join(sorted(dup))}", hint="set --name per app")
        vnames = {v.name for v in self.volumes}
        if len(vnames) != len(self.volumes):
            raise ManifestError("duplicate volume names")
        for app in self.apps:
            for m in app.mounts:
                if m.volume not in vnames:
                    raise ManifestError(f"app {app.name}: mount of undefined volume {m.volume!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (stable field names, the on-disk API)."""
        return {
            "kind": POD_MANIFEST_KIND,
            "uuid": self.uuid,
            "hostname": self.hostname,
            "apps": [
                {
                    "name": a.name,
                    "image": {"id": a.image_id, "name": a.image_name, "rootfs": a.rootfs_digest},
                    "exec": list(a.exec),
                    "env": [{"name": k, "value": v} for k, v in a.env],
                    "workingDirectory": a.working_dir,
                    "user": a.user,
                    "group": a.group,
                    "uid": a.uid,
                    "gid": a.gid,
                    "supplementaryGIDs": list(a.supplementary_gids),
                    "memoryMiB": a.memory_mib,
                    "cpus": a.cpus,
                    "mountPoints": [{"volume": m.volume, "path": m.target} for m in a.mounts],
                    "confinement": a.confinement.to_dict(),
                }
                for a in self.apps
            ],
            "volumes": [
                {"name": v.name, "kind": v.kind, "source": v.source, "readOnly": v.read_only} for v in self.volumes
            ],
            "annotations": [{"name": k, "value": v} for k, v in self.annotations],
        }

    def canonical_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no whitespace): what gets hashed."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PodManifest:
        """Parse the JSON form strictly.

        Raises:
            ManifestError: unknown, missing or mistyped fields.
        """
        _take(d, "pod", {"kind", "uuid", "apps"}, {"hostname", "volumes", "annotations"})
        if d["kind"] != POD_MANIFEST_KIND:
            raise ManifestError(f"pod: kind must be {POD_MANIFEST_KIND!r}")
        if not isinstance(d["apps"], list):
            raise ManifestError("pod.apps: expected a list")
        apps = []
        for i, a in enumerate(d["apps"]):
            w = f"pod.apps[{i}]"
            _take(
                a,
                w,
                {"name", "image", "exec"},
                {"env", "workingDirectory", "user", "group", "uid", "gid", "supplementaryGIDs", "memoryMiB", "cpus",
                 "mountPoints", "confinement"},
            )
            img = a["image"]
            _take(img, w + ".image", {"id", "name", "rootfs"}, set())
            env = []
            for e in a.get("env", []):
                _take(e, w + ".env[]", {"name", "value"}, set())
                env.append((_str(e, "name", w), _str(e, "value", w)))
            mounts = []
            for m in a.get("mountPoints", []):
                _take(m, w + ".mountPoints[]", {"volume", "path"}, set())
                mounts.append(MountPoint(_str(m, "volume", w), _str(m, "path", w)))
            gids = a.get("supplementaryGIDs", [])
            if not isinstance(gids, list) or not all(isinstance(g, int) and g >= 0 for g in gids):
                raise ManifestError(f"{w}.supplementaryGIDs: expected a list of non-negative integers")
            apps.append(
                AppSpec(
                    name=_str(a, "name", w),
                    image_id=_str(img, "id", w),
                    image_name=_str(img, "name", w),
                    rootfs_digest=_str(img, "rootfs", w),
                    exec=_strlist(a, "exec", w),
                    env=check_env(env),
                    working_dir=_str(a, "workingDirectory", w, "/"),
                    user=_str(a, "user", w, "0"),
                    group=_str(a, "group", w, "0"),
                    uid=_int(a, "uid", w) if "uid" in a else 0,  # type: ignore[arg-type]
                    gid=_int(a, "gid", w) if "gid" in a else 0,  # type: ignore[arg-type]
                    supplementary_gids=tuple(gids),
                    memory_mib=_int(a, "memoryMiB", w, optional=True),
                    cpus=_int(a, "cpus", w, optional=True),
                    mounts=tuple(mounts),
                    confinement=Confinement.from_dict(a["confinement"], w + ".confinement")
                    if "confinement" in a else DEFAULT_CONFINEMENT,
                )
            )
        vols = []
        for v in d.get("volumes", []):
            _take(v, "pod.volumes[]", {"name", "kind"}, {"source", "readOnly"})
            ro = v.get("readOnly", False)
            if not isinstance(ro, bool):
                raise ManifestError("pod.volumes[].readOnly: expected a boolean")
            src = v.get("source")
            if src is not None and not isinstance(src, str):
                raise ManifestError("pod.volumes[].source: expected a string")
            vols.append(Volume(_str(v, "name", "pod.volumes[]"), _str(v, "kind", "pod.volumes[]"), src, ro))
        ann = []
        for x in d.get("annotations", []):
            _take(x, "pod.annotations[]", {"name", "value"}, set())
            ann.append((_str(x, "name", "pod"), _str(x, "value", "pod")))
        return cls(
            uuid=_str(d, "uuid", "pod"),
            apps=tuple(apps),
            volumes=tuple(vols),
            hostname=_str(d, "hostname", "pod", ""),
            annotations=tuple(ann),
        )
