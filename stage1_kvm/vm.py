"""The generic VM stage1: everything a pod VM needs, whatever hypervisor runs it.

Role: ``VmStage1`` implements ``kvmrkt.stage1.Stage1`` over a ``stage1_kvm.hypervisor.Hypervisor``. It checks
the VM assets, describes the VM (``vmspec``), writes the per-pod initramfs, hands the facts to measured launch
(``before_boot``), keeps the console and app output in bounded logs (``stage1_kvm.output``, which also watches
for integrity failures), supervises the VM (boot timeout, Ctrl-C/SIGTERM as a graceful stop under
``kvmrkt.pods.stopping``, a bounded guest status), reads back per-app exit codes, and drives a running pod through the
guest agent (enter, stop, held start, signals, terminal size); status and gc read and undo what the pod
directory records. The hypervisor only starts, quits and destroys the VMM. Trust boundary: the VMM runs the
untrusted guest inside the jail; nothing the guest writes is executed or used as a path on the host, and what
it reports is bounded and shown only as printable text.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO, Any, ClassVar

from kvmrkt.config import RuntimeConfig
from kvmrkt.digest import Digest
from kvmrkt.errors import (
    AgentError,
    BootTimeoutError,
    ConfigError,
    KvmrktError,
    PodStateError,
    Stage1Error,
    VMLaunchError,
)
from kvmrkt.host import forked, memory
from kvmrkt.host import proc as _proc
from kvmrkt.host.timeline import stamp
from kvmrkt.host.wait import wait_until
from kvmrkt.host.watch import Waker
from kvmrkt.pods.manifest import PodManifest, Volume
from kvmrkt.pods.pod import Pod
from kvmrkt.pods.stopping import StopEscalation
from kvmrkt.stage1 import (
    PLAIN_ENTER,
    BackendStatus,
    ContainerSession,
    ContainerSpec,
    EnterOptions,
    GuestState,
    JailSpec,
    RunOptions,
    RunResult,
    Stage1,
)
from stage1_kvm import agent, ctlmux, export, template
from stage1_kvm import jail as jails
from stage1_kvm.assets import Assets, load_assets, pod_initrd
from stage1_kvm.hypervisor import PID_FILE, QEMU_LOG, RUN_RECORD, Hypervisor, VMHandle
from stage1_kvm.output import OutputPump, Stream
from stage1_kvm.vmspec import (
    BIND_KINDS,
    CONSOLE_LOG,
    CONSOLE_SOCKET,
    CTL_SOCKET,
    EXPORT_DIR,
    GUEST_STATUS,
    POD_INITRD,
    QMP_SOCKET,
    SIG_SOCKET,
    STDIN_SOCKET,
    VMSpec,
    app_log,
    build_vmspec,
    export_path,
    guest_container_config,
    guest_pod_config,
    out_socket,
)

INTEGRITY_RECORD = "integrity.json"  # written by kvmrkt as soon as the console shows an integrity failure


def host_tsc_khz() -> int | None:
    """The host CPU frequency in kHz (used to skip the guest's TSC calibration under TCG)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return 2_000_000


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class _GuestStamps:
    """Timeline stamps (``kvmrkt.host.timeline``) when the guest status first shows the init ready, an app
    started, and every app done."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, st: GuestState) -> None:
        for stage, reached in (("guest-ready", st.ready), ("app-started", bool(st.pids)), ("apps-done", st.done)):
            if reached and stage not in self.seen:
                self.seen.add(stage)
                stamp(stage)


class _StopRequest:
    """Turns SIGINT/SIGTERM into a graceful stop request while the pod runs."""

    def __init__(self) -> None:
        self.requested = 0.0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, _signum: int, _frame: FrameType | None) -> None:
        self.requested = self.requested or time.monotonic()

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _pump_stdin(pod_dir: Path) -> None:
    """Copy our stdin to the app's stdin port until EOF (then close, which the guest reads as EOF)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with agent.socket_path(pod_dir, STDIN_SOCKET) as path:
            sock.connect(path)
        while data := os.read(sys.stdin.fileno(), 65536):
            sock.sendall(data)
        # The guest cannot tell "closed" from "not connected yet" on a port: keep it open until the app has
        # started, so an early EOF (stdin is /dev/null) does not make the guest wait for a connection.
        def app_started() -> bool:
            st = agent.read_status(pod_dir / GUEST_STATUS)
            return bool(st.pids or st.exits or st.fatal)

        wait_until(app_started, timeout=120, interval=0.01)
    except OSError:
        pass
    finally:
        sock.close()


class VmStage1(Stage1):
    """A pod VM run by ``hypervisor``: concrete backends only name themselves and their hypervisor, and
    advertise its network capabilities."""

    hypervisor: ClassVar[type[Hypervisor]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hv = cls.__dict__.get("hypervisor")
        if hv is not None:
            cls.network_modes, cls.user_port_forwards = hv.network_modes, hv.user_port_forwards

    def __init__(self, config: RuntimeConfig) -> None:
        super().__init__(config)
        self.hv = self.hypervisor(config)

    # --- run ------------------------------------------------------------------------------------------

    def run(
        self, pod: Pod, manifest: PodManifest, opts: RunOptions, *, stdout: IO[bytes], stderr: IO[bytes]
    ) -> RunResult:
        cfg = self.config.stage1
        if pod.lock_fd is None:
            raise PodStateError(f"pod {pod.uuid} must be locked by the running process", state=pod.state())
        memory.lean()  # this process then supervises the pod for its whole life
        assets = load_assets(cfg)
        assets.verify()  # the kernel and initramfs that boot are the ones whose digests were recorded
        stamp("assets-verified")
        exported = opts.shared_export or any(v.kind in BIND_KINDS for v in manifest.volumes)
        if "9p" not in assets.features and (opts.shared_roots or exported
                                            or any(v.kind == "host" for v in manifest.volumes)):
            raise ConfigError(
                f"host volumes and bundle roots need a guest kernel with 9p; the {assets.kind!r} kernel has none",
                hint='use the minimal kernel (stage1.kernel = "minimal" in config.toml)',
            )
        if opts.network.mode not in self.network_modes:
            raise ConfigError(f"the {self.name} backend cannot run --net={opts.network.mode} pods")
        accel = self.hv.accel(opts.accel)
        vmm = self.hv.vmm()
        spec = build_vmspec(
            manifest,
            cfg=cfg,
            jail=opts.jail,
            accel=accel,
            kernel=assets.kernel,
            rootfs=opts.rootfs,
            verity=opts.verity,
            interactive=opts.interactive,
            debug=self.config.debug,
            tsc_khz=host_tsc_khz(),
            acpi=assets.acpi,
            network=opts.network,
            shared_roots=opts.shared_roots,
            shared_export=pod.file(EXPORT_DIR) if exported else None,
        )
        (pod.path / "logs").mkdir(exist_ok=True, mode=0o700)
        # Every file QEMU writes exists before launch, so labels set on the pod's files (before_boot) cover them.
        for name in (CONSOLE_LOG, GUEST_STATUS, QEMU_LOG,
                     *(app_log(app.name, s) for app in manifest.apps for s in ("stdout", "stderr"))):
            pod.file(name).touch(mode=0o600)
        config = guest_pod_config(manifest, interactive=opts.interactive, verity=opts.verity,
                                  network=opts.network, shared_roots=opts.shared_roots, hold=opts.hold,
                                  tty=opts.tty, shared_export=exported)
        initrd = pod.file(POD_INITRD)
        pod_initrd(assets.initrd, config, initrd)
        stamp("initrd-written")
        os.chown(initrd, 0, opts.jail.gid)  # the pod's VMM reads it; it may hold secrets (the apps' environment)
        os.chmod(initrd, 0o640)
        tmpl = self._template(spec, assets, vmm)
        record = {
            "backend": self.name,
            "interface_version": self.interface_version,
            "accel": accel,
            "kernel": {"kind": assets.kind, "path": str(assets.kernel), "digest": str(assets.kernel_digest)},
            "initrd": {"path": str(assets.initrd), "digest": str(assets.initrd_digest)},
            "memory_mib": spec.memory_mib,
            "vcpus": spec.vcpus,
            "template": tmpl.describe() if tmpl else None,
        }
        facts = {
            "backend": self.name, "accel": accel, "kernel": str(assets.kernel_digest),
            "initrd": str(assets.initrd_digest), "pod_initrd": str(Digest.of_file(pod.file(POD_INITRD))),
            "vmm_guard": str(assets.guard_digest),
            "cmdline": spec.cmdline, "memory_mib": spec.memory_mib, "vcpus": spec.vcpus,
            "network": opts.network.mode, "jail": self._jail_facts(opts.jail, accel),
            **({"template": {"key": tmpl.key, "state": tmpl.digest, "initrd": tmpl.initrd_digest}} if tmpl else {}),
        }  # fmt: skip
        outputs = self._outputs(pod, manifest, stdout=stdout, stderr=stderr)  # its threads start at connect()
        measured = forked.done()
        try:
            measured = opts.before_boot(facts)  # the VMM starts paused meanwhile; the guest runs once it is done
            if exported:
                export.up(pod, manifest, opts.jail, self.config.data_dir)
            with ctlmux.serve(pod.path, stderr, held=tmpl is not None) as mux:  # enter sessions, for the VM's life
                vm = self.hv.launch(pod, spec, opts, record, vmm=vmm, guard=assets.guard, outputs=outputs,
                                    template=tmpl, measured=measured.wait)
                try:
                    if tmpl:
                        mux.handoff(template.handoff_frame(config))
                    memory.release()  # what the launch freed, before the pod's life-long wait
                    return self._supervise(pod, manifest, vm, opts, outputs, stderr=stderr)
                finally:
                    if vm.poll() is None:
                        vm.kill()
                        vm.wait()
        finally:
            measured.reap()  # waited for already, unless the launch failed before the guest could run
            outputs.finish()
            self._unjail(pod)

    def _template(self, spec: VMSpec, assets: Assets, vmm: str) -> template.Template | None:
        """The template to restore this pod's VM from (None: boot it), where the backend and config allow; a
        shape without one is recorded as wanted."""
        cfg = self.config.stage1
        if not (cfg.templates and self.hv.templates):
            return None
        shape = template.shape_of(spec, assets=assets, qemu=vmm)
        if shape is None:
            return None
        found = template.find(cfg, shape)
        if found is None:
            template.want(cfg, shape)
        return found

    def _outputs(self, pod: Pod, manifest: PodManifest, *, stdout: IO[bytes], stderr: IO[bytes]) -> OutputPump:
        """The VM's console and app output: bounded logs in the pod directory, the apps' copied to our stdout
        and stderr (the console too with --debug), integrity failures recorded as soon as they are seen."""
        streams = [Stream(CONSOLE_SOCKET, CONSOLE_LOG, stderr if self.config.debug else None, console=True,
                          clean=agent.printable_stream)]  # guest text, rendered visibly on a terminal
        for i, app in enumerate(manifest.apps):
            streams += [Stream(out_socket(i, "stdout"), app_log(app.name, "stdout"), stdout),
                        Stream(out_socket(i, "stderr"), app_log(app.name, "stderr"), stderr)]

        def record(reports: list[str], count: int) -> None:
            with contextlib.suppress(OSError, KvmrktError):  # the run fails on it anyway (see _supervise)
                pod.write_json(INTEGRITY_RECORD, {"failures": reports, "count": count})

        return OutputPump(pod.path, streams, limit=self.config.pods.max_log_bytes, on_integrity=record)

    def _jail_facts(self, jail: JailSpec, accel: str) -> dict[str, Any]:
        """The jail as measured: ids, limits, the backend's way of enforcing them, the isolation class."""
        return {**jail.to_dict(), "enforced_by": self.name, "isolation": jails.isolation_class(accel)}

    def _unjail(self, pod: Pod) -> bool:
        """Undo the jail once the VM is gone (idempotent; False if something is left for the next gc)."""
        return jails.PodJail(pod, self.config.data_dir).down()

    def _supervise(
        self, pod: Pod, manifest: PodManifest, proc: VMHandle, opts: RunOptions, outputs: OutputPump, *,
        stderr: IO[bytes],
    ) -> RunResult:
        cfg = self.config.stage1
        started = time.monotonic()
        stopping = StopEscalation(cfg.stop_timeout)
        stdin_thread: threading.Thread | None = None
        stamp_guest = _GuestStamps()
        pid = proc.pid if isinstance(proc, subprocess.Popen) else None  # libvirt's VMM is not our child
        with _StopRequest() as stop, Waker(pod.file(GUEST_STATUS), pid) as waker:
            while proc.poll() is None:
                st = agent.read_status(pod.file(GUEST_STATUS))
                now = time.monotonic()
                if _size(pod.file(GUEST_STATUS)) > agent.MAX_FRAME:
                    # Only the guest init writes there, a few lines per app: more is a broken or hostile guest
                    # (QEMU writes this one file itself, so the host bounds it by stopping the VM).
                    proc.kill()
                    proc.wait()
                    raise Stage1Error(f"the guest wrote more than {agent.MAX_FRAME} bytes of status messages (a "
                                      "broken or hostile guest): the VM was killed")
                stamp_guest(st)
                if opts.interactive and stdin_thread is None and st.ready:
                    stdin_thread = threading.Thread(target=_pump_stdin, args=(pod.path,), daemon=True)
                    stdin_thread.start()
                if not st.ready and now - started > cfg.boot_timeout:
                    proc.kill()
                    proc.wait()
                    raise BootTimeoutError(
                        f"the guest did not report ready within {cfg.boot_timeout:.0f}s; the VM was killed\n"
                        + self._console_tail(pod),
                        hint="raise stage1.boot_timeout in config.toml on slow hosts; --debug shows the console",
                    )
                if stop.requested and not stopping.started:
                    if not st.ready:
                        stopping.unanswered("the guest was not ready")
                    else:
                        try:
                            agent.request_stop(pod.path, SIG_SOCKET, grace=stopping.grace)
                            stopping.asked()
                        except AgentError:
                            stopping.unanswered()
                if stopping.kill_due():
                    proc.kill()
                # A status line or the VMM's end wakes it at once, a stop request (signal) within 0.1 s.
                waker.wait(0.1, unwatched=0.005 if now - started < 2 else 0.02)
        stamp("vm-exited")
        for error in outputs.finish():
            stderr.write(f"kvmrkt: warning: a log could not be written, the rest of it is lost: {error}\n".encode())
        st = agent.read_status(pod.file(GUEST_STATUS))
        codes = {a.name: st.exits.get(a.name, 128 + signal.SIGKILL) for a in manifest.apps}
        if outputs.integrity_failures:  # outranks whatever else the guest did or said
            return RunResult(exit_codes=codes, stopped=stopping.started,
                             integrity_failures=outputs.integrity_failures)
        oom = jails.PodJail(pod, self.config.data_dir).oom()
        if oom and not st.done:
            raise Stage1Error(oom + "\n" + self._console_tail(pod),
                              hint="give the apps less memory, or raise [jail] memory_margin_mib")
        if st.fatal:  # also before READY: a bad pod config or template handoff says so
            raise Stage1Error(f"the guest init failed: {st.fatal}\n" + self._console_tail(pod))
        if not st.ready and not stopping.outcome.forced:
            raise VMLaunchError(
                f"QEMU exited with code {proc.returncode} before the guest was ready\n"
                + _proc.tail(pod.file(QEMU_LOG).read_bytes())
                + "\n"
                + self._console_tail(pod)
            )
        if not st.done and not stopping.outcome.forced:
            raise Stage1Error(
                f"the VM ended (QEMU exit code {proc.returncode}) before all apps reported their exit status\n"
                + self._console_tail(pod)
            )
        for name, messages in st.errors.items():
            for msg in messages:
                stderr.write(f"kvmrkt: app {name}: {msg}\n".encode())
        return RunResult(exit_codes=codes, stopped=stopping.started)

    @staticmethod
    def _console_tail(pod: Pod) -> str:
        try:
            text = pod.file(CONSOLE_LOG).read_bytes()
        except FileNotFoundError:
            text = b""
        if not text.strip():
            return "(the guest console is empty)"
        lines = _proc.tail(text, 20).splitlines()
        return "guest console (last lines):\n" + "\n".join(agent.printable(ln) for ln in lines)

    # --- other lifecycle --------------------------------------------------------------------------------

    def stop(self, pod: Pod, *, force: bool) -> None:
        if force:  # the hard kill: ask the VMM to quit, then destroy what was recorded
            self.hv.quit(pod)
            self.hv.destroy(pod)
            return
        agent.request_stop(pod.path, SIG_SOCKET, grace=self.config.stage1.stop_timeout)  # see kvmrkt.pods.stopping

    def enter(
        self, pod: Pod, manifest: PodManifest, app: str, argv: list[str], *, stdout: IO[bytes], stderr: IO[bytes],
        opts: EnterOptions = PLAIN_ENTER,
    ) -> int:
        return agent.enter(pod.path, ctlmux.SESSIONS_SOCKET, app, argv, stdout=stdout, stderr=stderr, opts=opts)

    def status(self, pod: Pod) -> BackendStatus:
        rec = pod.read_json(RUN_RECORD, {}) or {}
        pid = pod.read_json(PID_FILE, {}) or {}
        st = agent.read_status(pod.file(GUEST_STATUS))
        return BackendStatus(
            backend=self.name,
            accel=rec.get("accel"),
            pid=pid.get("pid"),
            started=pid.get("started"),
            memory_mib=rec.get("memory_mib"),
            vcpus=rec.get("vcpus"),
            kernel=rec.get("kernel"),
            guest_ready=st.ready,
            app_pids=st.pids,
            app_exit_codes=st.exits,
            app_errors=st.errors,
            integrity_failures=tuple((pod.read_json(INTEGRITY_RECORD, {}) or {}).get("failures", [])),
            jail=jails.PodJail(pod, self.config.data_dir).status(rec.get("accel")),
            extra=self.hv.facts(pod),
        )

    def guest_state(self, pod: Pod) -> GuestState:
        return agent.read_status(pod.file(GUEST_STATUS))

    def start_held(self, pod: Pod) -> None:
        agent.request_go(pod.path, SIG_SOCKET)

    def signal(self, pod: Pod, signum: int, *, every_process: bool = False) -> None:
        agent.request_kill(pod.path, SIG_SOCKET, signum, every_process=every_process)

    def resize(self, pod: Pod, rows: int, cols: int) -> None:
        agent.request_winsize(pod.path, SIG_SOCKET, rows, cols)

    def add_container(self, pod: Pod, spec: ContainerSpec) -> None:
        exported = pod.file(EXPORT_DIR)
        rec = pod.read_json(jails.RECORD, {}) or {}
        if not rec.get("export") or not exported.is_dir():
            raise Stage1Error(f"pod {pod.uuid} has no shared export: containers cannot be added to it",
                              hint="the pod must be started with the shared export (kvmrkt-oci's sandboxes are)")
        root = Volume(f"{spec.name}-root", "bind", str(spec.rootfs), read_only=spec.read_only)
        config = guest_container_config(spec.app, spec.volumes, root=export_path(root), read_only=spec.read_only,
                                        join=spec.join, shm=spec.join)
        export.add_container(exported, spec.name, root, spec.volumes, config, data_dir=self.config.data_dir,
                             pod=pod.uuid, uid=int(rec["uid"]), gid=int(rec["gid"]))

    def open_container(self, pod: Pod, name: str, *, tty: bool, stdin: bool) -> ContainerSession:
        return agent.ContainerSession.create(pod.path, ctlmux.SESSIONS_SOCKET, name, tty=tty, stdin=stdin,
                                             timeout=self.config.stage1.boot_timeout)

    def remove_container(self, pod: Pod, name: str) -> None:
        export.remove_container(pod.file(EXPORT_DIR), name)

    def gc(self, pod: Pod) -> None:
        with contextlib.suppress(Stage1Error, ConfigError):  # e.g. libvirtd unreachable: gc does what it can
            self.hv.destroy(pod)
        self._unjail(pod)  # after the VM is gone (mounts first, never deleting through them)
        outputs = [p.name for p in pod.path.glob("std*.sock")]
        for name in (QMP_SOCKET, CTL_SOCKET, ctlmux.SESSIONS_SOCKET, SIG_SOCKET, STDIN_SOCKET, CONSOLE_SOCKET,
                     *outputs, POD_INITRD):
            with contextlib.suppress(FileNotFoundError):
                pod.file(name).unlink()
