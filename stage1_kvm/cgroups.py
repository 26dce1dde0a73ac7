"""A cgroup per pod VMM, with the jail's limits: memory (guest RAM + margin, no swap), pids, CPU quota.

Role: find where the memory, cpu and pids controllers are (cgroup v2 where the unified hierarchy has them, else
the v1 hierarchy of each; a host may mix both, this build host mounts v1), create
``<hierarchy root>/<[jail] cgroup_parent>/<pod uuid>`` in each, write the limits, hand the ``cgroup.procs`` files
to the spawned VMM (which joins them itself, as root, before it drops its privileges: Firecracker's jailer does
the same), read back what happened (peak usage, OOM kills) and remove the cgroups when the VMM is gone. The
parent is relative to each hierarchy's root, as libvirt's ``machine`` partition is: a pod's limits do not depend
on the cgroup of the kvmrkt command that started it.

Trust boundary: paths are built from the configuration and a pod UUID only; the VMM inside the cgroup is
untrusted and cannot write to it (it runs as another uid, without capabilities).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmrkt.errors import JailError
from kvmrkt.host.wait import Deadline
from kvmrkt.stage1 import JailSpec

CONTROLLERS = ("memory", "cpu", "pids")
KNOWN = (*CONTROLLERS, "cpuset")
CPU_PERIOD_US = 100_000
MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """A mounted cgroup hierarchy: v1 (one or more named controllers) or v2 (the controllers it offers)."""

    mount: Path
    version: int
    controllers: frozenset[str]


def parse_mountinfo(text: str, v2_controllers: str = "") -> list[Hierarchy]:
    """The cgroup hierarchies in a ``/proc/self/mountinfo`` text (pure; ``v2_controllers``: the unified
    hierarchy's ``cgroup.controllers``)."""
    out = []
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields, tail = pre.split(), post.split()
        if len(fields) < 5 or len(tail) < 3 or fields[3] != "/":
            continue  # only hierarchies mounted at their root
        if tail[0] == "cgroup2":
            out.append(Hierarchy(Path(fields[4]), 2, frozenset(v2_controllers.split())))
        elif tail[0] == "cgroup":
            out.append(Hierarchy(Path(fields[4]), 1, frozenset(tail[2].split(",")) & set(KNOWN)))
    return out


def choose(hierarchies: list[Hierarchy], wanted: tuple[str, ...] = CONTROLLERS) -> dict[str, Hierarchy]:
    """Controller -> the hierarchy to use for it: v2 when the unified hierarchy offers it, else its v1 one.

    Raises:
        JailError: a controller is mounted nowhere.
    """
    picked: dict[str, Hierarchy] = {}
    for ctrl in wanted:
        v2 = [h for h in hierarchies if h.version == 2 and ctrl in h.controllers]
        v1 = [h for h in hierarchies if h.version == 1 and ctrl in h.controllers]
        if not (v2 or v1):
            raise JailError(f"the {ctrl} cgroup controller is not mounted: pod limits cannot be enforced",
                            hint="mount cgroup v2 with the memory, cpu and pids controllers, or their v1 hierarchies")
        picked[ctrl] = (v2 or v1)[0]
    return picked


def host_hierarchies(wanted: tuple[str, ...] = CONTROLLERS) -> dict[str, Hierarchy]:
    """Where this host's memory, cpu and pids controllers (and the other ``wanted`` ones) are."""
    text = MOUNTINFO.read_text()
    v2 = ""
    for line in text.splitlines():
        pre, _, post = line.partition(" - ")
        if post.startswith("cgroup2 ") and len(pre.split()) > 4:
            with contextlib.suppress(OSError):
                v2 = (Path(pre.split()[4]) / "cgroup.controllers").read_text()
    return choose(parse_mountinfo(text, v2), wanted)


def limit_files(jail: JailSpec, version: int, ctrl: str) -> list[tuple[str, str]]:
    """The (file, value) pairs that set a jail's limits for one controller (pure); a placement's own limits
    (pids, CPU shares, quota and period, cpuset) replace the jail's where it gives them."""
    mem = jail.memory_limit_mib * 1024 * 1024
    place = jail.placement
    period = place.cpu_period_us if place and place.cpu_period_us else CPU_PERIOD_US
    quota = -1 if jail.cpu_quota is None else max(1000, int(jail.cpu_quota * period))
    if place and place.cpu_quota_us is not None:
        quota = place.cpu_quota_us
    pids = jail.pids_max if not place or place.pids_max is None else place.pids_max
    pids_value = "max" if pids < 0 else str(pids)
    shares = place.cpu_shares if place else None
    cpuset = [(f, v) for f, v in (("cpuset.cpus", place.cpuset_cpus if place else ""),
                                  ("cpuset.mems", place.cpuset_mems if place else "")) if v]
    if version == 2:
        weight = [("cpu.weight", str(1 + ((shares - 2) * 9999) // 262142))] if shares else []
        return {"memory": [("memory.max", str(mem)), ("memory.swap.max", "0")],
                "cpu": [("cpu.max", f"{'max' if quota < 0 else quota} {period}"), *weight],
                "pids": [("pids.max", pids_value)], "cpuset": cpuset}[ctrl]
    return {"memory": [("memory.limit_in_bytes", str(mem)), ("memory.memsw.limit_in_bytes", str(mem))],
            "cpu": [("cpu.cfs_period_us", str(period)), ("cpu.cfs_quota_us", str(quota)),
                    *([("cpu.shares", str(shares))] if shares else [])],
            "pids": [("pids.max", pids_value)], "cpuset": cpuset}[ctrl]


def controllers(jail: JailSpec) -> tuple[str, ...]:
    """The controllers a jail's cgroup uses: memory, cpu and pids, and cpuset when a placement pins CPUs or
    memory nodes."""
    place = jail.placement
    return CONTROLLERS + (("cpuset",) if place and (place.cpuset_cpus or place.cpuset_mems) else ())


def placement_dir(mount: Path, path: str, own: str) -> Path:
    """Where a placement's ``path`` is in a hierarchy mounted at ``mount``: an absolute path from its root, a
    relative one from ``own`` (the creating process's cgroup there), as runc places ``cgroupsPath`` (pure).

    Raises:
        JailError: the path climbs out with ``..``.
    """
    if ".." in Path(path).parts:
        raise JailError(f"cgroup path {path!r} climbs out with '..'")
    base = "" if path.startswith("/") else own.lstrip("/")
    return mount / base / path.lstrip("/")


@dataclass(frozen=True, slots=True)
class PodCgroup:
    """A pod's cgroups: controller -> directory (v2: the same directory for all three); ``owned``: the controllers
    whose directory kvmrkt made (and removes); the others belong to the VMM's manager (libvirt)."""

    dirs: dict[str, Path]
    version: dict[str, int]
    owned: frozenset[str] = frozenset(CONTROLLERS)
    parents: tuple[Path, ...] = ()  # directories made above the pod's (a placement's path), deepest first
    creator: dict[str, Path] = field(default_factory=dict)  # controller -> where the creator was before joining

    @property
    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid to, to join (each directory once)."""
        return sorted({str(d / "cgroup.procs") for d in self.dirs.values()})

    def to_dict(self) -> dict[str, Any]:
        return {"dirs": {k: str(v) for k, v in self.dirs.items()}, "version": dict(self.version),
                "owned": sorted(self.owned), "parents": [str(p) for p in self.parents],
                "creator": {k: str(v) for k, v in self.creator.items()}}

    @classmethod
    def from_dict(cls, d: Any) -> PodCgroup | None:
        if not isinstance(d, dict) or not isinstance(d.get("dirs"), dict):
            return None
        return cls({str(k): Path(v) for k, v in d["dirs"].items()},
                   {str(k): int(v) for k, v in d.get("version", {}).items()},
                   frozenset(d.get("owned", CONTROLLERS)), tuple(Path(p) for p in d.get("parents", [])),
                   {str(k): Path(v) for k, v in d.get("creator", {}).items()})

    def _read(self, ctrl: str, name: str) -> str:
        try:
            return (self.dirs[ctrl] / name).read_text()
        except (OSError, KeyError):
            return ""

    def oom_kills(self) -> int:
        """How many processes the kernel killed in this cgroup for exceeding its memory limit."""
        text = self._read("memory", "memory.events" if self.version.get("memory") == 2 else "memory.oom_control")
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0

    def facts(self) -> dict[str, Any]:
        """Limits and usage as read back from the kernel (for ``status``)."""
        v2 = self.version.get("memory") == 2
        peak = self._read("memory", "memory.peak" if v2 else "memory.max_usage_in_bytes").strip()
        limit = self._read("memory", "memory.max" if v2 else "memory.limit_in_bytes").strip()
        cpu = (self._read("cpu", "cpu.max").strip() if self.version.get("cpu") == 2 else
               f"{self._read('cpu', 'cpu.cfs_quota_us').strip()} {self._read('cpu', 'cpu.cfs_period_us').strip()}")
        return {
            "path": str(self.dirs.get("memory", "")),
            "version": sorted(set(self.version.values())),
            "memory_limit_bytes": int(limit) if limit.isdigit() else limit or None,
            "memory_peak_bytes": int(peak) if peak.isdigit() else None,
            "pids_max": self._read("pids", "pids.max").strip() or None,
            "cpu_quota": cpu.strip() or None,
            "oom_kills": self.oom_kills(),
        }

    def leave(self) -> None:
        """Move this process back to where it was, if it is the creator that joined (before ``remove``)."""
        me = str(os.getpid())
        for ctrl, back in self.creator.items():
            here = self.dirs.get(ctrl)
            with contextlib.suppress(OSError):
                if here is not None and me in (here / "cgroup.procs").read_text().split():
                    (back / "cgroup.procs").write_text(me)

    def remove(self, timeout: float = 2.0) -> bool:
        """Remove the cgroups once their processes are gone (waits up to ``timeout`` for exiting ones), then the
        directories made above them that are empty; False if one is still busy (gc tries again)."""
        self.leave()
        deadline = Deadline(timeout)
        ok = True
        for d in sorted({d for ctrl, d in self.dirs.items() if ctrl in self.owned}):
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or deadline.expired():
                        ok = False
                        break
                    time.sleep(0.02)
        for p in self.parents:
            with contextlib.suppress(OSError):  # still in use by another container: kept
                p.rmdir()
        return ok


def create(parent: str, name: str, jail: JailSpec) -> PodCgroup:
    """Create a pod's cgroups with the jail's limits (an existing one, left by a crash, is reused).

    Raises:
        JailError: a controller is missing, or the cgroup cannot be created or limited.
    """
    place = jail.placement
    hier = host_hierarchies(controllers(jail))
    own = _placement(Path("/proc/self/cgroup").read_text())
    dirs: dict[str, Path] = {}
    version: dict[str, int] = {}
    made: list[Path] = []
    creator: dict[str, Path] = {}
    try:
        for ctrl in controllers(jail):
            h = hier[ctrl]
            key = "" if h.version == 2 else ctrl
            if place is None or not place.path:
                d = h.mount / parent / name
                if h.version == 2:
                    _enable_v2(h.mount, parent, ctrl)
            else:
                d = placement_dir(h.mount, place.path, own.get(key, "/"))
                if h.version == 2:
                    _enable_v2(h.mount, str(d.parent.relative_to(h.mount)), ctrl)
            made += _mkdirs(d, inherit_cpuset=ctrl == "cpuset" and h.version == 1)
            dirs[ctrl], version[ctrl] = d, h.version
            for fname, value in limit_files(jail, h.version, ctrl):
                path = d / fname
                if fname.startswith("memory.memsw") and not path.exists():
                    continue  # swap accounting off in this kernel: there is no swap to limit
                path.write_text(value)
        if place is not None and place.path and place.join_creator:
            for ctrl, d in dirs.items():
                key = "" if version[ctrl] == 2 else ctrl
                creator[ctrl] = hier[ctrl].mount / own.get(key, "/").lstrip("/")
                (d / "cgroup.procs").write_text(str(os.getpid()))
    except OSError as exc:
        leaves = set(dirs.values())
        PodCgroup(dirs, version, frozenset(dirs), tuple(m for m in reversed(made) if m not in leaves),
                  creator).remove(timeout=0)
        where = repr(place.path) if place is not None else f"under {parent!r}"
        raise JailError(f"cannot set up the pod's cgroup {where}: {exc}",
                        hint="kvmrkt needs to create cgroups (run as root on a host with cgroups mounted "
                             "read-write); [jail] cgroup_parent sets where") from exc
    leaves = set(dirs.values())
    return PodCgroup(dirs, version, frozenset(dirs), tuple(m for m in reversed(made) if m not in leaves), creator)


def _mkdirs(d: Path, *, inherit_cpuset: bool) -> list[Path]:
    """Make ``d`` and its missing parents, top-down; returns those made. A new v1 cpuset directory starts with
    no CPUs and no memory nodes (nothing can join it): it takes its parent's."""
    missing = [p for p in (d, *d.parents) if not p.exists()][::-1]
    for p in missing:
        p.mkdir(exist_ok=True)
        if inherit_cpuset:
            for f in ("cpuset.cpus", "cpuset.mems"):
                if not (p / f).read_text().strip():
                    (p / f).write_text((p.parent / f).read_text().strip() or "\n")
    return missing


def adopt(pid: int, parent: str, name: str, jail: JailSpec) -> PodCgroup:
    """Put a running (paused) VMM that another manager started under the jail's limits: where the manager placed it
    in a cgroup of its own (libvirt's ``machine/...``), the limits are written there, on the domain's directory
    rather than its per-thread children; for a controller it left alone, the VMM moves into a cgroup of ours.

    Raises:
        JailError: a cgroup could not be limited or joined.
    """
    hier = host_hierarchies()
    try:
        placed = _placement(Path(f"/proc/{pid}/cgroup").read_text())
    except OSError as exc:
        raise JailError(f"cannot read the cgroups of the VMM (pid {pid}): {exc.strerror}") from exc
    dirs: dict[str, Path] = {}
    version: dict[str, int] = {}
    owned: set[str] = set()
    try:
        for ctrl in CONTROLLERS:
            h = hier[ctrl]
            rel = placed.get("" if h.version == 2 else ctrl, "/")
            if rel != "/":
                d = h.mount / rel.lstrip("/")
                while d.name == "emulator" or d.name.startswith("vcpu"):
                    d = d.parent
            else:
                d = h.mount / parent / name
                if h.version == 2:
                    _enable_v2(h.mount, parent, ctrl)
                d.mkdir(parents=True, exist_ok=True)
                owned.add(ctrl)
            dirs[ctrl], version[ctrl] = d, h.version
            for fname, value in limit_files(jail, h.version, ctrl):
                if not (fname.startswith("memory.memsw") and not (d / fname).exists()):
                    (d / fname).write_text(value)
            if ctrl in owned:
                (d / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        PodCgroup(dirs, version, frozenset(owned)).remove(timeout=0)
        raise JailError(f"cannot put the VMM (pid {pid}) under the pod's limits: {exc}") from exc
    return PodCgroup(dirs, version, frozenset(owned))


def _placement(text: str) -> dict[str, str]:
    """``/proc/PID/cgroup`` -> controller (v2: "") -> path."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for ctrl in parts[1].split(","):
                out[ctrl] = parts[2]
    return out


def _enable_v2(root: Path, parent: str, ctrl: str) -> None:
    """Enable a controller down the v2 tree to ``parent`` (its children get it)."""
    cur = root
    for part in (*Path(parent).parts, None):
        if part is not None:
            nxt = cur / part
            nxt.mkdir(exist_ok=True)
        control = cur / "cgroup.subtree_control"
        if ctrl not in control.read_text().split():
            control.write_text(f"+{ctrl}")
        if part is None:
            break
        cur = nxt
