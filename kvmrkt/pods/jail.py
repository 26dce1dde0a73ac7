"""What stage0 decides about a pod's VMM jail: its host identity, its size and its resource limits.

Role: lease every pod its own unprivileged host uid/gid from ``[jail] uid_range`` (a ``kvmrkt.net.leases`` table
rebuilt from live pods, searched cyclically so a freed uid is reused as late as possible), refuse a range that a
host account, group or subordinate-id range (``/etc/subuid``) already uses, size the VM from its apps (rkt's rule)
and refuse a pod that asks for more than the operator's ``[pods]`` caps, and derive the cgroup limits the backend
enforces (memory = guest RAM + a measured margin, a pids limit, a CPU quota from the apps' CPU isolators). The
result is a ``JailSpec`` handed to the stage1 backend, recorded in the pod and measured. Pure apart from
``check_host_ids`` (reads the account files) and the lease table.

Trust boundary: the pod manifest and image isolators are untrusted requests; the operator's config caps them,
and nothing is silently granted beyond a cap (the pod is refused).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kvmrkt.config import JailConfig, PodsConfig, RuntimeConfig, Stage1Config, parse_uid_range
from kvmrkt.errors import ConfigError, JailError, LimitError
from kvmrkt.net import leases
from kvmrkt.pods.manifest import PodManifest
from kvmrkt.pods.pod import Pod
from kvmrkt.stage1 import JailSpec

ID_FILES = (Path("/etc/passwd"), Path("/etc/group"), Path("/etc/subuid"), Path("/etc/subgid"))


def id_conflicts(lo: int, hi: int, files: Iterable[tuple[str, str]]) -> list[str]:
    """Host ids in ``lo..hi`` that are already somebody's: accounts and groups (``name:x:ID:...``) and
    subordinate ranges (``name:START:COUNT``, which let that user's user namespaces act as those uids)."""
    found = []
    for name, text in files:
        sub = name.endswith(("subuid", "subgid"))
        for line in text.splitlines():
            fields = line.split(":")
            try:
                if sub and len(fields) >= 3:
                    start, count = int(fields[1]), int(fields[2])
                    if start <= hi and lo <= start + count - 1:
                        found.append(f"{name}: {fields[0]} owns {start}-{start + count - 1}")
                elif not sub and len(fields) >= 3 and lo <= int(fields[2]) <= hi:
                    found.append(f"{name}: {fields[0]} is id {fields[2]}")
            except ValueError:
                continue
    return found


def check_host_ids(lo: int, hi: int) -> None:
    """Refuse a uid range that anybody on this host already uses (its pods would share an identity with them).

    Raises:
        ConfigError: naming the first conflicts.
    """
    files = []
    for path in ID_FILES:
        try:
            files.append((str(path), path.read_text()))
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot read {path} to check jail.uid_range: {exc.strerror}") from exc
    found = id_conflicts(lo, hi, files)
    if found:
        raise ConfigError(f"jail.uid_range {lo}-{hi} overlaps ids that are in use: " + "; ".join(found[:3]),
                          hint="choose a range no account, group or subordinate range uses ([jail] uid_range)")


def uids_running(lo: int, hi: int) -> set[int]:
    """The uids in ``lo..hi`` that some live process runs as (the owner of ``/proc/PID``)."""
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                uid = entry.stat().st_uid
                if lo <= uid <= hi:
                    found.add(uid)
    return found


def allocate_uid(path: Path, pod: str, live: Iterable[str] | None, uid_range: str) -> int:
    """Lease a uid (the pod's gid has the same number) unique among live pods and running processes; the search
    resumes after the last uid handed out, so a freed uid comes back only after the whole range has been used.

    Raises:
        ConfigError: a bad or conflicting range.
        JailError: every uid of the range is leased.
    """
    lo, hi = parse_uid_range(uid_range)
    check_host_ids(lo, hi)

    def choose(table: dict[str, Any]) -> int:
        # Leased here, or running as a process (a pod of another data directory, say): never shared.
        taken = {v for v in leases.used(table) if isinstance(v, int)} | uids_running(lo, hi)
        size = hi - lo + 1
        if len(taken & set(range(lo, hi + 1))) >= size:
            raise JailError(f"no free uid left in jail.uid_range {uid_range}", hint="collect exited pods (kvmrkt gc)")
        last = table.get("@last")
        start = last + 1 if isinstance(last, int) and lo <= last <= hi else lo
        for i in range(size):
            uid = lo + (start - lo + i) % size
            if uid not in taken:
                table["@last"] = uid
                return uid
        raise AssertionError("unreachable")

    uid = leases.lease(path, pod, live, choose)
    if not isinstance(uid, int) or not lo <= uid <= hi:  # the range was changed since the pod got its uid
        raise JailError(f"pod {pod} holds uid {uid}, outside jail.uid_range {uid_range}",
                        hint="remove the pod (kvmrkt rm) and prepare it again")
    return uid


def release_uid(path: Path, pod: str) -> None:
    """Free a pod's uid (gc)."""
    leases.release(path, pod)


def size_pod(manifest: PodManifest, s1: Stage1Config, caps: PodsConfig) -> tuple[int, int]:
    """rkt's sizing rule: guest memory = the apps' memory limits + the guest overhead (at least the minimum);
    vCPUs = the apps' CPU limits, 1 when no app sets one.

    Raises:
        LimitError: the pod asks for more memory or vCPUs than ``[pods]`` allows.
    """
    mem = max(sum(a.memory_mib or 0 for a in manifest.apps) + s1.memory_overhead_mib, s1.min_memory_mib)
    cpus = max(1, sum(a.cpus or 0 for a in manifest.apps))
    asks = ", ".join(f"{a.name}: {a.memory_mib or 0} MiB, {a.cpus or 0} CPUs" for a in manifest.apps)
    if mem > caps.max_memory_mib:
        raise LimitError(f"the pod needs {mem} MiB of guest memory ({asks}; + {s1.memory_overhead_mib} MiB guest "
                         f"overhead), more than this host allows ({caps.max_memory_mib} MiB)",
                         hint="lower --memory (or the image's resource/memory isolator), or raise "
                              "[pods] max_memory_mib in config.toml")
    if cpus > caps.max_vcpus:
        raise LimitError(f"the pod asks for {cpus} vCPUs ({asks}), more than this host allows ({caps.max_vcpus})",
                         hint="lower --cpu (or the image's resource/cpu isolator), or raise [pods] max_vcpus")
    return mem, cpus


def jail_spec(manifest: PodManifest, uid: int, s1: Stage1Config, caps: PodsConfig, jail: JailConfig) -> JailSpec:
    """The jail of a pod: its ids, size and cgroup limits (the CPU quota only when an app sets a CPU limit).

    Raises:
        LimitError: see ``size_pod``.
    """
    memory, vcpus = size_pod(manifest, s1, caps)
    quota = float(vcpus) if any(a.cpus for a in manifest.apps) else None
    return JailSpec(uid=uid, gid=uid, memory_mib=memory, vcpus=vcpus,
                    memory_limit_mib=memory + jail.memory_margin_mib, pids_max=jail.pids_max, cpu_quota=quota,
                    cgroup_parent=jail.cgroup_parent)


UID_ANNOTATION = "kvmrkt.jail/uid"


def _lease_file(config: RuntimeConfig) -> Path:
    return config.data_dir / "jail" / "uids.json"


def lease(config: RuntimeConfig, pod: str) -> int:
    """Lease a new pod its jail uid (see ``allocate_uid``)."""
    return allocate_uid(_lease_file(config), pod, Pod.live_uuids(config.data_dir), config.jail.uid_range)


def release(config: RuntimeConfig, pod: str) -> None:
    """Give a collected pod's uid back."""
    release_uid(_lease_file(config), pod)


def for_pod(config: RuntimeConfig, manifest: PodManifest) -> JailSpec:
    """The jail of a prepared pod, from the uid recorded in its manifest and the current config.

    Raises:
        JailError: the pod has no jail uid (prepared by an older kvmrkt).
        LimitError: it asks for more than ``[pods]`` allows (now).
    """
    value = dict(manifest.annotations).get(UID_ANNOTATION, "")
    if not value.isdigit():
        raise JailError(f"pod {manifest.uuid} has no jail uid (it was prepared by an older kvmrkt)",
                        hint="remove it and prepare it again")
    return jail_spec(manifest, int(value), config.stage1, config.pods, config.jail)
