"""stage1_kvm.vm + stage1_kvm.hypervisor: backends are a VmStage1 composing a Hypervisor; BackendStatus is the
typed status with today's JSON keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from kvmrkt.config import RuntimeConfig
from kvmrkt.errors import Stage1Error
from kvmrkt.pods.pod import Pod
from kvmrkt.stage1 import BackendStatus, RunOptions
from stage1_kvm.hypervisor import PID_FILE, RUN_RECORD, Hypervisor, VMHandle
from stage1_kvm.libvirt import LibvirtDomain, LibvirtStage1
from stage1_kvm.output import OutputPump
from stage1_kvm.qemu import QemuProcess, QemuStage1
from stage1_kvm.vm import VmStage1
from stage1_kvm.vmspec import VMSpec

STATUS_KEYS = ["backend", "accel", "pid", "started", "memory_mib", "vcpus", "kernel", "guest_ready", "app_pids",
               "app_exit_codes", "app_errors", "integrity_failures", "jail"]


def test_backend_status_keeps_the_json_keys_and_puts_hypervisor_facts_last() -> None:
    st = BackendStatus(backend="libvirt", pid=7, integrity_failures=("x",), extra={"domain": "d", "uri": "u"})
    doc = st.to_dict()
    assert list(doc) == [*STATUS_KEYS, "domain", "uri"]
    assert doc["integrity_failures"] == ["x"] and doc["pid"] == 7 and doc["app_exit_codes"] == {}
    assert list(BackendStatus(backend="qemu").to_dict()) == STATUS_KEYS


@pytest.mark.parametrize(("backend", "hypervisor"), [(QemuStage1, QemuProcess), (LibvirtStage1, LibvirtDomain)])
def test_backends_only_name_their_hypervisor(backend: type[VmStage1], hypervisor: type[Hypervisor]) -> None:
    assert backend.hypervisor is hypervisor and backend.__bases__ == (VmStage1,)
    assert {k for k in vars(backend) if not k.startswith("_")} == {
        "name", "hypervisor", "network_modes", "user_port_forwards"}  # no behaviour of their own
    assert (backend.network_modes, backend.user_port_forwards) == (hypervisor.network_modes,
                                                                   hypervisor.user_port_forwards)
    assert LibvirtStage1.network_modes == {"none", "user", "cni"} and not LibvirtStage1.user_port_forwards


class FakeHypervisor(Hypervisor):
    name = "fake"
    network_modes = frozenset({"none"})
    calls: ClassVar[list[str]] = []

    def accel(self, requested: str) -> str:
        return "tcg"

    def vmm(self) -> str:
        return "/bin/false"

    def launch(self, pod: Pod, spec: VMSpec, opts: RunOptions, record: dict[str, Any], *, vmm: str, guard: Path,
               outputs: OutputPump) -> VMHandle:
        raise AssertionError("not launched here")

    def quit(self, pod: Pod) -> None:
        self.calls.append("quit")

    def destroy(self, pod: Pod) -> None:
        self.calls.append("destroy")
        raise Stage1Error("cannot reach the hypervisor")

    def facts(self, pod: Pod) -> dict[str, Any]:
        return {"vm": "fake-" + pod.uuid[:4]}


class FakeStage1(VmStage1):
    name = "fake"
    hypervisor = FakeHypervisor


@pytest.fixture
def pod(tmp_path: Path) -> Pod:
    pod = Pod.create(tmp_path)
    pod.write_json(RUN_RECORD, {"accel": "tcg", "memory_mib": 256, "vcpus": 1, "kernel": {"kind": "minimal"}})
    pod.write_json(PID_FILE, {"pid": 4242, "started": 1.5})
    pod.file("guest-status").write_text("READY\nSTART app 9\nEXIT app 3\n")
    return pod


def test_status_is_read_from_the_pod_directory_with_the_hypervisor_facts(tmp_path: Path, pod: Pod) -> None:
    st = FakeStage1(RuntimeConfig(data_dir=tmp_path)).status(pod)
    assert FakeStage1.network_modes == {"none"}
    assert (st.backend, st.accel, st.pid, st.started, st.memory_mib, st.vcpus) == ("fake", "tcg", 4242, 1.5, 256, 1)
    assert st.guest_ready and st.app_pids == {"app": 9} and st.app_exit_codes == {"app": 3}
    assert st.to_dict()["vm"] == "fake-" + pod.uuid[:4] and st.jail is None


def test_hard_stop_quits_then_destroys_and_gc_survives_an_unreachable_hypervisor(tmp_path: Path, pod: Pod) -> None:
    backend = FakeStage1(RuntimeConfig(data_dir=tmp_path))
    FakeHypervisor.calls.clear()
    with pytest.raises(Stage1Error):  # a forced stop that cannot kill says so
        backend.stop(pod, force=True)
    assert FakeHypervisor.calls == ["quit", "destroy"]
    pod.file("initrd.img").write_bytes(b"x")
    backend.gc(pod)  # gc does what it can and leaves the rest for the next one
    assert FakeHypervisor.calls[-1] == "destroy" and not pod.file("initrd.img").exists()
