"""What a VM stage1 needs from a hypervisor: start a described VM jailed, kill it, report its extra facts.

Role: the seam between ``stage1_kvm.vm.VmStage1`` (everything a pod VM needs whatever runs it: assets, VM
description, pod initramfs, measurement facts, output, supervision, the guest agent, status, gc) and the one
piece that owns the VMM process (``stage1_kvm.qemu.QemuProcess``: QEMU started directly;
``stage1_kvm.libvirt.LibvirtDomain``: a transient libvirt domain). A new hypervisor is one new module with one
``Hypervisor`` subclass and a two-line ``VmStage1`` subclass registered in ``kvmrkt.stage1.BACKENDS``.
Trust boundary: a hypervisor runs the untrusted guest; it must run the VMM as the pod's jail uid/gid without
capabilities inside the limits, hold the pod lock for the VM's life where it can, and signal or destroy only
what it recorded for this pod (never a pid it has not checked).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from kvmrkt.config import RuntimeConfig
from kvmrkt.pods.pod import Pod
from kvmrkt.stage1 import RunOptions
from stage1_kvm.output import OutputPump
from stage1_kvm.vmspec import VMSpec

if TYPE_CHECKING:
    from stage1_kvm.template import Template

RUN_RECORD = "stage1-run.json"  # written by launch: the stage1 record plus the hypervisor's own facts
PID_FILE = "pid"  # written by launch: {"pid", "started"} of the VMM process
QEMU_LOG = "qemu.log"  # the VMM's own stdout/stderr (empty where the hypervisor keeps its own log)


class VMHandle(Protocol):
    """What supervising a VM needs: ``subprocess.Popen`` for QEMU, a domain wrapper for libvirt."""

    returncode: int | None

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


class Hypervisor(ABC):
    """Runs and kills one pod's VM. Like ``Stage1``, every method but ``launch`` may run in another kvmrkt
    process than the one that launched the VM: state lives in the pod directory (``RUN_RECORD``, ``PID_FILE``)."""

    name: ClassVar[str]
    # Network modes this hypervisor can run, and whether it can forward ports in user mode (the VmStage1 using
    # it advertises the same).
    network_modes: ClassVar[frozenset[str]] = frozenset({"none", "user", "cni"})
    user_port_forwards: ClassVar[bool] = True
    # Whether ``launch`` can restore a VM template (``stage1_kvm.template``) instead of booting.
    templates: ClassVar[bool] = False

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config

    @abstractmethod
    def accel(self, requested: str) -> str:
        """Resolve ``auto|kvm|tcg`` to the accelerator to use (raises ``AccelError`` if it cannot work here)."""

    @abstractmethod
    def vmm(self) -> str:
        """The VMM binary, resolved before anything of the pod is written (raises ``ConfigError`` if missing)."""

    @abstractmethod
    def launch(self, pod: Pod, spec: VMSpec, opts: RunOptions, record: dict[str, Any], *, vmm: str, guard: Path,
               outputs: OutputPump, measured: Callable[[], None], template: Template | None = None) -> VMHandle:
        """Start the VM for ``spec`` jailed (``opts.jail``), through the VMM guard ``guard``; write ``RUN_RECORD``
        (``record`` plus the hypervisor's facts) and ``PID_FILE``; call ``outputs.connect()`` before the guest can
        write anything. The VMM may start before ``measured()`` returned (the measured launch's gate), but no guest
        code runs until it did; if it raises, the VMM is killed and the error passes on. With ``template`` (only
        where ``templates``), restore it instead of booting, and return once the guest runs (it then waits for its
        handoff). Raises ``VMLaunchError``/``JailError``/
        ``TemplateError`` (the caller undoes the jail)."""

    def quit(self, pod: Pod) -> None:
        """Ask the VMM to end the VM now, best effort (the first step of a hard kill; ``destroy`` follows)."""
        del pod

    @abstractmethod
    def destroy(self, pod: Pod) -> None:
        """Kill the pod's VM by what ``launch`` recorded (idempotent; nothing if it is gone)."""

    def facts(self, pod: Pod) -> dict[str, Any]:
        """Extra status facts of this hypervisor, read from the pod directory (``BackendStatus.extra``)."""
        del pod
        return {}
