"""The ``libvirt`` stage1 backend: the same pod VM as the ``qemu`` backend, run by libvirtd as a transient domain
named after the pod, so it shows up in ``virsh list`` and gets libvirt's sVirt confinement.

Role: ``LibvirtDomain`` is the ``Hypervisor`` of ``LibvirtStage1``; everything else of the pod VM (VM
description, per-pod initramfs, measurement hook, supervision of the guest's status file and output,
enter/stop through the agent) is ``stage1_kvm.vm.VmStage1``, as for ``qemu``. It owns what touches the VM
process: launch (``createXML`` of ``domain_xml``), the hard kill and gc (``destroy``), and the status facts
(domain, uri). The domain is transient:
when the guest ends (kvmrkt's init reboots, ``on_reboot=destroy``) libvirt forgets it; gc destroys a domain
left running by a killed ``kvmrkt run``. The jail: QEMU runs as the pod's own uid/gid (static DAC label) without
capabilities in libvirt's own mount namespace and seccomp sandbox; what it reads is reachable only through
``/run/kvmrkt/<uuid>`` (mode 0750, the pod's group): its own copies of the kernel and initramfs (which libvirt
relabels) and read-only bind mounts of its images and shared directories (unmounted when the VM ends, or by gc);
libvirt's state directory is made traversable for that uid only while the pod runs. The domain starts paused,
its cgroups get the pod's limits (libvirt's own placement, plus a pids cgroup of kvmrkt's), then it resumes.
The console and the apps' output are unix sockets read into bounded logs, as with ``qemu``. On CNI networks the
pod's taps are lent to libvirtd's namespace only while the domain is paused (``kvmrkt.net.taps``).
Unix sockets live in the same short directory (libvirt binds them by absolute path, and pod directories can be
deeper than the 108-byte socket path limit), linked from the pod directory. Trust boundary: as for ``qemu``;
libvirtd is trusted.
The libvirt Python binding is optional: this module imports it lazily and says how to install it.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmrkt.errors import ConfigError, JailError, KvmrktError, NetworkError, Stage1Error, VMLaunchError
from kvmrkt.host.files import write_atomic
from kvmrkt.host.wait import wait_until
from kvmrkt.net import taps
from kvmrkt.pods.pod import Pod
from kvmrkt.stage1 import RunOptions
from stage1_kvm import cgroups, shares
from stage1_kvm import jail as jails
from stage1_kvm.domain_xml import build_domain_xml
from stage1_kvm.hypervisor import PID_FILE, RUN_RECORD, VMHandle
from stage1_kvm.output import OutputPump
from stage1_kvm.qemu import QemuHypervisor
from stage1_kvm.vm import VmStage1
from stage1_kvm.vmspec import VMSpec

if TYPE_CHECKING:
    from stage1_kvm.template import Template

RUNTIME_DIR = Path("/run/kvmrkt")
DEFAULT_URI = "qemu:///system"
# libvirt's per-domain state (master key, monitor) lives under this directory, which only its own user may
# traverse: QEMU running as the pod's uid needs to pass through it (Debian's layout for qemu:///system).
LIBVIRT_QEMU_DIR = Path("/var/lib/libvirt/qemu")
LIBVIRT_PID_DIR = Path("/run/libvirt/qemu")
VIR_DOMAIN_START_PAUSED = 1


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as exc:
        raise ConfigError("the libvirt backend needs the libvirt Python binding",
                          hint="pip install 'kvmrkt[libvirt]' (make setup installs it)") from exc
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed
    return libvirt


def guarded_emulator(guard: Path, qemu: str) -> Path:
    """The emulator libvirt starts for kvmrkt's pods: a script whose interpreter is a copy of the VMM guard
    (``#!GUARD QEMU``), so QEMU runs under the guard's seccomp filter as it does with the qemu backend. Both live
    in ``/run/kvmrkt`` (root's, traversable: libvirt probes and runs the emulator as unprivileged users) and are
    rewritten (atomically) only when they differ."""
    RUNTIME_DIR.mkdir(parents=True, exist_ok=True, mode=0o755)
    copy, script = RUNTIME_DIR / guard.name, RUNTIME_DIR / "qemu-guarded"
    for path, data in ((copy, guard.read_bytes()), (script, f"#!{copy} {qemu}\n".encode())):
        if not path.is_file() or path.read_bytes() != data:
            write_atomic(path, data, mode=0o755)
    return script


class _Domain:
    """A transient domain seen as a process: poll() is None while it exists."""

    def __init__(self, conn: Any, name: str) -> None:
        self.conn, self.name = conn, name
        self.returncode: int | None = None

    def _dom(self) -> Any:
        lv = _libvirt()
        try:
            return self.conn.lookupByName(self.name)
        except lv.libvirtError:
            return None

    def poll(self) -> int | None:
        if self.returncode is None and self._dom() is None:
            self.returncode = 0
        return self.returncode

    def kill(self) -> None:
        dom = self._dom()
        if dom is not None:
            with contextlib.suppress(_libvirt().libvirtError):
                dom.destroy()

    def wait(self, timeout: float | None = None) -> int:
        wait_until(lambda: self.poll() is not None, timeout=timeout if timeout is not None else 60)
        return self.returncode or 0


class LibvirtDomain(QemuHypervisor):
    """Pod VMs as transient libvirt domains.

    Networking: CNI networks as for ``qemu`` (the pod's namespace, its plugins, port forwards and teardown are
    the same), with one difference: libvirtd opens a domain's taps by name in its own (the host's) namespace, so
    the pod's taps are lent to it while the domain is created paused and brought back into the pod's namespace
    before the guest runs (``kvmrkt.net.taps``). User mode has no port forwards (libvirt 9.0 forwards ports only
    with the passt backend).
    """

    user_port_forwards = False

    name = "libvirt"

    @property
    def uri(self) -> str:
        return self.config.stage1.libvirt_uri or DEFAULT_URI

    def _connect(self) -> Any:
        lv = _libvirt()
        try:
            return lv.open(self.uri)
        except lv.libvirtError as exc:
            raise Stage1Error(f"cannot connect to libvirt at {self.uri}: {exc}",
                              hint="start libvirtd, or set stage1.libvirt_uri") from exc

    @staticmethod
    def _socket_dir(pod: Pod) -> Path:
        return RUNTIME_DIR / pod.uuid

    def launch(self, pod: Pod, spec: VMSpec, opts: RunOptions, record: dict[str, Any], *, vmm: str, guard: Path,
               outputs: OutputPump, measured: Callable[[], None], template: Template | None = None) -> VMHandle:
        assert template is None, "libvirt pods boot: no templates (templates = False)"
        jail = opts.jail
        if jail.placement is not None:
            raise JailError(f"a caller-chosen cgroup ({jail.placement.path!r}, an OCI bundle's linux.cgroupsPath) "
                            "needs the qemu backend: libvirt places its domains' QEMU in cgroups of its own",
                            hint="run kvmrkt-oci with [stage1] backend = \"qemu\"")
        emulator = guarded_emulator(guard, vmm)
        root = self._socket_dir(pod)
        jailed, layout = jails.plan(spec, pod.path, prefix=str(root))
        # libvirt relabels the kernel and initramfs for the uid: they must be the pod's own copies.
        copies = [b for b in layout.inputs if b.target in ("kernel", "initrd.img")]
        layout = replace(layout, inputs=tuple(b for b in layout.inputs if b not in copies))
        pod_jail = jails.PodJail(pod, self.config.data_dir)
        pod_jail.up(spec, jail, layout, cgroup=False)
        pod_jail.record(root=str(root))
        try:
            jails.bind_on_host(root, layout, jail.gid)
            for b in copies:
                shutil.copyfile(b.source, root / b.target)
        except OSError as exc:
            raise JailError(f"cannot prepare the pod's files for libvirt under {root}: {exc}") from exc
        shares.grant(self.config.data_dir, pod.uuid, Pod.live_uuids(self.config.data_dir), LIBVIRT_QEMU_DIR,
                     jail.uid, write=False, perm=1)
        for name in (spec.console_socket, *(p.path for p in spec.ports if p.kind == "socket")):
            link = pod.file(name)
            link.unlink(missing_ok=True)
            link.symlink_to(root / Path(name).name)
        label = opts.exec_label  # set only where SELinux is enabled
        lent = self._lend_taps(pod, spec)
        nics = tuple(replace(n, tap=lent[n.tap][0]) if n.tap else n for n in jailed.nics)
        xml = build_domain_xml(replace(jailed, nics=nics), uuid=pod.uuid, pod_dir=pod.path, qemu=str(emulator),
                               jail=jail, selinux_label=label, socket_dir=root)
        pod.file("domain.xml").write_text(xml)
        pod.write_json(RUN_RECORD, {**record, "domain": spec.name, "uri": self.uri})
        conn = self._connect()
        lv = _libvirt()
        try:
            dom = conn.createXML(xml, VIR_DOMAIN_START_PAUSED)
        except lv.libvirtError as exc:
            raise VMLaunchError(f"libvirt could not start the pod's domain: {exc}") from exc
        handle = _Domain(conn, spec.name)
        try:
            if lent:  # libvirtd holds them open: back into the pod's namespace, before the guest runs
                taps.bring_back(str(spec.netns), [(ifname, tap, host) for tap, (host, ifname) in lent.items()])
            pid = int((LIBVIRT_PID_DIR / f"{spec.name}.pid").read_text().strip())
            cg = cgroups.adopt(pid, jail.cgroup_parent, pod.uuid, jail)
            pod_jail.record(cgroup=cg.to_dict())
            pod.write_json(PID_FILE, {"pid": pid, "started": time.time()})
            outputs.connect()  # libvirt's QEMU listens; the guest has not run yet
        except (OSError, ValueError, KvmrktError, lv.libvirtError) as exc:
            handle.kill()
            raise VMLaunchError(f"the pod's domain could not be put under its limits: {exc}") from exc
        try:
            measured()
            dom.resume()
        except lv.libvirtError as exc:
            handle.kill()
            raise VMLaunchError(f"libvirt could not resume the pod's domain: {exc}") from exc
        except BaseException:
            handle.kill()
            raise
        return handle

    @staticmethod
    def _lend_taps(pod: Pod, spec: VMSpec) -> dict[str, tuple[str, str]]:
        """Lend the pod's taps to libvirtd's (the host's) namespace: {tap: (name there, its CNI interface)}."""
        lent = {n.tap: (taps.host_name(pod.uuid, i), n.ifname) for i, n in enumerate(spec.nics) if n.tap}
        if lent:
            try:
                taps.lend(str(spec.netns), [(tap, host) for tap, (host, _) in lent.items()])
            except NetworkError as exc:
                raise VMLaunchError(f"cannot hand the pod's taps to libvirtd: {exc.message}") from exc
        return lent

    def destroy(self, pod: Pod) -> None:
        """libvirt owns the process: destroy the domain (raises ``Stage1Error`` if libvirtd is unreachable)."""
        _Domain(self._connect(), f"kvmrkt-{pod.uuid}").kill()

    def facts(self, pod: Pod) -> dict[str, Any]:
        rec = pod.read_json(RUN_RECORD, {}) or {}
        return {"domain": rec.get("domain"), "uri": rec.get("uri")}


class LibvirtStage1(VmStage1):
    """The ``libvirt`` backend: a pod VM run by ``LibvirtDomain``."""

    name = "libvirt"
    hypervisor = LibvirtDomain
