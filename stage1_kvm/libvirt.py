"""The ``libvirt`` stage1 backend: the same pod VM as the ``qemu`` backend, run by libvirtd as a transient domain
named after the pod, so it shows up in ``virsh list`` and gets libvirt's sVirt confinement.

Role: reuse everything of ``QemuStage1`` (VM description, per-pod initramfs, measurement hook, supervision of
the guest's status and output files, enter/stop through the agent) and replace only what touches the VM process:
launch (``createXML`` of ``domain_xml``), force stop and gc (``destroy``), and status. The domain is transient:
when the guest ends (kvmrkt's init reboots, ``on_reboot=destroy``) libvirt forgets it; gc destroys a domain
left running by a killed ``kvmrkt run``. Unix sockets live in a short per-pod directory under
``/run/kvmrkt`` (libvirt binds them by absolute path, and pod directories can be deeper than the 108-byte
socket path limit), linked from the pod directory. Trust boundary: as for ``qemu``; libvirtd is trusted.
The libvirt Python binding is optional: this module imports it lazily and says how to install it.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any

from kvmrkt.errors import ConfigError, Stage1Error, VMLaunchError
from kvmrkt.pod import Pod
from kvmrkt.stage1 import RunOptions
from stage1_kvm.domain_xml import build_domain_xml
from stage1_kvm.qemu import PID_FILE, RUN_RECORD, QemuStage1, VMHandle
from stage1_kvm.vmspec import VMSpec

RUNTIME_DIR = Path("/run/kvmrkt")
DEFAULT_URI = "qemu:///system"


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError as exc:
        raise ConfigError("the libvirt backend needs the libvirt Python binding",
                          hint="pip install 'kvmrkt[libvirt]' (make setup installs it)") from exc
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised, not printed
    return libvirt


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
        deadline = time.monotonic() + (timeout if timeout is not None else 60)
        while self.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.returncode or 0


class LibvirtStage1(QemuStage1):
    """Pods as transient libvirt domains.

    Networking: --net=none and --net=user only. libvirtd opens taps in its own network namespace, so the
    per-pod namespace that CNI networks are built in cannot be handed to it; user mode has no port forwards
    (libvirt 9.0 forwards ports only with the passt backend).
    """

    network_modes = frozenset({"none", "user"})
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

    def _launch(self, pod: Pod, spec: VMSpec, qemu: str, opts: RunOptions, record: dict[str, Any]) -> VMHandle:
        sockets = self._socket_dir(pod)
        sockets.mkdir(parents=True, exist_ok=True, mode=0o700)
        for port in spec.ports:
            if port.kind == "socket":
                link = pod.file(port.path)
                link.unlink(missing_ok=True)
                link.symlink_to(sockets / Path(port.path).name)
        label = opts.exec_label  # set only where SELinux is enabled
        xml = build_domain_xml(spec, uuid=pod.uuid, pod_dir=pod.path, qemu=qemu, selinux_label=label,
                               socket_dir=sockets)
        pod.file("domain.xml").write_text(xml)
        pod.write_json(RUN_RECORD, {**record, "domain": spec.name, "uri": self.uri})
        conn = self._connect()
        lv = _libvirt()
        try:
            conn.createXML(xml, 0)
        except lv.libvirtError as exc:
            raise VMLaunchError(f"libvirt could not start the pod's domain: {exc}") from exc
        pod.write_json(PID_FILE, {"pid": None, "started": time.time()})
        return _Domain(conn, spec.name)

    def stop(self, pod: Pod, *, force: bool) -> None:
        if force:
            self._destroy(pod)
            return
        super().stop(pod, force=False)

    def _destroy(self, pod: Pod) -> None:
        _Domain(self._connect(), f"kvmrkt-{pod.uuid}").kill()

    def status(self, pod: Pod) -> dict[str, Any]:
        info = super().status(pod)
        rec = pod.read_json(RUN_RECORD, {}) or {}
        info.update({"domain": rec.get("domain"), "uri": rec.get("uri"), "pid": None})
        return info

    def gc(self, pod: Pod) -> None:
        with contextlib.suppress(Stage1Error, ConfigError):
            self._destroy(pod)
        shutil.rmtree(self._socket_dir(pod), ignore_errors=True)
        super().gc(pod)
