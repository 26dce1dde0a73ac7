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
(``kvmrkt.pods.confinement``); ``linux.cgroupsPath`` places the supervisor and its VMM, with the bundle's pids and
CPU limits (``kvmrkt.ocirt.cgroupspec``); a namespace path is refused but for the network namespace the VM is
plugged into (``kvmrkt.net.nsguard`` checks it is the pod's own).

Kubernetes pods (containerd's CRI annotations): the sandbox container boots the pod's VM, in the pod's network
namespace; every other container of the pod is created inside that VM (``kvmrkt.ocirt.sandbox``), sharing its
network, IPC, UTS and ``/dev/shm``, held by a host process of its own (its pid, signals and exit status); its
``config.json`` is measured as one more app of the pod. The VM ends with the sandbox.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvmrkt.engine import Engine
from kvmrkt.errors import ConfigError, KvmrktError, PodStateError, Stage1Error
from kvmrkt.host import proc as _proc
from kvmrkt.host.files import write_atomic, write_json
from kvmrkt.host.wait import Deadline, wait_until
from kvmrkt.net.network import Intent
from kvmrkt.ocirt import hooks, mountpoints, sandbox
from kvmrkt.ocirt.bundle import APP, FORWARDED_SIGNALS, OCI_VERSION, STATE_DIR, Bundle, load_bundle, manifest_for
from kvmrkt.pods.launch import LaunchRequest, pod_exit_code
from kvmrkt.pods.measured import measure_app_added
from kvmrkt.pods.pod import Pod
from kvmrkt.pods.records import TRUST
from kvmrkt.stage1 import PLAIN_ENTER, EnterOptions, Stage1
from kvmrkt.trust.admission import bundle_verdict


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
        if rec.get("kind") == "container":
            return sandbox.status(self._dir(str(rec["id"])), int(rec["pid"]), str(rec["id"]))
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
            mountpoints.for_bundle(bundle)
            for item in bundle.ignored:
                self.engine.warn(f"mount {item} is not supported in a VM and was ignored")
            for name in bundle.unhonoured:
                self.engine.warn(f"{name} is not honoured by a VM and was ignored")
            sandbox.check_cri_namespaces(bundle)
            box = self._sandbox_of(cid, bundle)
            if box is not None:
                pid = self._create_in_sandbox(cid, bundle, box, state_dir, console_socket)
                return self._created(cid, bundle, pid, pid_file)
            insecure = self.engine.config.insecure_options
            pod = self.engine.new_pod(lambda uuid: manifest_for(bundle, uuid, cid, insecure),
                                      lambda _m: {APP: bundle_verdict(bundle.image_id, bundle.image_name)},
                                      keep_lock=True)
            pid = self._spawn_supervisor(pod, bundle, console_socket)
            self._write_record(state_dir, cid, bundle, pod.uuid, pid, netns=bundle.netns)
        except BaseException:
            shutil.rmtree(state_dir, ignore_errors=True)
            raise
        return self._created(cid, bundle, pid, pid_file)

    def _created(self, cid: str, bundle: Bundle, pid: int, pid_file: Path | None) -> int:
        """The end of ``create``: the prestart and createRuntime hooks, then the pid file."""
        try:
            for kind in ("prestart", "createRuntime"):
                hooks.run(bundle.hooks, kind, self._hook_state(cid))
        except ConfigError:
            with contextlib.suppress(KvmrktError):  # the spec's step 9: the container is stopped and deleted
                self.delete(cid, force=True)
            raise
        if pid_file is not None:
            write_atomic(pid_file, str(pid).encode(), mode=0o644)
        return pid

    def _write_record(self, state_dir: Path, cid: str, bundle: Bundle, pod: str, pid: int, **extra: Any) -> None:
        write_json(state_dir / "state.json", {
            "id": cid, "bundle": str(bundle.path), "pod": pod, "pid": pid, "annotations": bundle.annotations,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config_digest": bundle.config_digest,
            "hooks": {k: [h.to_dict() for h in v] for k, v in bundle.hooks.items()}, **extra,
        })  # fmt: skip

    def _sandbox_of(self, cid: str, bundle: Bundle) -> dict[str, Any] | None:
        """The record of the pod VM a bundle's container belongs in: its CRI sandbox (annotations), or the
        kvmrkt-oci VM container whose supervisor's namespaces it names (a podman pod's infra container); None for
        a container with a VM of its own.

        Raises:
            ConfigError: the CRI sandbox is not a running kvmrkt-oci VM.
            ManifestError: the bundle names namespaces of no kvmrkt-oci pod, or not only its sandbox's.
        """
        sid = bundle.sandbox_id
        if sid is not None:
            try:
                box = self._record(sid)
            except (PodStateError, ConfigError):
                raise ConfigError(f"container {cid!r}: its sandbox {sid[:80]!r} is not a kvmrkt-oci container",
                                  hint="the pod's sandbox must run under the same runtime (handler)") from None
        else:
            pids = sandbox.named_pids(bundle)
            boxes = [r for r in self._records() if r.get("kind", "vm") == "vm" and int(r["pid"]) in pids] if pids \
                else []
            if not boxes:
                sandbox.check_standalone(bundle)
                return None
            box, sid = boxes[0], str(boxes[0]["id"])
        if box.get("kind", "vm") != "vm" or self._status(box) != "running":
            raise ConfigError(f"container {cid!r}: its sandbox {sid!r} is not a running pod VM")
        sandbox.check_joined(bundle, int(box["pid"]), str(box.get("netns", "")))
        return box

    def _records(self) -> list[dict[str, Any]]:
        out = []
        for d in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            with contextlib.suppress(KvmrktError):
                out.append(self._record(d.name))
        return out

    def _create_in_sandbox(self, cid: str, bundle: Bundle, box: dict[str, Any], state_dir: Path,
                           console_socket: Path | None) -> int:
        """Create a pod's container inside its sandbox's VM (``kvmrkt.ocirt.sandbox``): measured, its root and
        volumes bound into the VM's export, held by a forked holder whose pid is returned."""
        sid = str(box["id"])
        pod = self._pod(box)
        assert pod is not None
        backend = self.engine.backend_for(pod)
        name = sandbox.guest_name(cid)
        spec = sandbox.container_spec(bundle, name, self.engine.config.insecure_options, join=APP)
        measure_app_added(self.engine.config, pod, sandbox.measured_app(
            bundle, name, bundle_verdict(bundle.image_id, bundle.image_name)), warn=self.engine.warn)
        sandbox.make_fifo(state_dir)
        backend.add_container(pod, spec)
        try:
            def holder(report: int, tty: bool) -> int:  # in the forked holder
                session = backend.open_container(pod, name, tty=tty, stdin=True)
                return sandbox.hold(session, state_dir, tty=tty, report=report)

            pid, report_r = _fork_reporting(console_socket, holder)
            with os.fdopen(report_r, "rb") as fh:
                answer = fh.readline()
                if answer != b"HELD\n":  # the holder ended, with its reason
                    os.waitpid(pid, 0)
                    reason = (answer + fh.read(65536)).decode(errors="replace").strip()
                    raise Stage1Error(f"the container could not be created in its pod's VM: "
                                      f"{reason or 'its holder ended'}")
            self._write_record(state_dir, cid, bundle, pod.uuid, pid, kind="container", sandbox=sid, guest=name)
        except BaseException:
            backend.remove_container(pod, name)
            raise
        return pid

    def _hook_state(self, cid: str) -> dict[str, Any]:
        """The runtime-spec state a hook reads on its stdin."""
        return {k: v for k, v in self.state(cid).items() if k in ("ociVersion", "id", "status", "pid", "bundle",
                                                                     "annotations")}

    def _hooks(self, rec: dict[str, Any]) -> hooks.Hooks:
        return {k: tuple(hooks.Hook.from_dict(h) for h in v) for k, v in rec.get("hooks", {}).items()}

    def _spawn_supervisor(self, pod: Pod, bundle: Bundle, console_socket: Path | None) -> int:
        """Fork the supervisor (it keeps the pod lock and runs the VM until the container process ends) and wait
        until the guest holds the process ready to start. With a console socket, the supervisor's stdio is a
        new terminal whose master end is sent to that socket (runc's protocol); the guest gives the process a
        terminal of its own and the two are relayed."""
        backend = self.engine.backend_for(pod)

        def supervisor(report: int, tty: bool) -> int:  # in the forked supervisor
            if tty:
                signal.signal(signal.SIGWINCH, lambda _s, _f: threading.Thread(
                    target=_relay_size, args=(pod, backend), daemon=True).start())
            return self._supervise(pod, bundle)

        pid, err_r = _fork_reporting(console_socket, supervisor)
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

    def _supervise(self, pod: Pod, bundle: Bundle) -> int:
        """The supervisor's body: run the pod (measured, labelled) and exit with the process's status."""
        manifest = self.engine.pod_manifest(pod)
        backend = self.engine.backend_for(pod)
        verdict = bundle_verdict(bundle.image_id, bundle.image_name)
        measured = [sandbox.measured_app(bundle, APP, verdict)]
        # The rootfs is the engine's (and may be read-only): kvmrkt writes no hostname/hosts files into it.
        intent = Intent("join", netns=bundle.netns) if bundle.netns else Intent("none", files=False)
        request = LaunchRequest(rootfs={APP: bundle.rootfs}, shared_roots={APP: bundle.readonly},
                                interactive=True, hold=True, tty=bundle.terminal, measured_apps=measured,
                                shared_export=True, accel=self.engine.config.stage1.accel, cgroup=bundle.cgroup)
        result = self.engine.boot(pod, manifest, backend, request, trust=pod.read_json(TRUST) or {},
                                  intent=intent, stdout=sys.stdout.buffer, stderr=sys.stderr.buffer)
        return pod_exit_code(result.exit_codes) if result.exit_codes else 137

    def start(self, cid: str) -> None:
        """Start the held process.

        Raises:
            PodStateError: the container is not in the created state.
        """
        rec = self._record(cid)
        status = self._status(rec)
        if status != "created":
            raise PodStateError(f"container {cid!r} is {status}, not created", state=status)
        if rec.get("kind") == "container":
            sandbox.release(self._dir(cid), timeout=30)
        else:
            pod = self._pod(rec)
            assert pod is not None
            self.engine.backend_for(pod).start_held(pod)
        wait_until(lambda: self._status(rec) != "created", timeout=30, interval=0.005)
        hooks.run(self._hooks(rec), "poststart", self._hook_state(cid), warn=self.engine.warn)

    # --- kill / delete -------------------------------------------------------------------------------

    def kill(self, cid: str, signum: int, *, every_process: bool = False) -> None:
        """Deliver a signal to the container process inside the VM (before start: end the container).

        Raises:
            PodStateError: the container is not created or running.
        """
        rec = self._record(cid)
        status = self._status(rec)
        if status not in ("created", "running"):
            # runc's words: containerd's shim takes "container not running" as "the process already finished"
            # and records the exit, where any other message leaves `crictl stopp` waiting for its deadline.
            raise PodStateError(f"container {cid!r} is {status}: container not running", state=status)
        if rec.get("kind") == "container":  # its holder passes the signal on (SIGKILL: its end ends the container)
            os.kill(int(rec["pid"]), signum)
            return
        pod = self._pod(rec)
        assert pod is not None
        self.engine.backend_for(pod).signal(pod, signum, every_process=every_process)

    def delete(self, cid: str, *, force: bool = False) -> None:
        """Remove a stopped (or created) container; ``force`` stops a running one first (SIGKILL); then its
        poststop hooks run (a failure is a warning).

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
        if pod is not None and rec.get("kind") == "container":
            self.engine.backend_for(pod).remove_container(pod, str(rec["guest"]))
        elif pod is not None:
            self._remove_pod(pod)
        state = {"ociVersion": OCI_VERSION, "id": cid, "status": "stopped", "pid": 0, "bundle": rec["bundle"],
                 "annotations": rec.get("annotations", {})}
        shutil.rmtree(self._dir(cid))
        hooks.run(self._hooks(rec), "poststop", state, warn=self.engine.warn)

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
                code = backend.enter(pod, manifest, str(rec.get("guest", APP)), args, stdout=sys.stdout.buffer,
                                     stderr=sys.stderr.buffer, opts=opts)
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


def _fork_reporting(console_socket: Path | None, body: Callable[[int, bool], int]) -> tuple[int, int]:
    """Fork a container's host process (a VM's supervisor, or a holder), which keeps this process's stdio (with
    ``console_socket``: a new terminal whose master goes to that socket) and exits with ``body(report, tty)``'s
    status; if ``body`` raises, the reason is written to ``report`` and it exits 125. Returns its pid and the
    read end of ``report``. containerd's shim (a subreaper) becomes its parent when ``create`` exits."""
    term = _send_terminal(console_socket) if console_socket is not None else None
    report_r, report_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(report_r)
        code = 125
        try:
            if term is not None:
                _take_terminal(term)
            code = body(report_w, term is not None)
        except BaseException as exc:  # the creating process reports it; nothing else can
            msg = exc.diagnostics() if isinstance(exc, KvmrktError) else f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):
                os.write(report_w, msg.encode()[:65536])
        os._exit(code)
    os.close(report_w)
    if term is not None:
        os.close(term)
    return pid, report_r


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
        "hooks": list(hooks.RUN_ON_HOST),
        "mountOptions": ["bind", "rbind", "ro", "rw"],
        "linux": {"namespaces": [], "capabilities": [], "cgroup": {"v1": False, "v2": False, "systemd": False},
                  "seccomp": {"enabled": False}, "apparmor": {"enabled": False}, "selinux": {"enabled": True}},
        "annotations": {"io.kvmrkt.runtime": "vm", "io.kvmrkt.rootfs-sharing": "9p"},
    }
