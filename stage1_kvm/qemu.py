"""The ``qemu`` stage1 backend: one QEMU process per pod, started directly and supervised by ``kvmrkt run``.

Role: the only module that starts and kills the pod VM's QEMU process (``QemuProcess``, the ``Hypervisor`` of
``QemuStage1``; everything else a pod VM needs is ``stage1_kvm.vm.VmStage1``). It sets up the pod's jail (its
cgroup with the limits, access to its shared directories, the record gc undoes), opens every file and socket
QEMU writes or serves, and starts QEMU jailed (``stage1_kvm.jail``: the pod's own uid, no capabilities, a
private root holding only its inputs; the pod lock fd inherited so the pod reads as running exactly while QEMU
lives, killed if stage0 dies), paused until the measured launch is done. QMP (``stage1_kvm.monitor``) on
``qmp.sock`` resumes the VM, quits it and queries it; a forced kill signals only the recorded pid whose command
line names the pod. Also here: the accelerator choice (KVM or TCG). Trust boundary: QEMU runs the untrusted guest
under ``-sandbox`` inside the jail.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kvmrkt.config import RuntimeConfig
from kvmrkt.errors import AccelError, Stage1Error, VMLaunchError
from kvmrkt.host import proc as _proc
from kvmrkt.host.timeline import stamp
from kvmrkt.pods.pod import Pod
from kvmrkt.stage1 import RunOptions
from stage1_kvm import agent, monitor
from stage1_kvm import jail as jails
from stage1_kvm.hypervisor import PID_FILE, QEMU_LOG, RUN_RECORD, Hypervisor, VMHandle
from stage1_kvm.output import OutputPump
from stage1_kvm.qemu_argv import build_argv
from stage1_kvm.template import Template, restore
from stage1_kvm.vm import VmStage1
from stage1_kvm.vmspec import VMSpec


def probe_kvm() -> str | None:
    """None when KVM can run our guests here, else why not."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist (no hardware virtualisation, or the kvm module is not loaded)"
    if os.path.exists("/sys/module/kvm_pvm"):
        return (
            "/dev/kvm is provided by kvm_pvm, a paravirtualised nested hypervisor on which guest kernels hang "
            "and -cpu host aborts"
        )
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not accessible to this user"
    return None


def choose_accel(requested: str) -> str:
    """Resolve ``auto|kvm|tcg`` to the accelerator to use.

    Raises:
        AccelError: ``kvm`` was requested and cannot work here.
    """
    if requested == "tcg":
        return "tcg"
    reason = probe_kvm()
    if requested == "kvm" and reason:
        raise AccelError(f"--accel=kvm cannot be used: {reason}", hint="use --accel=auto or --accel=tcg")
    return "tcg" if reason else "kvm"


@contextlib.contextmanager
def runtime_fds(pod_dir: Path, spec: VMSpec) -> Iterator[dict[str, int]]:
    """The file QEMU writes (the guest status; truncated) and the sockets it serves (QMP, console, ports;
    listening), opened in ``pod_dir`` and closed again when the block ends (QEMU has its copies by then)."""
    fds: dict[str, int] = {}
    socks: list[socket.socket] = []
    try:
        for name in (p.path for p in spec.ports if p.kind == "file"):
            fds[name] = os.open(pod_dir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        for name in (spec.qmp_socket, spec.console_socket, *(p.path for p in spec.ports if p.kind == "socket")):
            socks.append(agent.listen(pod_dir, name))
            fds[name] = socks[-1].fileno()
        yield fds
    finally:
        files = set(fds.values()) - {sock.fileno() for sock in socks}
        for sock in socks:
            sock.close()
        for fd in files:
            os.close(fd)


def qmp_command(pod_dir: Path, command: str, timeout: float = 5.0) -> Any:
    """Run one QMP command against the pod's QEMU and return its result.

    Raises:
        Stage1Error: QMP is unreachable or the command failed.
    """
    with monitor.connect(pod_dir, time.monotonic() + timeout) as q:
        return q.cmd(command)


def find_qemu(config: RuntimeConfig) -> str:
    """The QEMU binary of ``[stage1] qemu`` (raises ``ConfigError`` if it is not installed)."""
    return _proc.which(config.stage1.qemu, hint="apt-get install qemu-system-x86")


class QemuHypervisor(Hypervisor):
    """What every way of running kvmrkt's QEMU shares: the accelerator choice and the QEMU binary."""

    def accel(self, requested: str) -> str:
        return choose_accel(requested)

    def vmm(self) -> str:
        return find_qemu(self.config)


class QemuProcess(QemuHypervisor):
    """QEMU started directly, one microvm per pod, as a child of ``kvmrkt run``."""

    name = "qemu"

    templates = True

    def launch(self, pod: Pod, spec: VMSpec, opts: RunOptions, record: dict[str, Any], *, vmm: str, guard: Path,
               outputs: OutputPump, measured: Callable[[], None], template: Template | None = None) -> VMHandle:
        """Start QEMU itself, jailed and through the VMM guard, holding the pod lock and dying with this process:
        paused (``-S``; with ``template``, ``-incoming defer`` then ``stage1_kvm.template.restore``), resumed over
        QMP once ``measured`` returned."""
        jail = opts.jail
        jailed, layout = jails.plan(spec, pod.path, resolv_conf=opts.network.mode == "user", guard=guard,
                                    vmm=Path(vmm))
        cg = jails.PodJail(pod, self.config.data_dir).up(spec, jail, layout)
        stamp("jail-built")
        assert pod.lock_fd is not None and cg is not None
        root = pod.file(jails.ROOT)
        root.mkdir(exist_ok=True, mode=0o700)
        with runtime_fds(pod.path, spec) as fds:
            paused = ["-incoming", "defer"] if template else ["-S"]
            argv = jails.guarded(vmm, build_argv(jailed, qemu=vmm, fds=fds) + paused)
            pod.write_json(RUN_RECORD, {**record, "argv": argv})
            outputs.connect()  # queued on our own listening sockets: QEMU accepts them as it starts
            with pod.file(QEMU_LOG).open("wb") as qlog:
                proc = _proc.spawn(argv, stdout=qlog, stderr=qlog, pass_fds=[pod.lock_fd, *fds.values()],
                                   cwd=pod.path, exec_label=opts.exec_label, netns=spec.netns,
                                   setup=jails.confine(root, layout, jail.uid, jail.gid, cg.procs_files))
        stamp("qemu-spawned")
        pod.write_json(PID_FILE, {"pid": proc.pid, "started": time.time()})
        def alive() -> bool:
            return proc.poll() is None

        try:
            if template:
                restore(pod.path, template, timeout=self.config.stage1.boot_timeout, before_cont=measured,
                        alive=alive)
            else:
                with monitor.connect(pod.path, time.monotonic() + self.config.stage1.boot_timeout, alive) as q:
                    measured()
                    q.cmd("cont")
        except BaseException as exc:
            exited = proc.poll()
            if exited is None and isinstance(exc, Stage1Error):
                # the monitor's socket closes as QEMU exits, a moment before its exit status can be reaped
                with contextlib.suppress(subprocess.TimeoutExpired):
                    exited = proc.wait(timeout=1.0)
            proc.kill()
            proc.wait()
            pod.file(PID_FILE).unlink(missing_ok=True)  # reaped: nothing of this pod runs
            if exited is not None and isinstance(exc, Stage1Error):  # QEMU failed on its own: say why
                raise VMLaunchError(f"QEMU exited with code {exited} before the guest could run\n"
                                    + _proc.tail(pod.file(QEMU_LOG).read_bytes())) from exc
            raise
        return proc

    def _our_qemu(self, pod: Pod) -> int | None:
        """The recorded QEMU pid, if that process is alive and is this pod's QEMU (never signal anything else)."""
        rec = pod.read_json(PID_FILE)
        pid = rec.get("pid") if isinstance(rec, dict) else None
        if isinstance(pid, int) and _proc.pid_alive(pid) and any(pod.uuid in a for a in _proc.pid_cmdline(pid)):
            return pid
        return None

    def quit(self, pod: Pod) -> None:
        with contextlib.suppress(Stage1Error):
            qmp_command(pod.path, "quit")

    def destroy(self, pod: Pod) -> None:
        """SIGKILL the recorded QEMU pid, only if it is alive and this pod's QEMU."""
        pid = self._our_qemu(pod)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class QemuStage1(VmStage1):
    """The ``qemu`` backend: a pod VM run by ``QemuProcess``."""

    name = "qemu"
    hypervisor = QemuProcess


def describe_accel() -> dict[str, str]:
    """What ``--accel=auto`` picks on this host and why (for ``kvmrkt version``/``config``)."""
    reason = probe_kvm()
    return {"auto": "tcg" if reason else "kvm", "kvm_unusable_because": reason or ""}


__all__ = ["QemuProcess", "QemuStage1", "choose_accel", "describe_accel", "find_qemu", "probe_kvm", "qmp_command"]
