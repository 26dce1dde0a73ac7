"""What an app sets in the VM's own kernel: sysctls, its OOM score adjustment and extra device nodes (an OCI
bundle's ``linux.sysctl``, ``process.oomScoreAdj`` and ``linux.devices``).

Role: parse and check them (``from_oci``), keep them in the pod manifest (``to_dict``/``from_dict``) and render
them as pod-config lines for the guest init (``guest_config``: ``sysctl``, ``oomscore``, ``device``), which
writes the sysctls in the app's namespaces before its root is made read-only, sets the score before exec and
makes the nodes in the app's own ``/dev``.
Trust boundary: every one of these acts on the guest kernel, which is the container's alone, never on the host's:
a sysctl changes the VM, a device node names a device of the VM's kernel. Values are still checked (sysctl
names are dotted words, device paths stay under ``/dev`` without ``..``, numbers in range) so that the guest init
only ever gets well-formed lines.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvmrkt.errors import ManifestError

_SYSCTL = re.compile(r"^[a-z0-9_]+(\.[A-Za-z0-9_:@-]+)+$")
DEVICE_TYPES = ("c", "b", "u", "p")
MAX_SYSCTLS, MAX_DEVICES = 64, 32  # the guest init's bounds (init.h): more would be dropped there


@dataclass(frozen=True, slots=True)
class Device:
    """A device node in the app's ``/dev``: ``kind`` c/u (character), b (block) or p (fifo); ``mode``: the
    permission bits."""

    path: str
    kind: str
    major: int = 0
    minor: int = 0
    mode: int = 0o666
    uid: int = 0
    gid: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "type": self.kind, "major": self.major, "minor": self.minor,
                "fileMode": self.mode, "uid": self.uid, "gid": self.gid}


@dataclass(frozen=True, slots=True)
class KernelSettings:
    """An app's sysctls (name, value), OOM score adjustment (None: the guest's default) and device nodes."""

    sysctls: tuple[tuple[str, str], ...] = ()
    oom_score_adj: int | None = None
    devices: tuple[Device, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.sysctls or self.oom_score_adj is not None or self.devices)

    def to_dict(self) -> dict[str, Any]:
        return {"sysctl": dict(self.sysctls), "oomScoreAdj": self.oom_score_adj,
                "devices": [d.to_dict() for d in self.devices]}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> KernelSettings:
        """Parse the manifest form strictly (the same checks as the OCI form).

        Raises:
            ManifestError: a malformed or out-of-range value.
        """
        if not isinstance(d, dict) or set(d) != {"sysctl", "oomScoreAdj", "devices"}:
            raise ManifestError(f"{where}: expected an object with exactly: devices, oomScoreAdj, sysctl")
        return _parse(d["sysctl"], d["oomScoreAdj"], d["devices"], where)


NO_KERNEL_SETTINGS = KernelSettings()


def from_oci(process: Mapping[str, Any], linux: Mapping[str, Any]) -> KernelSettings:
    """``linux.sysctl``, ``process.oomScoreAdj`` and ``linux.devices`` of a config.json.

    Raises:
        ManifestError: a malformed value (the field is named).
    """
    sysctls, devices = linux.get("sysctl"), linux.get("devices")
    return _parse({} if sysctls is None else sysctls, process.get("oomScoreAdj"), [] if devices is None else devices,
                  "config.json")


def _parse(sysctls: Any, oom: Any, devices: Any, where: str) -> KernelSettings:
    if not isinstance(sysctls, dict):
        raise ManifestError(f"{where}: linux.sysctl must be an object")
    for name, value in sysctls.items():
        if not _SYSCTL.match(name) or ".." in name:
            raise ManifestError(f"{where}: linux.sysctl name {name[:80]!r} is not a dotted sysctl name")
        if not isinstance(value, str) or "\n" in value or "\0" in value or len(value) > 4096:
            raise ManifestError(f"{where}: linux.sysctl {name} must be a string of one line")
    if oom is not None and (not isinstance(oom, int) or isinstance(oom, bool) or not -1000 <= oom <= 1000):
        raise ManifestError(f"{where}: process.oomScoreAdj must be an integer from -1000 to 1000")
    if not isinstance(devices, list):
        raise ManifestError(f"{where}: linux.devices must be a list")
    if len(sysctls) > MAX_SYSCTLS or len(devices) > MAX_DEVICES:
        raise ManifestError(f"{where}: at most {MAX_SYSCTLS} linux.sysctl entries and {MAX_DEVICES} linux.devices")
    return KernelSettings(tuple(sorted(sysctls.items())), oom,
                          tuple(_device(d, f"{where}: linux.devices[{i}]") for i, d in enumerate(devices)))


def _device(d: Any, where: str) -> Device:
    if not isinstance(d, dict):
        raise ManifestError(f"{where} must be an object")
    path, kind = d.get("path"), d.get("type")
    if not isinstance(path, str) or not path.startswith("/dev/") or ".." in path.split("/") or "\0" in path \
            or path.endswith("/") or len(path) > 200:
        raise ManifestError(f"{where}.path must be a path under /dev/, without '..' (not {str(path)[:80]!r})")
    if kind not in DEVICE_TYPES:
        raise ManifestError(f"{where}.type must be one of {', '.join(DEVICE_TYPES)}")
    nums = {}
    for key, default, hi in (("major", 0, (1 << 12) - 1), ("minor", 0, (1 << 20) - 1), ("fileMode", 0o666, 0o7777),
                             ("uid", 0, (1 << 32) - 2), ("gid", 0, (1 << 32) - 2)):
        value = d.get(key, default)
        value = default if value is None else value
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi:
            raise ManifestError(f"{where}.{key} must be an integer from 0 to {hi}")
        nums[key] = value
    if kind != "p" and ("major" not in d or "minor" not in d):
        raise ManifestError(f"{where}: a {kind} device needs major and minor")
    return Device(path, kind, nums["major"], nums["minor"], nums["fileMode"], nums["uid"], nums["gid"])


def guest_config(settings: KernelSettings) -> list[tuple[str, ...]]:
    """The settings as ``pod.cfg`` fields (see ``stage1_kvm/guest/apps.c`` and ``rootfs.c``)."""
    out: list[tuple[str, ...]] = [("sysctl", name, value) for name, value in settings.sysctls]
    if settings.oom_score_adj is not None:
        out.append(("oomscore", str(settings.oom_score_adj)))
    out += [("device", d.path, "c" if d.kind == "u" else d.kind, str(d.major), str(d.minor), f"{d.mode:o}",
             str(d.uid), str(d.gid)) for d in settings.devices]
    return out
