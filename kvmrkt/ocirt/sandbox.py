"""Containers of a Kubernetes pod inside its sandbox's VM (Kata's model): what kvmrkt-oci does for a bundle whose
CRI annotations say ``container`` and name a sandbox that kvmrkt-oci booted.

Role: map such a bundle to a ``ContainerSpec`` (its own guest name, its volumes named after it, its confinement,
the sandbox's app as the one whose network, IPC, UTS and ``/dev/shm`` it shares), check that the namespaces it
asks to share are its sandbox's, and run its *holder*: the host process whose pid is the container's for
containerd (``--pid-file``), which holds the container's session with the guest agent for the container's life,
waits on ``exec.fifo`` for ``start`` (runc's mechanism), passes on the signals it gets, copies the container's
output to its own stdio (the shim's pipes or terminal), and exits with the container's status. Its state dir
records ``started`` and ``exit``.

Trust boundary: the bundle is hostile input, parsed by ``bundle``; what the guest reports is read through the
agent client, bounded; the holder never interprets the container's output. A namespace path that is not the
sandbox's is refused, as kvmrkt never rewires or joins anything it cannot prove is the pod's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import select
import signal
import stat
import sys
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from kvmrkt.errors import AgentError, ConfigError, KvmrktError, ManifestError
from kvmrkt.host import proc as _proc
from kvmrkt.ocirt.bundle import CRI_TYPE, Bundle
from kvmrkt.pods.confinement import lift
from kvmrkt.pods.manifest import AppSpec, MountPoint, Volume
from kvmrkt.stage1 import ContainerSession, ContainerSpec
from stage1_kvm.agent import terminal_size

EXEC_FIFO = "exec.fifo"
STARTED = "started"
EXIT = "exit"
# Signals the holder passes on to the container (SIGKILL and SIGSTOP cannot be caught: SIGKILL ends the holder,
# and with it the session, so the guest kills the container; SIGCHLD is the holder's own).
UNFORWARDED = frozenset({signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, signal.SIGWINCH})


def guest_name(cid: str) -> str:
    """The container's name in the guest (its app name there): short, fixed by its id."""
    return "c" + hashlib.sha256(cid.encode()).hexdigest()[:20]


PROC_NS = re.compile(r"/proc/([0-9]{1,10})/ns/[a-z]+")
NS_FILES = {"network": "net", "ipc": "ipc", "uts": "uts", "cgroup": "cgroup"}


def named_pids(bundle: Bundle) -> set[int]:
    """The pids whose namespaces the bundle names (``/proc/<pid>/ns/<type>``): a pod's containers name their
    sandbox's init (for kvmrkt-oci, the sandbox's supervisor on the host)."""
    return {int(m.group(1)) for _, path in bundle.joined if (m := PROC_NS.fullmatch(os.path.normpath(path)))}


# A Kubernetes pod asks for the node's namespace by leaving its type out of linux.namespaces (CRI's NODE mode).
HOST_FIELDS = {"network": "hostNetwork", "ipc": "hostIPC", "pid": "hostPID", "uts": "hostNetwork (the node's "
               "hostname)", "mount": "the node's mount namespace"}


def check_cri_namespaces(bundle: Bundle) -> None:
    """A CRI sandbox or container that leaves a namespace type out asks for the node's (``hostNetwork``,
    ``hostIPC``, ``hostPID``): a VM cannot share the host's, and giving the pod's instead would silently ignore
    what was asked.

    Raises:
        ManifestError: such a namespace is missing.
    """
    if bundle.annotations.get(CRI_TYPE) not in ("sandbox", "container"):
        return
    for kind, field in HOST_FIELDS.items():
        if kind not in bundle.namespaces:
            raise ManifestError(f"config.json: no {kind} namespace: the pod asks for {field}, and a pod in a VM "
                                "cannot share the node's", hint="run such pods with a runtime class that does "
                                                                "not use VMs (runc)")


def check_standalone(bundle: Bundle) -> None:
    """A container with a VM of its own can join a network namespace (its VM is plugged into it) and nothing else.

    Raises:
        ManifestError: it names an IPC, UTS or cgroup namespace (of no kvmrkt-oci pod).
    """
    for kind, path in bundle.joined:
        if kind != "network":
            raise ManifestError(f"config.json: the {kind} namespace at {path} cannot be joined: it is no kvmrkt-oci "
                                "pod's, and a container inside a VM can share only the namespaces of the pod VM it "
                                "runs in", hint="a container of a pod names its sandbox's namespaces "
                                                "(/proc/<sandbox pid>/ns/...)")


def check_joined(bundle: Bundle, sandbox_pid: int, sandbox_netns: str = "") -> None:
    """The namespaces a pod's container shares must be its sandbox's: ``/proc/<sandbox pid>/ns/<type>``
    (containerd and podman name the sandbox's init, which for kvmrkt-oci is the sandbox's supervisor on the
    host), or for the network the namespace the sandbox's VM was plugged into.

    Raises:
        ManifestError: a path names anything else (another pod's, the node's).
    """
    for kind, path in bundle.joined:
        mine = f"/proc/{sandbox_pid}/ns/{NS_FILES[kind]}"
        if os.path.normpath(path) != mine and not (kind == "network" and sandbox_netns and path == sandbox_netns):
            raise ManifestError(f"config.json: the {kind} namespace {path} is not the sandbox's ({mine}): a "
                                "container of a pod shares its sandbox's VM and nothing else")


def container_spec(bundle: Bundle, name: str, insecure: frozenset[str], join: str) -> ContainerSpec:
    """The bundle as a container named ``name`` in the sandbox's VM, sharing ``join``'s namespaces."""
    volumes = tuple(replace(v, name=f"{name}-{v.name}") for v in bundle.volumes)
    mounts = tuple(MountPoint(f"{name}-{m.volume}", m.target) for m in bundle.mounts)
    app = AppSpec(
        name=name, image_id=bundle.image_id, image_name=bundle.image_name, rootfs_digest="", exec=bundle.args,
        env=bundle.env, working_dir=bundle.cwd, user=str(bundle.uid), group=str(bundle.gid), uid=bundle.uid,
        gid=bundle.gid, supplementary_gids=bundle.gids, mounts=mounts, confinement=lift(bundle.confinement, insecure),
    )  # fmt: skip
    return ContainerSpec(name=name, app=app, rootfs=bundle.rootfs, read_only=bundle.readonly,
                         volumes=tuple(Volume(v.name, v.kind, v.source, v.read_only) for v in volumes), join=join)


def measured_app(bundle: Bundle, app: str, verdict: dict[str, Any]) -> dict[str, Any]:
    """An OCI bundle's app as its measurement event records it."""
    return {"app": app, "image": bundle.image_name, "config": bundle.config_digest, "bundle": str(bundle.path),
            "rootfs": f"dir:{bundle.rootfs}", **{k: verdict[k] for k in ("scope", "signers", "insecure",
                                                                         "dependencies")}}


def make_fifo(state_dir: Path) -> None:
    os.mkfifo(state_dir / EXEC_FIFO, 0o600)


def status(state_dir: Path, pid: int, cid: str) -> str:
    """created, running or stopped, from the holder's records and whether it is alive (by pid, and its command
    line naming the container: the pid may have been reused)."""
    if (state_dir / EXIT).exists() or not (_proc.pid_alive(pid) and cid in " ".join(_proc.pid_cmdline(pid))):
        return "stopped"
    return "running" if (state_dir / STARTED).exists() else "created"


def release(state_dir: Path, timeout: float) -> None:
    """``start``: open ``exec.fifo`` for reading, which lets the holder (blocked opening it for writing) go on,
    and wait for its byte.

    Raises:
        ConfigError: the holder did not answer in time (it ended meanwhile).
    """
    fifo = state_dir / EXEC_FIFO
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise ConfigError(f"{fifo} is not the container's start fifo")
        readable, _, _ = select.select([fd], [], [], timeout)
        if not readable or not os.read(fd, 1):
            raise ConfigError("the container's holder did not take the start (it ended meanwhile)")
    finally:
        os.close(fd)


class _Ended(Exception):
    """A signal ended the container while it was held."""


def hold(session: ContainerSession, state_dir: Path, *, tty: bool, report: int) -> int:
    """The holder's body, once the guest holds the container: report ``HELD`` on ``report`` (the creating
    process waits for it), wait for ``start`` on ``exec.fifo`` while passing signals on, start the container,
    copy its stdin and output, record its exit, return its status. Runs in the forked holder process."""
    started = False

    def forward(signum: int, _frame: object) -> None:
        session.signal(signum)
        if not started:
            raise _Ended  # the guest ends a held container with 128 + signum: out of the fifo wait

    for s in signal.valid_signals():
        if s not in UNFORWARDED:
            with contextlib.suppress(OSError, ValueError):
                signal.signal(s, forward)
    if tty:
        def resize(*_a: object) -> None:
            with contextlib.suppress(OSError, AgentError):
                session.winsize(*terminal_size(0))

        signal.signal(signal.SIGWINCH, resize)
    os.write(report, b"HELD\n")
    os.close(report)
    stdout: IO[bytes] = sys.stdout.buffer
    stderr: IO[bytes] = sys.stderr.buffer
    try:
        try:
            fd = os.open(state_dir / EXEC_FIFO, os.O_WRONLY | os.O_CLOEXEC)  # blocks until `start` opens it
            os.write(fd, b"0")
            os.close(fd)
            started = True
            (state_dir / STARTED).write_text(str(session.go()))
            if tty:
                resize()
            session.pump_input(0)
        except _Ended:
            pass
        code = session.relay(stdout, stderr)
    except (KvmrktError, OSError) as exc:
        with contextlib.suppress(OSError):
            stderr.write(f"kvmrkt-oci: the container's session ended: {exc}\n".encode())
            stderr.flush()
        code = 137
    finally:
        session.close()
    (state_dir / EXIT).write_text(str(code))
    return code
