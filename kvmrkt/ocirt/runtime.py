"""The OCI runtime (runc's command-line contract, as containerd's runc shim and podman's conmon drive it) on top
of kvmrkt pods: ``kvmrkt-oci create|start|state|kill|delete|exec|ps|features``.

Role: turn an OCI bundle (``config.json`` + rootfs) into a one-app kvmrkt pod whose root is the bundle's rootfs
shared into the VM over 9p (no copy), and split its life as runc does: ``create`` boots the VM and sets the
process up but holds it, leaving one host process (the *supervisor*, whose pid goes to ``--pid-file`` and whose
exit status is the container process's); ``start`` releases it; ``kill`` signals it inside the guest;
``delete`` removes what is left. runc-style state lives under ``--root``/kvmrkt-oci/ID.

Trust boundary: the bundle comes from the engine that pulled and unpacked the image (containerd, podman), which
is where image signatures are checked; kvmrkt records the app as not judged (``admission.bundle_verdict``: scope
``(oci bundle: not judged)``, insecure; attestation refuses it unless its reference allows unjudged bundles) and
measures ``config.json``'s digest, the bundle path, the image name from the annotations and the VM assets.
``config.json`` is parsed strictly (an error names the field); the process's confinement (capabilities,
noNewPrivileges, rlimits, seccomp, maskedPaths, readonlyPaths) is applied to the container inside the guest
(``kvmrkt.pods.confinement``); Linux namespace and cgroup settings describe a container on the host and are ignored
(each container has a VM, and the VM's jail has the limits).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import sys
import termios
import threading
import time
import tty
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvmrkt import jsondoc
from kvmrkt.engine import Engine
from kvmrkt.errors import ConfigError, KvmrktError, ManifestError, PodStateError, Stage1Error
from kvmrkt.host import proc as _proc
from kvmrkt.host.files import write_atomic, write_json
from kvmrkt.host.wait import Deadline, wait_until
from kvmrkt.net.network import Intent
from kvmrkt.pods.confinement import DEFAULT as DEFAULT_CONFINEMENT
from kvmrkt.pods.confinement import Confinement, from_oci, lift
from kvmrkt.pods.launch import LaunchRequest, pod_exit_code
from kvmrkt.pods.manifest import AppSpec, MountPoint, PodManifest, Volume
from kvmrkt.pods.pod import Pod
from kvmrkt.pods.records import TRUST
from kvmrkt.stage1 import PLAIN_ENTER, EnterOptions, Stage1
from kvmrkt.trust.admission import bundle_verdict

OCI_VERSION = "1.0.2"
APP = "container"
STATE_DIR = "kvmrkt-oci"
# Mounts the guest init gives every app itself (proc, sysfs, devtmpfs, devpts, shm); cgroup and mqueue have no
# use in a one-container VM.
GUEST_MOUNTS = frozenset({"/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys/fs/cgroup"})
# Annotations that name the image (CRI, then the OCI image spec's).
IMAGE_ANNOTATIONS = ("io.kubernetes.cri.image-name", "org.opencontainers.image.ref.name")
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
    confinement: Confinement = DEFAULT_CONFINEMENT

    @property
    def image_name(self) -> str:
        return next((self.annotations[k] for k in IMAGE_ANNOTATIONS if self.annotations.get(k)), "oci-bundle")

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
    volumes, mounts, ignored = _mounts(_get(doc, "mounts", list, "", []))
    linux = _get(doc, "linux", dict, "", {})
    res = _get(linux, "resources", dict, "linux.", {})
    memory = _get(res, "memory", dict, "linux.resources.", {})
    limit = _get(memory, "limit", int, "linux.resources.memory.", None)
    cpu = _get(res, "cpu", dict, "linux.resources.", {})
    quota, period = _get(cpu, "quota", int, "linux.resources.cpu.", None), _get(cpu, "period", int, "", None)
    netns = ""
    for ns in _get(linux, "namespaces", list, "linux.", []):
        if isinstance(ns, dict) and ns.get("type") == "network" and isinstance(ns.get("path"), str):
            netns = ns["path"]
    annotations = _get(doc, "annotations", dict, "", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise ManifestError("config.json: annotations must map strings to strings")
    return Bundle(
        path=path, config_digest="sha256:" + hashlib.sha256(raw).hexdigest(), args=tuple(args), env=tuple(env),
        cwd=cwd, uid=uid, gid=gid, gids=tuple(gids), terminal=bool(_get(proc, "terminal", bool, "process.", False)),
        rootfs=rootfs, readonly=bool(_get(root, "readonly", bool, "root.", False)),
        hostname=_get(doc, "hostname", str, "", ""), volumes=volumes, mounts=mounts,
        memory_mib=math.ceil(limit / (1 << 20)) if limit and limit > 0 else None,
        cpus=math.ceil(quota / period) if quota and period and quota > 0 and period > 0 else None,
        annotations=dict(annotations), ignored=ignored, confinement=from_oci(proc, linux, ()),
        # A CRI pod's sandbox (pause) container needs no VM network: the pod's containers take the namespace.
        netns="" if annotations.get("io.kubernetes.cri.container-type") == "sandbox" else netns,
    )  # fmt: skip


def _mounts(entries: list[Any]) -> tuple[tuple[Volume, ...], tuple[MountPoint, ...], tuple[str, ...]]:
    """OCI mounts as pod volumes: tmpfs -> an empty (guest memory) volume; a bind mount of a host directory
    -> a host volume shared over 9p; the guest's own API filesystems are provided anyway. Anything else
    (bind-mounted files, other filesystem types) cannot reach a VM this way and is listed as ignored."""
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
        elif (kind == "bind" or "bind" in options or "rbind" in options) and Path(source).is_dir():
            volumes.append(Volume(name, "host", source, read_only="ro" in options))
        else:
            ignored.append(f"{dest} ({kind or 'bind'} of {source or 'nothing'})")
            continue
        mounts.append(MountPoint(name, dest))
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


class OciRuntime:
    """The runc contract over kvmrkt pods; state under ``root``."""

    def __init__(self, root: Path, engine: Engine) -> None:
        self.root = root / STATE_DIR
        self.engine = engine

    # --- state --------------------------------------------------------------------------------------

    def _dir(self, cid: str) -> Path:
        if not cid or "/" in cid or cid in (".", "..") or len(cid) > 1024:
            raise ConfigError(f"invalid container id {cid[:80]!r}")
        return self.root / cid

    def _record(self, cid: str) -> dict[str, Any]:
        try:
            doc = json.loads((self._dir(cid) / "state.json").read_text())
        except FileNotFoundError:
            raise PodStateError(f"container {cid!r} does not exist", state="unknown") from None
        except (OSError, ValueError) as exc:
            raise PodStateError(f"container {cid!r}: unreadable state ({exc})", state="unknown") from None
        return dict(doc)

    def _pod(self, rec: dict[str, Any]) -> Pod | None:
        try:
            return Pod.find(self.engine.config.data_dir, rec["pod"])
        except KvmrktError:
            return None

    def _status(self, rec: dict[str, Any]) -> str:
        pod = self._pod(rec)
        if pod is None or not _proc.pid_alive(int(rec["pid"])):
            return "stopped"
        st = self.engine.backend_for(pod).guest_state(pod)
        if APP in st.exits or st.fatal:
            return "stopped"
        if APP in st.pids:
            return "running"
        return "created" if st.held else "creating"

    def state(self, cid: str) -> dict[str, Any]:
        """The runtime-spec state of a container."""
        rec = self._record(cid)
        status = self._status(rec)
        return {"ociVersion": OCI_VERSION, "id": cid, "status": status,
                "pid": int(rec["pid"]) if status != "stopped" else 0, "bundle": rec["bundle"],
                "annotations": rec.get("annotations", {}), "created": rec.get("created"), "pod": rec["pod"]}

    def containers(self) -> list[dict[str, Any]]:
        if not self.root.is_dir():
            return []
        return [self.state(d.name) for d in sorted(self.root.iterdir()) if (d / "state.json").exists()]

    # --- create / start ------------------------------------------------------------------------------

    def create(self, cid: str, bundle_dir: Path, pid_file: Path | None, *, console_socket: Path | None = None) -> int:
        """Boot the container's VM with its process set up and held; returns the supervisor's pid (also written
        to ``pid_file``). The supervisor inherits this process's stdio, which becomes the container's.

        Raises:
            ConfigError: the id exists or is invalid; a terminal was asked for (not supported yet).
            ManifestError: a bad bundle.
            Stage1Error: the VM did not come up (the supervisor's reason is in the message).
        """
        state_dir = self._dir(cid)
        bundle = load_bundle(bundle_dir.resolve())
        if bundle.terminal != (console_socket is not None):
            raise ConfigError("process.terminal needs --console-socket, and --console-socket needs a terminal")
        try:
            state_dir.mkdir(parents=True, mode=0o700)
        except FileExistsError:
            raise ConfigError(f"container {cid!r} already exists") from None
        try:
            for item in bundle.ignored:
                self.engine.warn(f"mount {item} is not supported in a VM and was ignored")
            insecure = self.engine.config.insecure_options
            pod = self.engine.new_pod(lambda uuid: manifest_for(bundle, uuid, cid, insecure),
                                      lambda _m: {APP: bundle_verdict(bundle.image_id, bundle.image_name)},
                                      keep_lock=True)
            pid = self._spawn_supervisor(pod, bundle, console_socket)
            write_json(state_dir / "state.json", {
                "id": cid, "bundle": str(bundle.path), "pod": pod.uuid, "pid": pid, "annotations": bundle.annotations,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config_digest": bundle.config_digest,
            })  # fmt: skip
            if pid_file is not None:
                write_atomic(pid_file, str(pid).encode(), mode=0o644)
            return pid
        except BaseException:
            shutil.rmtree(state_dir, ignore_errors=True)
            raise

    def _spawn_supervisor(self, pod: Pod, bundle: Bundle, console_socket: Path | None) -> int:
        """Fork the supervisor (it keeps the pod lock and runs the VM until the container process ends) and wait
        until the guest holds the process ready to start. With a console socket, the supervisor's stdio is a
        new terminal whose master end is sent to that socket (runc's protocol); the guest gives the process a
        terminal of its own and the two are relayed."""
        term = _send_terminal(console_socket) if console_socket is not None else None
        backend = self.engine.backend_for(pod)
        err_r, err_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the supervisor; containerd's shim (a subreaper) becomes its parent when create exits
            os.close(err_r)
            if term is not None:
                _take_terminal(term)
                signal.signal(signal.SIGWINCH, lambda _s, _f: threading.Thread(
                    target=_relay_size, args=(pod, backend), daemon=True).start())
            os._exit(self._supervise(pod, bundle, err_w))
        os.close(err_w)
        if term is not None:
            os.close(term)
        pod.unlock()  # the supervisor holds the same lock (flock belongs to the shared open file)
        deadline = Deadline(self.engine.config.stage1.boot_timeout + 30)
        while True:
            done, wstatus = os.waitpid(pid, os.WNOHANG)
            if done:
                with os.fdopen(err_r) as fh:
                    reason = fh.read().strip()
                self._remove_pod(pod)
                raise Stage1Error(f"the container's VM did not start: {reason or f'status {wstatus}'}")
            pod.refresh()  # the supervisor moves it to the run phase
            if backend.guest_state(pod).held:
                os.close(err_r)
                return pid
            if deadline.expired():
                os.kill(pid, signal.SIGKILL)  # our own child; its QEMU dies with it
                os.waitpid(pid, 0)
                os.close(err_r)
                self._remove_pod(pod)
                raise Stage1Error("the container's VM did not get ready in time")
            time.sleep(0.01)

    def _supervise(self, pod: Pod, bundle: Bundle, err_fd: int) -> int:
        """The supervisor's body: run the pod (measured, labelled) and exit with the process's status."""
        try:
            manifest = self.engine.pod_manifest(pod)
            backend = self.engine.backend_for(pod)
            verdict = bundle_verdict(bundle.image_id, bundle.image_name)
            measured = [{"app": APP, "image": bundle.image_name, "config": bundle.config_digest,
                         "bundle": str(bundle.path), "rootfs": f"dir:{bundle.rootfs}",
                         **{k: verdict[k] for k in ("scope", "signers", "insecure", "dependencies")}}]
            # The rootfs is the engine's (and may be read-only): kvmrkt writes no hostname/hosts files into it.
            intent = Intent("join", netns=bundle.netns) if bundle.netns else Intent("none", files=False)
            request = LaunchRequest(rootfs={APP: bundle.rootfs}, shared_roots={APP: bundle.readonly},
                                    interactive=True, hold=True, tty=bundle.terminal, measured_apps=measured,
                                    accel=self.engine.config.stage1.accel)
            result = self.engine.boot(pod, manifest, backend, request, trust=pod.read_json(TRUST) or {},
                                      intent=intent, stdout=sys.stdout.buffer, stderr=sys.stderr.buffer)
            return pod_exit_code(result.exit_codes) if result.exit_codes else 137
        except BaseException as exc:  # the parent reports it; nothing else can
            msg = exc.diagnostics() if isinstance(exc, KvmrktError) else f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):
                os.write(err_fd, msg.encode()[:65536])
            return 125

    def start(self, cid: str) -> None:
        """Start the held process.

        Raises:
            PodStateError: the container is not in the created state.
        """
        rec = self._record(cid)
        status = self._status(rec)
        if status != "created":
            raise PodStateError(f"container {cid!r} is {status}, not created", state=status)
        pod = self._pod(rec)
        assert pod is not None
        self.engine.backend_for(pod).start_held(pod)
        wait_until(lambda: self._status(rec) != "created", timeout=30, interval=0.005)

    # --- kill / delete -------------------------------------------------------------------------------

    def kill(self, cid: str, signum: int, *, every_process: bool = False) -> None:
        """Deliver a signal to the container process inside the VM (before start: end the container).

        Raises:
            PodStateError: the container is not created or running.
        """
        rec = self._record(cid)
        status = self._status(rec)
        if status not in ("created", "running"):
            raise PodStateError(f"container {cid!r} is {status}: cannot signal it", state=status)
        pod = self._pod(rec)
        assert pod is not None
        self.engine.backend_for(pod).signal(pod, signum, every_process=every_process)

    def delete(self, cid: str, *, force: bool = False) -> None:
        """Remove a stopped (or created) container; ``force`` stops a running one first (SIGKILL).

        Raises:
            PodStateError: the container is running and ``force`` was not given.
        """
        rec = self._record(cid)
        status = self._status(rec)
        if status == "running" and not force:
            raise PodStateError(f"container {cid!r} is running", state=status, hint="stop it, or use --force")
        pid = int(rec["pid"])
        if status != "stopped":
            with contextlib.suppress(KvmrktError):
                self.kill(cid, signal.SIGKILL)
            self._wait_gone(pid, 10)
        if _proc.pid_alive(pid) and cid in " ".join(_proc.pid_cmdline(pid)):
            os.kill(pid, signal.SIGKILL)  # our supervisor (its command line names this container)
            self._wait_gone(pid, 10)
        pod = self._pod(rec)
        if pod is not None:
            self._remove_pod(pod)
        shutil.rmtree(self._dir(cid))

    @staticmethod
    def _wait_gone(pid: int, timeout: float) -> None:
        wait_until(lambda: not _proc.pid_alive(pid), timeout=timeout, interval=0.01)

    def _remove_pod(self, pod: Pod, timeout: float = 10) -> None:
        """Remove the pod once its VM is gone (QEMU dies with the supervisor, a moment after it)."""
        def unlocked() -> bool:
            pod.refresh()
            return not pod.is_locked()

        wait_until(unlocked, timeout=timeout, interval=0.01)
        self.engine.remove(pod.uuid)

    # --- exec / ps -----------------------------------------------------------------------------------

    def exec(self, cid: str, args: list[str], *, detach: bool, pid_file: Path | None,
             console_socket: Path | None = None, process: EnterOptions = PLAIN_ENTER) -> int:
        """Run another process in the container's VM (through the guest agent, in the container's root, with
        this process's stdin; with ``console_socket``, on a terminal whose master is sent there; ``process``:
        its env/cwd/uid/gid when not the container's). Returns its exit status, or 0 at once with ``detach``:
        its host-side pid goes to ``pid_file``, and that process exits with the guest process's status and
        passes the usual signals on to it.

        Raises:
            PodStateError: the container is not running.
            ConfigError: no arguments.
        """
        rec = self._record(cid)
        status = self._status(rec)
        if status != "running":
            raise PodStateError(f"container {cid!r} is {status}, not running", state=status)
        if not args:
            raise ConfigError("exec: no process arguments")
        pod = self._pod(rec)
        assert pod is not None
        manifest = self.engine.pod_manifest(pod)
        backend = self.engine.backend_for(pod)
        term = _send_terminal(console_socket) if console_socket is not None else None
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 126
            try:
                if term is not None:
                    _take_terminal(term)
                opts = replace(process, stdin=0, tty=term is not None, forward_signals=FORWARDED_SIGNALS)
                code = backend.enter(pod, manifest, APP, args, stdout=sys.stdout.buffer, stderr=sys.stderr.buffer,
                                     opts=opts)
            except BaseException as exc:  # reported on the exec's stderr
                with contextlib.suppress(OSError):
                    sys.stderr.write(f"kvmrkt-oci exec: {exc}\n")
                    sys.stderr.flush()
            os._exit(code)
        if term is not None:
            os.close(term)
        if pid_file is not None:
            write_atomic(pid_file, str(pid).encode(), mode=0o644)
        if detach:
            return 0
        _, wstatus = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(wstatus)

    def ps(self, cid: str) -> list[int]:
        """Host pids of the container (the supervisor; the guest's processes are not host processes)."""
        st = self.state(cid)
        return [st["pid"]] if st["pid"] else []


def _relay_size(pod: Pod, backend: Stage1) -> None:
    """Pass this process's terminal size on to the container's terminal in the guest (from a thread: the
    agent channel's lock may be held by the code the signal interrupted)."""
    with contextlib.suppress(OSError, KvmrktError):
        cols, rows = os.get_terminal_size(0)
        pod.refresh()
        backend.resize(pod, rows, cols)


def _take_terminal(term: int) -> None:
    """In a forked child: make ``term`` its stdio and controlling terminal (a new session), so the engine's
    resizes of the terminal reach it as SIGWINCH."""
    for fd in (0, 1, 2):
        os.dup2(term, fd)
    os.close(term)
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _send_terminal(console_socket: Path) -> int:
    """Open a new pseudo-terminal, send its master to ``console_socket`` (SCM_RIGHTS, with the terminal's name as
    the message, as runc does) and return the slave, in raw mode: line discipline happens on the guest's own
    terminal.

    Raises:
        ConfigError: the socket cannot be reached.
    """
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(console_socket))
            socket.send_fds(sock, [os.ttyname(slave).encode()], [master])
    except OSError as exc:
        os.close(slave)
        raise ConfigError(f"cannot send the terminal to --console-socket {console_socket}: {exc}") from None
    finally:
        os.close(master)
    return slave


def features() -> dict[str, Any]:
    """``kvmrkt-oci features`` (runtime-spec features.json)."""
    return {
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        "hooks": [],
        "mountOptions": ["bind", "rbind", "ro", "rw"],
        "linux": {"namespaces": [], "capabilities": [], "cgroup": {"v1": False, "v2": False, "systemd": False},
                  "seccomp": {"enabled": False}, "apparmor": {"enabled": False}, "selinux": {"enabled": True}},
        "annotations": {"io.kvmrkt.runtime": "vm", "io.kvmrkt.rootfs-sharing": "9p"},
    }
