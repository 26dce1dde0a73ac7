"""The stage0 -> stage1 contract: the interface every VM backend implements, and the backend registry.

Role: the engine talks to backends only through ``Stage1``; backends are found by name and imported lazily,
so ``import kvmrkt`` never pulls in QEMU or libvirt bindings. Trust boundary: backends receive validated
manifests and resolved paths from the engine; they own the VM process and the pod directory's runtime files
(pid, sockets, logs) but never the manifest.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Protocol

from kvmrkt.config import RuntimeConfig
from kvmrkt.errors import ConfigError
from kvmrkt.host import forked
from kvmrkt.host.forked import Pending
from kvmrkt.pods.manifest import AppSpec, PodManifest, Volume
from kvmrkt.pods.pod import Pod

BACKENDS: dict[str, str] = {
    "qemu": "stage1_kvm.qemu:QemuStage1",
    "libvirt": "stage1_kvm.libvirt:LibvirtStage1",
}
BACKEND_NAMES: tuple[str, ...] = tuple(BACKENDS)
"""The backends' names, in order (the default first): the CLI's ``--stage1`` choices come from here."""


def _nothing(_facts: dict[str, Any]) -> Pending:
    return forked.done()


@dataclass(frozen=True, slots=True)
class Nic:
    """A guest network interface and the IPv4 configuration the guest init gives it.

    ``tap`` names the tap device in ``NetworkPlan.netns`` that carries its frames (CNI networks); None means
    QEMU user-mode networking. ``routes`` are (destination, prefix length, gateway or "" for on-link).
    """

    ifname: str
    mac: str
    mtu: int
    tap: str | None
    addrs: tuple[tuple[str, int], ...] = ()
    routes: tuple[tuple[str, int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class NetworkPlan:
    """How a pod's VM is networked.

    ``mode``: none (loopback only; QEMU itself runs in a new, empty network namespace), user (QEMU user-mode
    NAT; QEMU stays in the host's namespace) or cni (QEMU runs in the pod's namespace ``netns``, a path, and
    opens the taps there). ``forwards`` are (protocol, host address, host port, guest port) for user mode.
    ``files`` are (path, content) written into every app's root (resolv.conf, hosts, hostname).
    """

    mode: str = "none"
    netns: str = ""
    nics: tuple[Nic, ...] = ()
    forwards: tuple[tuple[str, str, int, int], ...] = ()
    files: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class CgroupPlacement:
    """Where a caller (an OCI engine, through ``linux.cgroupsPath``) wants the pod's VMM, and the limits it gave.

    ``path``: absolute (relative to each hierarchy's root) or relative (to the cgroup of the process that creates
    it, as runc does); ``None`` limits are the jail's. ``join_creator``: the creating process (kvmrkt-oci's
    supervisor, the container's pid) joins too, so the whole container is where kubelet looks.
    """

    path: str
    pids_max: int | None = None  # -1: no limit
    cpu_shares: int | None = None
    cpu_quota_us: int | None = None  # -1: no quota
    cpu_period_us: int | None = None
    cpuset_cpus: str = ""
    cpuset_mems: str = ""
    join_creator: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "pids_max": self.pids_max, "cpu_shares": self.cpu_shares,
                "cpu_quota_us": self.cpu_quota_us, "cpu_period_us": self.cpu_period_us,
                "cpuset_cpus": self.cpuset_cpus, "cpuset_mems": self.cpuset_mems, "join_creator": self.join_creator}


@dataclass(frozen=True, slots=True)
class JailSpec:
    """The VMM jail stage0 decided for a pod (``kvmrkt.pods.jail``): the backend runs the VMM as ``uid``/``gid``
    without capabilities, sized ``memory_mib``/``vcpus``, in a cgroup under ``cgroup_parent`` (or where
    ``placement`` says) with these limits (``cpu_quota`` in CPUs, None: no quota)."""

    uid: int
    gid: int
    memory_mib: int
    vcpus: int
    memory_limit_mib: int
    pids_max: int
    cpu_quota: float | None = None
    cgroup_parent: str = "kvmrkt"
    placement: CgroupPlacement | None = None  # the caller's cgroup instead of <cgroup_parent>/<pod uuid>

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (recorded in the pod, measured)."""
        doc: dict[str, Any] = {"uid": self.uid, "gid": self.gid, "memory_mib": self.memory_mib,
                               "vcpus": self.vcpus,
                               "memory_limit_mib": self.memory_limit_mib, "pids_max": self.pids_max,
                               "cpu_quota": self.cpu_quota, "cgroup_parent": self.cgroup_parent}
        if self.placement is not None:
            doc["placement"] = self.placement.to_dict()
        return doc


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How to run a prepared pod (not part of the manifest: the same pod can run with other options).

    ``before_boot(facts)`` is called by the backend once the VM is fully described (facts: backend, accel,
    kernel/initrd digests, kernel command line); raising there aborts the launch. Measured launch hangs off it:
    it starts measuring and returns at once; the backend may start the VMM meanwhile, paused, and lets guest code
    run only once the returned ``Pending``'s ``wait()`` returned (it raises if the measurement failed: the VMM is
    killed, the guest never ran). ``shared_roots`` (app -> read-only): apps whose ``rootfs`` entry is a host
    directory shared over 9p (an OCI bundle's rootfs) rather than an erofs image. ``hold``: set the apps up
    but start them only when asked (``Stage1.start_held``), as the OCI runtime's create/start do.
    ``tty`` (with ``interactive``): the first app runs on a terminal in the guest, relayed over its stdin and
    stdout ports. ``shared_export``: the VM gets the pod's shared export (``stage1_kvm.export``), through which
    its ``bind``/``rbind`` volumes reach it and into which the host can bind more while it runs (a pod with such
    volumes gets it anyway). ``jail``: the VMM's identity, size and limits (the backend enforces them; it never
    runs a VMM as root).
    """

    rootfs: Mapping[str, Path]
    jail: JailSpec
    verity: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    interactive: bool = False
    accel: str = "auto"
    exec_label: str | None = None
    network: NetworkPlan = field(default_factory=NetworkPlan)
    shared_roots: Mapping[str, bool] = field(default_factory=dict)
    hold: bool = False
    tty: bool = False
    shared_export: bool = False
    before_boot: Callable[[dict[str, Any]], Pending] = _nothing


@dataclass(frozen=True, slots=True)
class EnterOptions:
    """How to run a command in a running app. ``stdin``: a file descriptor copied to it until EOF; ``tty``: run it
    on a terminal in the guest; ``forward_signals``: signals to the calling process that are passed on to it;
    ``env``/``cwd``/``uid``/``gid``: instead of the app's (None: the app's)."""

    stdin: int | None = None
    tty: bool = False
    forward_signals: tuple[int, ...] = ()
    env: tuple[str, ...] | None = None
    cwd: str | None = None
    uid: int | None = None
    gid: int | None = None


PLAIN_ENTER = EnterOptions()


@dataclass(frozen=True, slots=True)
class RunResult:
    """What the pod's apps did: exit codes by app name, in app order."""

    exit_codes: dict[str, int] = field(default_factory=dict)
    stopped: bool = False
    integrity_failures: tuple[str, ...] = ()


@dataclass
class GuestState:
    """What a pod's guest has reported so far (as the backend believes it): ``ready`` (the guest init is up),
    ``held`` (a held start waits for ``start_held``), ``done`` (every app reported its exit), ``fatal`` (the
    init failed), and per app its pid (started) and exit code (ended)."""

    ready: bool = False
    held: bool = False
    done: bool = False
    fatal: str | None = None
    pids: dict[str, int] = field(default_factory=dict)
    exits: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BackendStatus:
    """Backend facts about a pod, read from its directory: the VMM (``pid``, ``started``, ``accel``, size,
    ``kernel``), what the guest reported (``guest_ready``, per app pids, exit codes, ERROR lines), integrity
    failures seen on the console, the jail as it is now, and ``extra`` facts of the hypervisor (libvirt:
    ``domain``, ``uri``). Values come from kvmrkt's own records, never from the guest unparsed."""

    backend: str
    accel: str | None = None
    pid: int | None = None
    started: float | None = None
    memory_mib: int | None = None
    vcpus: int | None = None
    kernel: Mapping[str, Any] | None = None
    guest_ready: bool = False
    app_pids: Mapping[str, int] = field(default_factory=dict)
    app_exit_codes: Mapping[str, int] = field(default_factory=dict)
    app_errors: Mapping[str, list[str]] = field(default_factory=dict)
    integrity_failures: tuple[str, ...] = ()
    jail: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: these keys in this order, then the ``extra`` ones."""
        return {
            "backend": self.backend, "accel": self.accel, "pid": self.pid, "started": self.started,
            "memory_mib": self.memory_mib, "vcpus": self.vcpus, "kernel": self.kernel,
            "guest_ready": self.guest_ready, "app_pids": dict(self.app_pids),
            "app_exit_codes": dict(self.app_exit_codes), "app_errors": dict(self.app_errors),
            "integrity_failures": list(self.integrity_failures), "jail": self.jail, **self.extra,
        }


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """A container created inside a running pod's VM (a Kubernetes pod's app container in its sandbox VM).

    ``name``: its name in the guest (``[a-z0-9-]{1,40}``, unique in the VM); ``app``: what it runs and its
    confinement (its mounts name ``volumes``, which are named after it); ``rootfs``: a host directory (the
    engine's), its root, read-only when ``read_only``; ``join``: the pod app whose IPC and UTS namespaces it
    shares, and whose ``/dev/shm`` it sees (Kubernetes: the sandbox's); None: namespaces of its own."""

    name: str
    app: AppSpec
    rootfs: Path
    read_only: bool = False
    volumes: tuple[Volume, ...] = ()
    join: str | None = None


class ContainerSession(Protocol):
    """A created container, held until ``go``; the session lives as long as the container (closing it, or the
    process holding it dying, kills the container)."""

    def go(self) -> int:
        """Start it; returns its init's pid in the guest."""

    def signal(self, signum: int) -> None:
        """Deliver ``signum`` (before ``go``: ends it with 128 + ``signum``)."""

    def winsize(self, rows: int, cols: int) -> None:
        """Resize its terminal."""

    def pump_input(self, fd: int) -> None:
        """Copy ``fd`` to its stdin until EOF (a thread)."""

    def relay(self, stdout: IO[bytes], stderr: IO[bytes]) -> int:
        """Copy its output until it ends; returns its exit code."""

    def close(self) -> None:
        """End the session."""


class Stage1(ABC):
    """A VM backend. Every method may be called by a different kvmrkt process than the one that ran the pod."""

    name: ClassVar[str]
    interface_version: ClassVar[int] = 1
    # Network modes this backend can run, and whether it can forward ports in user mode.
    network_modes: ClassVar[frozenset[str]] = frozenset({"none", "user", "cni"})
    user_port_forwards: ClassVar[bool] = True

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config

    @abstractmethod
    def run(
        self, pod: Pod, manifest: PodManifest, opts: RunOptions, *, stdout: IO[bytes], stderr: IO[bytes]
    ) -> RunResult:
        """Boot the VM for a pod in the ``run`` phase that this process holds locked; return when it ends.

        The lock fd must stay held by the VM for its whole life, so a killed stage0 leaves an exited pod.
        """

    @abstractmethod
    def stop(self, pod: Pod, *, force: bool) -> None:
        """Ask the apps to stop (SIGTERM, then SIGKILL after the configured timeout), or kill the VM (the hard
        kill of ``kvmrkt.pods.stopping``); callers escalate from one to the other with ``kvmrkt.pods.stopping``."""

    @abstractmethod
    def enter(
        self, pod: Pod, manifest: PodManifest, app: str, argv: list[str], *, stdout: IO[bytes], stderr: IO[bytes],
        opts: EnterOptions = PLAIN_ENTER,
    ) -> int:
        """Run argv inside an app of a running pod through the guest agent; return its exit code."""

    @abstractmethod
    def status(self, pod: Pod) -> BackendStatus:
        """Backend facts about a pod (pid, accel, per-app exit codes), read from the pod directory."""

    @abstractmethod
    def gc(self, pod: Pod) -> None:
        """Clean up what the backend left for an exited pod (idempotent; safe on half-created pods)."""

    # Operations of a running pod (kvmrkt-oci drives containers through these, and nothing else).

    @abstractmethod
    def guest_state(self, pod: Pod) -> GuestState:
        """What the guest has reported so far (cheap: called in polling loops)."""

    @abstractmethod
    def start_held(self, pod: Pod) -> None:
        """Let a pod run with ``RunOptions.hold`` start its app (the guest reported ``held``)."""

    @abstractmethod
    def signal(self, pod: Pod, signum: int, *, every_process: bool = False) -> None:
        """Deliver ``signum`` to the apps of a running pod (``every_process``: to all of their processes); before
        a held start, ends the pod."""

    @abstractmethod
    def resize(self, pod: Pod, rows: int, cols: int) -> None:
        """Set the size of the terminal of a pod run with ``RunOptions.tty``."""

    # Containers inside a running pod's VM (a backend without them refuses).

    def add_container(self, pod: Pod, spec: ContainerSpec) -> None:
        """Make a container's root, volumes and configuration reach the running VM (nothing runs yet).

        Raises:
            ConfigError: this backend cannot (the default).
        """
        raise ConfigError(f"the {self.name} backend cannot create containers inside a running pod")

    def open_container(self, pod: Pod, name: str, *, tty: bool, stdin: bool) -> ContainerSession:
        """Create the container ``add_container`` described and hold it (``ContainerSession.go`` starts it).

        Raises:
            ConfigError: this backend cannot (the default).
        """
        raise ConfigError(f"the {self.name} backend cannot create containers inside a running pod")

    def remove_container(self, pod: Pod, name: str) -> None:  # noqa: B027 (nothing to undo without containers)
        """Undo ``add_container`` once the container has ended (idempotent)."""


def load_backend(name: str, config: RuntimeConfig) -> Stage1:
    """Instantiate the backend registered under ``name``.

    Raises:
        ConfigError: unknown backend, or its module cannot be imported.
    """
    target = BACKENDS.get(name)
    if target is None:
        raise ConfigError(f"unknown stage1 backend {name!r}", hint="available: " + ", ".join(sorted(BACKENDS)))
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"stage1 backend {name!r} is not available: {exc}") from exc
    cls: type[Stage1] = getattr(module, cls_name)
    return cls(config)
