"""The pure parts of CRI pods in one VM (kvmrkt.ocirt.sandbox): which bundles are containers of a sandbox, the
namespaces they may share (their sandbox's only), the container they become in the VM, and their status."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kvmrkt.errors import ConfigError, ManifestError
from kvmrkt.ocirt import sandbox
from kvmrkt.ocirt.bundle import load_bundle

from .test_oci import bundle

CRI = {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "abc",
       "io.kubernetes.cri.image-name": "docker.io/library/busybox:1.36"}


def shared(pid: int, *kinds: str) -> list[dict[str, Any]]:
    names = {"network": "net", "ipc": "ipc", "uts": "uts", "cgroup": "cgroup"}
    return [{"type": "pid"}, *({"type": k, "path": f"/proc/{pid}/ns/{names[k]}"} for k in kinds)]


def test_a_cri_container_names_its_sandbox_and_shares_its_namespaces(tmp_path: Path) -> None:
    b = load_bundle(bundle(tmp_path, annotations=CRI, linux__namespaces=shared(42, "network", "ipc", "uts")))
    assert b.sandbox_id == "abc" and sandbox.named_pids(b) == {42}
    sandbox.check_joined(b, 42)
    with pytest.raises(ManifestError, match=r"the network namespace /proc/42/ns/net is not the sandbox's"):
        sandbox.check_joined(b, 43)
    with pytest.raises(ManifestError, match=r"the ipc namespace at /proc/42/ns/ipc cannot be joined: it is no "):
        sandbox.check_standalone(b)


def test_a_podman_pods_container_names_its_infra_and_the_pods_netns(tmp_path: Path) -> None:
    spaces = [*shared(42, "ipc", "uts", "cgroup"), {"type": "network", "path": "/run/netns/netns-1"}]
    b = load_bundle(bundle(tmp_path, annotations={}, linux__namespaces=spaces))
    assert b.sandbox_id is None and sandbox.named_pids(b) == {42}
    sandbox.check_joined(b, 42, "/run/netns/netns-1")
    with pytest.raises(ManifestError, match="the network namespace /run/netns/netns-1 is not the sandbox's"):
        sandbox.check_joined(b, 42, "/run/netns/netns-2")


def test_a_container_with_a_vm_of_its_own_joins_only_a_network_namespace(tmp_path: Path) -> None:
    b = load_bundle(bundle(tmp_path, annotations={}, linux__namespaces=[{"type": "network", "path": "/run/netns/x"}]))
    assert b.netns == "/run/netns/x" and sandbox.named_pids(b) == set()
    sandbox.check_standalone(b)


@pytest.mark.parametrize("kind", ["pid", "mount", "user", "time"])
def test_no_container_can_join_other_namespaces(tmp_path: Path, kind: str) -> None:
    with pytest.raises(ManifestError, match=f"the {kind} namespace at /proc/42/ns/x cannot be joined"):
        load_bundle(bundle(tmp_path, annotations=CRI, linux__namespaces=[{"type": kind, "path": "/proc/42/ns/x"}]))


def test_without_a_sandbox_id_a_bundle_is_no_cri_container(tmp_path: Path) -> None:
    for notes in ({**CRI, "io.kubernetes.cri.sandbox-id": ""}, {**CRI, "io.kubernetes.cri.container-type": "sandbox"},
                  {}):
        assert load_bundle(bundle(tmp_path, annotations=notes)).sandbox_id is None


def test_the_container_in_the_vm(tmp_path: Path) -> None:
    b = load_bundle(bundle(tmp_path, annotations=CRI))
    name = sandbox.guest_name("0123" * 16)
    assert name == sandbox.guest_name("0123" * 16) != sandbox.guest_name("0124" * 16)
    assert len(name) <= 40 and name.isalnum()
    spec = sandbox.container_spec(b, name, frozenset(), join="container")
    assert spec.name == spec.app.name == name and spec.join == "container"
    assert spec.rootfs == tmp_path / "rootfs" and spec.read_only
    assert [v.name for v in spec.volumes] == [f"{name}-m2", f"{name}-m3", f"{name}-m4"]
    assert {m.volume for m in spec.app.mounts} == {v.name for v in spec.volumes}
    assert spec.app.exec == ("/bin/sh", "-c", "echo hi") and spec.app.uid == 1000
    event = sandbox.measured_app(b, name, {"scope": "s", "signers": [], "insecure": True, "dependencies": []})
    assert event["app"] == name and event["config"] == b.config_digest and event["rootfs"].startswith("dir:")


def test_status_follows_the_holder(tmp_path: Path) -> None:
    cid = "the-container"
    pid = os.fork()
    if pid == 0:  # a stand-in holder whose command line names the container, as kvmrkt-oci's does
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", cid])
    try:
        for _ in range(200):
            if cid.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                break
            time.sleep(0.01)
        assert sandbox.status(tmp_path, pid, cid) == "created"
        (tmp_path / sandbox.STARTED).write_text("7")
        assert sandbox.status(tmp_path, pid, cid) == "running"
        assert sandbox.status(tmp_path, pid, "another") == "stopped"  # a reused pid is not the holder
        (tmp_path / sandbox.EXIT).write_text("0")
        assert sandbox.status(tmp_path, pid, cid) == "stopped"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_sandbox_is_sized_by_its_pods_annotations(tmp_path: Path) -> None:
    sizes = {"io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-memory": str(600 << 20),
             "io.kubernetes.cri.sandbox-cpu-quota": "250000", "io.kubernetes.cri.sandbox-cpu-period": "100000"}
    b = load_bundle(bundle(tmp_path, annotations=sizes, linux__resources=None))
    assert (b.memory_mib, b.cpus) == (600, 3)
    with pytest.raises(ManifestError, match="sandbox-memory must be a positive integer"):
        load_bundle(bundle(tmp_path, annotations={**sizes, "io.kubernetes.cri.sandbox-memory": "-1"}))


@pytest.mark.parametrize(("left_out", "field"), [("network", "hostNetwork"), ("ipc", "hostIPC"), ("pid", "hostPID")])
def test_a_kubernetes_pod_asking_for_the_nodes_namespaces_is_refused(tmp_path: Path, left_out: str,
                                                                     field: str) -> None:
    every = [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")]
    for kind in ("sandbox", "container"):
        notes = {**CRI, "io.kubernetes.cri.container-type": kind}
        b = load_bundle(bundle(tmp_path, annotations=notes, linux__namespaces=every))
        sandbox.check_cri_namespaces(b)
        b = load_bundle(bundle(tmp_path, annotations=notes,
                               linux__namespaces=[n for n in every if n["type"] != left_out]))
        with pytest.raises(ManifestError, match=f"the pod asks for {field}"):
            sandbox.check_cri_namespaces(b)
    sandbox.check_cri_namespaces(load_bundle(bundle(tmp_path, annotations={}, linux__namespaces=[])))  # not a pod's


def test_start_refuses_a_fifo_nobody_holds_and_a_file_that_is_no_fifo(tmp_path: Path) -> None:
    sandbox.make_fifo(tmp_path)
    with pytest.raises(ConfigError, match="did not take the start"):  # the holder is gone: no writer
        sandbox.release(tmp_path, timeout=0.2)
    (tmp_path / sandbox.EXEC_FIFO).unlink()
    (tmp_path / sandbox.EXEC_FIFO).write_text("planted")
    with pytest.raises(ConfigError, match="is not the container's start fifo"):
        sandbox.release(tmp_path, timeout=0.2)
