"""OCI bundles: ``config.json`` parsed strictly into what kvmrkt runs, and the one-app pod manifest it becomes.

Role: read and validate a bundle (an error names the field), map its mounts and process to a kvmrkt app (the
process's confinement through ``kvmrkt.pods.confinement``), parse signal names as runc does. Trust boundary: the
bundle comes from the container engine and is hostile input: bounded JSON, every field type-checked, and the
mounts the guest provides itself are not taken from it.
"""

from __future__ import annotations

import hashlib
import math
import signal
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmrkt import jsondoc
from kvmrkt.errors import ConfigError, ManifestError
from kvmrkt.ocirt import cgroupspec, hooks
from kvmrkt.pods.confinement import DEFAULT as DEFAULT_CONFINEMENT
from kvmrkt.pods.confinement import Confinement, from_oci, lift
from kvmrkt.pods.manifest import AppSpec, MountPoint, PodManifest, Volume
from kvmrkt.stage1 import CgroupPlacement

OCI_VERSION = "1.0.2"
APP = "container"
STATE_DIR = "kvmrkt-oci"
# Mounts the guest init gives every app itself, as the OCI defaults (proc, sysfs, a /dev tmpfs with the default
# devices and links, devpts, shm, mqueue); cgroup has no use in a one-container VM.
GUEST_MOUNTS = frozenset({"/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys/fs/cgroup"})
# containerd's CRI annotations: "sandbox" (the pod's pause container: kvmrkt boots the pod's VM for it) or
# "container" (a container of the pod: created inside that VM), and the pod's sandbox container id.
CRI_TYPE = "io.kubernetes.cri.container-type"
CRI_SANDBOX = "io.kubernetes.cri.sandbox-id"
# Annotations that name the image (CRI, then the OCI image spec's).
IMAGE_ANNOTATIONS = ("io.kubernetes.cri.image-name", "org.opencontainers.image.ref.name")
MAX_MOUNTS = 32  # the guest init's MAX_VOLS: one pod volume per mount
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


@dataclass(frozen=True)
class Bundle:
    """What kvmrkt uses of an OCI bundle's ``config.json``."""

    path: Path
    config_digest: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str
    uid: int
    gid: int
    gids: tuple[int, ...]
    terminal: bool
    rootfs: Path
    readonly: bool
    hostname: str
    volumes: tuple[Volume, ...] = ()
    mounts: tuple[MountPoint, ...] = ()
    memory_mib: int | None = None
    cpus: int | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    netns: str = ""  # a network namespace to join (linux.namespaces network path)
    joined: tuple[tuple[str, str], ...] = ()  # namespaces named by path (type, path), the network one included
    namespaces: frozenset[str] = frozenset()  # the types linux.namespaces lists (one left out: the host's)
    confinement: Confinement = DEFAULT_CONFINEMENT
    cgroup: CgroupPlacement | None = None  # linux.cgroupsPath and the cgroup limits of linux.resources
    hooks: hooks.Hooks = field(default_factory=dict)
    unhonoured: tuple[str, ...] = ()  # linux.resources fields a VM does not honour (the caller warns)

    @property
    def image_name(self) -> str:
        return next((self.annotations[k] for k in IMAGE_ANNOTATIONS if self.annotations.get(k)), "oci-bundle")

    @property
    def sandbox_id(self) -> str | None:
        """The CRI sandbox this bundle is a container of (None: it gets a VM of its own)."""
        sid = self.annotations.get(CRI_SANDBOX)
        return sid if sid and self.annotations.get(CRI_TYPE) == "container" else None

    @property
    def image_id(self) -> str:
        """The app's image id in the pod manifest (a bundle is no stored image: named by its config's digest)."""
        return f"oci-bundle:{self.config_digest}"


def _get(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    value = doc.get(key, default)
    if value is None and default is None and kind is not type(None):
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ManifestError(f"config.json: {where}{key} must be {getattr(kind, '__name__', kind)}")
    return value


def load_bundle(path: Path) -> Bundle:
    """Read and check ``BUNDLE/config.json``.

    Raises:
        ManifestError: unreadable or malformed config, or a field kvmrkt cannot honour (named).
    """
    try:
        raw = (path / "config.json").read_bytes()
        doc = jsondoc.loads(raw)
    except FileNotFoundError:
        raise ManifestError(f"{path} is not an OCI bundle: it has no config.json") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read {path / 'config.json'}: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestError("config.json must be a JSON object")
    version = _get(doc, "ociVersion", str, "", "")
    if not version.startswith("1."):
        raise ManifestError(f"config.json: ociVersion {version!r} is not supported (1.x)")
    proc = _get(doc, "process", dict, "", {})
    args = _get(proc, "args", list, "process.", [])
    if not args or not all(isinstance(a, str) for a in args):
        raise ManifestError("config.json: process.args must be a non-empty list of strings")
    env: list[tuple[str, str]] = []
    for item in _get(proc, "env", list, "process.", []):
        if not isinstance(item, str) or "=" not in item:
            raise ManifestError(f"config.json: process.env entry {str(item)[:60]!r} is not KEY=VALUE")
        key, _, value = item.partition("=")
        env.append((key, value))
    cwd = _get(proc, "cwd", str, "process.", "/")
    user = _get(proc, "user", dict, "process.", {})
    uid, gid = _get(user, "uid", int, "process.user.", 0), _get(user, "gid", int, "process.user.", 0)
    gids = _get(user, "additionalGids", list, "process.user.", [])
    if not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gids) or uid < 0 or gid < 0:
        raise ManifestError("config.json: process.user ids must be non-negative integers")
    root = _get(doc, "root", dict, "", {})
    rootfs = Path(_get(root, "path", str, "root.", "rootfs"))
    rootfs = rootfs if rootfs.is_absolute() else path / rootfs
    if not rootfs.is_dir():
        raise ManifestError(f"config.json: root.path {rootfs} is not a directory")
    volumes, mounts, ignored = _mounts(_get(doc, "mounts", list, "", []), path)
    linux = _get(doc, "linux", dict, "", {})
    res = _get(linux, "resources", dict, "linux.", {})
    memory = _get(res, "memory", dict, "linux.resources.", {})
    limit = _get(memory, "limit", int, "linux.resources.memory.", None)
    cpu = _get(res, "cpu", dict, "linux.resources.", {})
    quota, period = _get(cpu, "quota", int, "linux.resources.cpu.", None), _get(cpu, "period", int, "", None)
    cgroup, unhonoured = cgroupspec.placement(linux)
    annotations = _get(doc, "annotations", dict, "", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise ManifestError("config.json: annotations must map strings to strings")
    if annotations.get(CRI_TYPE) == "sandbox":  # the pod's sizes (the sum of its containers' limits), if given
        sizes = [_annotated(annotations, f"io.kubernetes.cri.sandbox-{k}") for k in ("memory", "cpu-quota",
                                                                                       "cpu-period")]
        limit, quota, period = limit or sizes[0], quota or sizes[1], period or sizes[2]
    namespaces, joined = _namespaces(_get(linux, "namespaces", list, "linux.", []))
    return Bundle(
        path=path, config_digest="sha256:" + hashlib.sha256(raw).hexdigest(), args=tuple(args), env=tuple(env),
        cwd=cwd, uid=uid, gid=gid, gids=tuple(gids), terminal=bool(_get(proc, "terminal", bool, "process.", False)),
        rootfs=rootfs, readonly=bool(_get(root, "readonly", bool, "root.", False)),
        hostname=_get(doc, "hostname", str, "", ""), volumes=volumes, mounts=mounts,
        memory_mib=math.ceil(limit / (1 << 20)) if limit and limit > 0 else None,
        cpus=math.ceil(quota / period) if quota and period and quota > 0 and period > 0 else None,
        annotations=dict(annotations), ignored=ignored, confinement=from_oci(proc, linux, ()), cgroup=cgroup,
        unhonoured=unhonoured, hooks=hooks.parse(doc), netns=dict(joined).get("network", ""),
        joined=joined, namespaces=namespaces,
    )  # fmt: skip


def _annotated(annotations: dict[str, str], key: str) -> int | None:
    """A positive integer annotation (containerd 1.7's pod sizes), or None.

    Raises:
        ManifestError: the annotation is there but not a positive integer.
    """
    value = annotations.get(key)
    if value is None or value == "0":
        return None
    if not value.isdigit() or len(value) > 19:
        raise ManifestError(f"config.json: annotation {key} must be a positive integer, not {value[:40]!r}")
    return int(value)


NAMESPACES = frozenset({"pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time"})
# Namespaces a container may name by path: a network namespace (the VM is plugged into it), or what it shares with
# the pod it joins (a Kubernetes or podman pod's containers share their sandbox's network, IPC, UTS and cgroup
# namespaces: kvmrkt-oci creates such a container inside the sandbox's VM; kvmrkt.ocirt.sandbox decides).
SHAREABLE = ("network", "ipc", "uts", "cgroup")


def _namespaces(entries: list[Any]) -> tuple[frozenset[str], tuple[tuple[str, str], ...]]:
    """Check ``linux.namespaces``; returns the types listed and the (type, path) pairs it names by path. A path
    names a namespace of the host's kernel, which a process inside a VM cannot join: a path of a type not
    ``SHAREABLE`` is refused here, not ignored; a shareable one only if it is a pod's kvmrkt-oci joins
    (``kvmrkt.ocirt.sandbox``).

    Raises:
        ManifestError: a malformed entry, an unknown or repeated type, or a path that cannot be joined.
    """
    joined: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, ns in enumerate(entries):
        kind = ns.get("type") if isinstance(ns, dict) else None
        path = ns.get("path", "") if isinstance(ns, dict) else ""
        if kind not in NAMESPACES or not isinstance(path, str):
            raise ManifestError(f"config.json: linux.namespaces[{i}] needs a type ({', '.join(sorted(NAMESPACES))}) "
                                "and at most a path string")
        if kind in seen:
            raise ManifestError(f"config.json: linux.namespaces[{i}]: the {kind} namespace is listed twice")
        seen.add(kind)
        if path and kind not in SHAREABLE:
            raise ManifestError(f"config.json: linux.namespaces[{i}]: the {kind} namespace at {path} cannot be "
                                "joined: the container runs inside a VM, whose kernel has namespaces of its own",
                                hint="a network namespace path is taken (the VM is plugged into it); a container of "
                                     "a pod shares its sandbox's network, IPC, UTS and cgroup namespaces")
        if path:
            joined.append((kind, path))
    return frozenset(seen), tuple(joined)


def _mounts(entries: list[Any], bundle: Path) -> tuple[tuple[Volume, ...], tuple[MountPoint, ...], tuple[str, ...]]:
    """OCI mounts as pod volumes: tmpfs -> an empty (guest memory) volume; a bind mount of a host file or
    directory (a relative source is the bundle's) -> a ``bind`` volume (``rbind``: with the mounts under it),
    bound into the pod's shared export on the host; the guest's own API filesystems are provided anyway. Other
    filesystem types are listed as ignored; a bind that cannot be honoured (no such source, a device, socket or
    fifo, which cannot reach a VM) is refused."""
    volumes: list[Volume] = []
    mounts: list[MountPoint] = []
    ignored: list[str] = []
    for i, m in enumerate(entries):
        if not isinstance(m, dict) or not isinstance(m.get("destination"), str):
            raise ManifestError(f"config.json: mounts[{i}] needs a destination")
        dest, kind, source = m["destination"], str(m.get("type", "")), str(m.get("source", ""))
        options = [str(o) for o in m.get("options", []) or []]
        if not dest.startswith("/"):
            raise ManifestError(f"config.json: mounts[{i}].destination {dest!r} must be absolute")
        if dest in GUEST_MOUNTS:
            continue
        name = f"m{i}"
        if kind == "tmpfs":
            volumes.append(Volume(name, "empty"))
        elif kind == "bind" or "bind" in options or "rbind" in options:
            src = bundle / source  # an absolute source stays as it is
            try:
                if not source:
                    raise OSError("no source")
                mode = src.stat().st_mode  # symlinks followed, as runc does: the bundle is the engine's
            except OSError as exc:
                raise ManifestError(f"config.json: mounts[{i}] ({dest}): cannot bind {source!r}: "
                                    f"{exc.strerror or exc}") from None
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise ManifestError(f"config.json: mounts[{i}] ({dest}): {source} is not a file or a directory, and "
                                    "nothing else (devices, sockets, fifos) can be bound into a VM")
            volumes.append(Volume(name, "rbind" if "rbind" in options else "bind", str(src.absolute()),
                                  read_only="ro" in options))
        else:
            ignored.append(f"{dest} ({kind or 'bind'} of {source or 'nothing'})")
            continue
        mounts.append(MountPoint(name, dest))
    if len(volumes) > MAX_MOUNTS:
        raise ManifestError(f"config.json: {len(volumes)} mounts; a kvmrkt VM takes at most {MAX_MOUNTS} (besides "
                            "the API filesystems the guest provides)")
    return tuple(volumes), tuple(mounts), tuple(ignored)


def manifest_for(bundle: Bundle, uuid: str, container_id: str, insecure: frozenset[str] = frozenset()) -> PodManifest:
    """The one-app pod manifest of a bundle (its annotations record the container and the bundle), its
    confinement lifted by ``insecure`` (``--insecure-options``)."""
    app = AppSpec(
        name=APP, image_id=bundle.image_id, image_name=bundle.image_name, rootfs_digest="",
        exec=bundle.args, env=bundle.env, working_dir=bundle.cwd, user=str(bundle.uid), group=str(bundle.gid),
        uid=bundle.uid, gid=bundle.gid, supplementary_gids=bundle.gids, memory_mib=bundle.memory_mib,
        cpus=bundle.cpus, mounts=bundle.mounts, confinement=lift(bundle.confinement, insecure),
    )  # fmt: skip
    return PodManifest(uuid=uuid, apps=(app,), volumes=bundle.volumes, hostname=bundle.hostname,
                       annotations=(("kvmrkt.oci/id", container_id), ("kvmrkt.oci/bundle", str(bundle.path)),
                                    ("kvmrkt.oci/config-digest", bundle.config_digest)))


def parse_signal(text: str) -> int:
    """``9``, ``KILL`` or ``SIGKILL``.

    Raises:
        ConfigError: not a signal.
    """
    name = text.upper().removeprefix("SIG")
    if text.isdigit() and 0 < int(text) < 65:
        return int(text)
    try:
        return int(signal.Signals[f"SIG{name}"])
    except KeyError:
        raise ConfigError(f"unknown signal {text!r}") from None
