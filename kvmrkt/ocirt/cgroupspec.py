"""An OCI bundle's ``linux.cgroupsPath`` and the cgroup limits of ``linux.resources`` a VM's cgroup takes.

Role: turn them into a ``CgroupPlacement`` (where the container's VMM and its supervisor go, with which pids and
CPU limits) for the jail, and name what the VM does not honour so the caller can say so (never silently).
``memory.limit`` sizes the VM (``bundle.memory_mib``) and the cgroup limit follows from it; ``devices`` needs no
host rule (no host device reaches the VM but the few its VMM opens); the rest is listed as not honoured.
Trust boundary: the bundle comes from the engine (containerd, podman), trusted to name the cgroup, but every value
is checked (types, ranges, no ``..`` out of the hierarchy, systemd's ``slice:prefix:name`` form refused).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kvmrkt.errors import ManifestError
from kvmrkt.stage1 import CgroupPlacement

_CPUSET = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
# What kvmrkt does with each resource field (anything else is reported as not honoured).
_HONOURED = {"memory": {"limit"}, "cpu": {"shares", "quota", "period", "cpus", "mems"}, "pids": {"limit"},
             "devices": None}


def _int(doc: dict[str, Any], key: str, where: str, lo: int, hi: int = 1 << 62) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ManifestError(f"config.json: {where}.{key} must be an integer from {lo} to {hi}, not {value!r}")
    return value


def _cpuset(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key, "")
    if not isinstance(value, str) or (value and not _CPUSET.match(value)):
        raise ManifestError(f"config.json: linux.resources.cpu.{key} must be a list like '0-3,5', not {value!r}")
    return value


def placement(linux: dict[str, Any]) -> tuple[CgroupPlacement | None, tuple[str, ...]]:
    """The placement a bundle's ``linux`` section asks for (None: neither a cgroupsPath nor a cgroup limit), and
    the resource fields the VM does not honour (``linux.resources.X.Y`` names).

    Raises:
        ManifestError: a bad path or value (the field is named).
    """
    path = linux.get("cgroupsPath", "")
    if not isinstance(path, str):
        raise ManifestError("config.json: linux.cgroupsPath must be a string")
    if path.count(":") == 2 and not path.startswith("/"):
        raise ManifestError(f"config.json: linux.cgroupsPath {path!r} is systemd's slice:prefix:name form; "
                            "kvmrkt-oci places cgroups by path (set SystemdCgroup = false in containerd's runc "
                            "options)")
    if ".." in Path(path).parts or "\0" in path:
        raise ManifestError(f"config.json: linux.cgroupsPath {path!r} climbs out of the hierarchy")
    if path and not path.strip("/."):
        raise ManifestError(f"config.json: linux.cgroupsPath {path!r} names the hierarchy's root (or the "
                            "runtime's own cgroup): limits and removal would hit everything in it")
    res = linux.get("resources")
    res = {} if res is None else res
    if not isinstance(res, dict):
        raise ManifestError("config.json: linux.resources must be an object")
    unhonoured = []
    for group, value in res.items():
        fields = _HONOURED.get(group, set())
        if fields is None:
            continue
        if not isinstance(value, dict):
            unhonoured.append(f"linux.resources.{group}")
            continue
        unhonoured += [f"linux.resources.{group}.{k}" for k, v in value.items() if k not in fields and v is not None]
    cpu, pids = res.get("cpu", {}), res.get("pids", {})
    if not isinstance(cpu, dict) or not isinstance(pids, dict):
        raise ManifestError("config.json: linux.resources.cpu and .pids must be objects")
    place = CgroupPlacement(  # 0 is "not set" for these, as runc reads them
        path=path, pids_max=_int(pids, "limit", "linux.resources.pids", -1) or None,
        cpu_shares=_int(cpu, "shares", "linux.resources.cpu", 0, 262144) or None,
        cpu_quota_us=_int(cpu, "quota", "linux.resources.cpu", -1) or None,
        cpu_period_us=_int(cpu, "period", "linux.resources.cpu", 0, 1_000_000) or None,
        cpuset_cpus=_cpuset(cpu, "cpus"), cpuset_mems=_cpuset(cpu, "mems"), join_creator=bool(path),
    )  # fmt: skip
    if (place.cpu_shares or 2) < 2 or (place.cpu_period_us or 1000) < 1000:
        raise ManifestError("config.json: linux.resources.cpu: shares must be at least 2 and period at least 1000")
    if not path and place == CgroupPlacement(path="", join_creator=False):
        return None, tuple(unhonoured)
    return place, tuple(unhonoured)
