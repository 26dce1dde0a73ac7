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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmrkt.errors import JailError
from kvmrkt.host.wait import Deadline
from kvmrkt.stage1 import JailSpec

CONTROLLERS = ("memory", "cpu", "pids")
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
            out.append(Hierarchy(Path(fields[4]), 1, frozenset(tail[2].split(",")) & set(CONTROLLERS)))
    return out


def choose(hierarchies: list[Hierarchy]) -> dict[str, Hierarchy]:
    """Controller -> the hierarchy to use for it: v2 when the unified hierarchy offers it, else its v1 one.

    Raises:
        JailError: a controller is mounted nowhere.
    """
    picked: dict[str, Hierarchy] = {}
    for ctrl in CONTROLLERS:
        v2 = [h for h in hierarchies if h.version == 2 and ctrl in h.controllers]
        v1 = [h for h in hierarchies if h.version == 1 and ctrl in h.controllers]
        if not (v2 or v1):
            raise JailError(f"the {ctrl} cgroup controller is not mounted: pod limits cannot be enforced",
                            hint="mount cgroup v2 with the memory, cpu and pids controllers, or their v1 hierarchies")
        picked[ctrl] = (v2 or v1)[0]
    return picked


def host_hierarchies() -> dict[str, Hierarchy]:
    """Where this host's memory, cpu and pids controllers are."""
    text = MOUNTINFO.read_text()
    v2 = ""
    for line in text.splitlines():
        pre, _, post = line.partition(" - ")
        if post.startswith("cgroup2 ") and len(pre.split()) > 4:
            with contextlib.suppress(OSError):
                v2 = (Path(pre.split()[4]) / "cgroup.controllers").read_text()
    return choose(parse_mountinfo(text, v2))


def limit_files(jail: JailSpec, version: int, ctrl: str) -> list[tuple[str, str]]:
    """The (file, value) pairs that set a jail's limits for one controller (pure)."""
    mem = jail.memory_limit_mib * 1024 * 1024
    quota = -1 if jail.cpu_quota is None else max(1000, int(jail.cpu_quota * CPU_PERIOD_US))
    if version == 2:
        return {"memory": [("memory.max", str(mem)), ("memory.swap.max", "0")],
                "cpu": [("cpu.max", f"{'max' if quota < 0 else quota} {CPU_PERIOD_US}")],
                "pids": [("pids.max", str(jail.pids_max))]}[ctrl]
    return {"memory": [("memory.limit_in_bytes", str(mem)), ("memory.memsw.limit_in_bytes", str(mem))],
            "cpu": [("cpu.cfs_period_us", str(CPU_PERIOD_US)), ("cpu.cfs_quota_us", str(quota))],
            "pids": [("pids.max", str(jail.pids_max))]}[ctrl]


@dataclass(frozen=True, slots=True)
class PodCgroup:
    """A pod's cgroups: controller -> directory (v2: the same directory for all three); ``owned``: the controllers
    whose directory kvmrkt made (and removes); the others belong to the VMM's manager (libvirt)."""

    dirs: dict[str, Path]
    version: dict[str, int]
    owned: frozenset[str] = frozenset(CONTROLLERS)

    @property
    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid to, to join (each directory once)."""
        return sorted({str(d / "cgroup.procs") for d in self.dirs.values()})

    def to_dict(self) -> dict[str, Any]:
        return {"dirs": {k: str(v) for k, v in self.dirs.items()}, "version": dict(self.version),
                "owned": sorted(self.owned)}

    @classmethod
    def from_dict(cls, d: Any) -> PodCgroup | None:
        if not isinstance(d, dict) or not isinstance(d.get("dirs"), dict):
            return None
        return cls({str(k): Path(v) for k, v in d["dirs"].items()},
                   {str(k): int(v) for k, v in d.get("version", {}).items()},
                   frozenset(d.get("owned", CONTROLLERS)))

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

    def remove(self, timeout: float = 2.0) -> bool:
        """Remove the cgroups once their processes are gone (waits up to ``timeout`` for exiting ones); False
        if one is still busy (gc tries again)."""
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
        return ok


def create(parent: str, name: str, jail: JailSpec) -> PodCgroup:
    """Create a pod's cgroups with the jail's limits (an existing one, left by a crash, is reused).

    Raises:
        JailError: a controller is missing, or the cgroup cannot be created or limited.
    """
    hier = host_hierarchies()
    dirs: dict[str, Path] = {}
    version: dict[str, int] = {}
    try:
        for ctrl in CONTROLLERS:
            h = hier[ctrl]
            d = h.mount / parent / name
            if h.version == 2:
                _enable_v2(h.mount, parent, ctrl)
            d.mkdir(parents=True, exist_ok=True)
            dirs[ctrl], version[ctrl] = d, h.version
            for fname, value in limit_files(jail, h.version, ctrl):
                path = d / fname
                if fname.startswith("memory.memsw") and not path.exists():
                    continue  # swap accounting off in this kernel: there is no swap to limit
                path.write_text(value)
    except OSError as exc:
        PodCgroup(dirs, version).remove(timeout=0)
        raise JailError(f"cannot set up the pod's cgroup under {parent!r}: {exc}",
                        hint="kvmrkt needs to create cgroups (run as root on a host with cgroups mounted "
                             "read-write); [jail] cgroup_parent sets where") from exc
    return PodCgroup(dirs, version)


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
