"""Kubernetes pods under containerd's CRI (tests/integration/cri.py: a private containerd driven by crictl): the
harness itself with runc, and kvmrkt's sandbox model: one VM per pod sandbox, every container of the pod created
inside it, sharing the pod's network (localhost), IPC and /dev/shm, each in its own mount and PID namespaces."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .conftest import Kvmrkt, Oci
from .cri import PAUSE_IMAGE, POD_SUBNET, CriNode

BUSYBOX = "/bin/busybox"


def test_crictl_answers_and_a_runc_pod_gets_an_ip_and_leaves_nothing(cri: CriNode, tmp_path: Path) -> None:
    version = cri.crictl("version")
    assert version.returncode == 0 and "RuntimeName:  containerd" in version.stdout, version.stderr
    info = cri.crictl("info")
    assert info.returncode == 0, info.stderr
    conditions = {c["type"]: c["status"] for c in json.loads(info.stdout)["status"]["conditions"]}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}, info.stdout[:2000]
    assert cri.crictl("inspecti", PAUSE_IMAGE).returncode == 0

    run = cri.crictl("runp", "--runtime", "runc", str(cri.pod_config(tmp_path / "pod", "smoke")))
    assert run.returncode == 0, f"{run.stderr}\n{cri.log()}"
    pod = run.stdout.strip()
    status = json.loads(cri.crictl("inspectp", "-o", "json", pod).stdout)["status"]
    assert status["state"] == "SANDBOX_READY"
    assert ipaddress.ip_address(status["network"]["ip"]) in ipaddress.ip_network(POD_SUBNET)
    assert cri.shims() and cri.netns()

    assert cri.crictl("stopp", pod).returncode == 0
    assert cri.crictl("rmp", pod).returncode == 0
    assert cri.crictl("pods", "-q").stdout.split() == []
    assert cri.shims() == [] and cri.netns() == []


def _container(path: Path, name: str, command: list[str], **extra: Any) -> Path:
    cfg = {"metadata": {"name": name}, "image": {"image": PAUSE_IMAGE}, "command": command,
           "log_path": f"{name}.log", "linux": {"security_context": {"namespace_options": {"pid": 1}}}, **extra}
    path.write_text(json.dumps(cfg))
    return path


def _links(cri: CriNode) -> dict[str, str]:
    """The node namespace's links by name, with their kind (veth, bridge, tun, ...)."""
    out = cri.node_run("ip", "-d", "-j", "link", "show").stdout
    return {link["ifname"]: (link.get("linkinfo") or {}).get("info_kind", "") for link in json.loads(out)}


def _kvmrkt_pods(kvmrkt: Kvmrkt) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = json.loads(kvmrkt.ok("list", "--format", "json").out)
    return pods


@pytest.mark.timeout(900)
def test_a_kubernetes_pod_is_one_vm_with_every_container_inside(cri: CriNode, oci: Oci, kvmrkt: Kvmrkt,
                                                                 tmp_path: Path) -> None:
    node_links = _links(cri)
    pod_json = cri.pod_config(tmp_path / "pod", "web")
    pod_cfg = json.loads(pod_json.read_text())  # kubelet gives the pod's sizes: the sum of its containers' limits
    pod_cfg["linux"]["resources"] = {"memory_limit_in_bytes": 400 << 20, "cpu_quota": 150000, "cpu_period": 100000}
    pod_json.write_text(json.dumps(pod_cfg))
    run = cri.crictl("runp", "--runtime", "kvmrkt", str(pod_json))
    assert run.returncode == 0, f"{run.stderr}\n{cri.log()}"
    pod = run.stdout.strip()
    status = json.loads(cri.crictl("inspectp", "-o", "json", pod).stdout)["status"]
    assert status["state"] == "SANDBOX_READY"
    ip = status["network"]["ip"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(POD_SUBNET)
    pods = _kvmrkt_pods(kvmrkt)
    assert len(pods) == 1, pods
    vm = json.loads(kvmrkt.ok("status", "--format", "json", pods[0]["uuid"]).out)
    assert (vm["memory_mib"], vm["vcpus"]) == (400 + 128, 2), vm  # + [stage1] memory_overhead_mib

    # The server: ten volumes (host directories), a page served on the pod's port 8080.
    volumes = []
    for i in range(10):
        d = tmp_path / f"vol{i}"
        d.mkdir()
        (d / "f").write_text(f"volume {i}\n")
        volumes.append({"container_path": f"/v/{i}", "host_path": str(d), "readonly": i % 2 == 0})
    (tmp_path / "vol0" / "index.html").write_text("served from a kvmrkt pod\n")
    server_cfg = _container(tmp_path / "server.json", "server", [
        BUSYBOX, "sh", "-c", f"echo server up; exec {BUSYBOX} httpd -f -p 8080 -h /v/0"], mounts=volumes)
    sidecar_cfg = _container(tmp_path / "sidecar.json", "sidecar", [BUSYBOX, "sleep", "3600"])
    server = cri.crictl("create", pod, str(server_cfg), str(tmp_path / "pod" / "pod.json"))
    assert server.returncode == 0, f"{server.stderr}\n{cri.log()}"
    sid = server.stdout.strip()
    started = cri.crictl("start", sid)
    assert started.returncode == 0, f"{started.stderr}\n{cri.log()}"
    sidecar = cri.crictl("create", pod, str(sidecar_cfg), str(tmp_path / "pod" / "pod.json"))
    assert sidecar.returncode == 0, f"{sidecar.stderr}\n{cri.log()}"
    cid = sidecar.stdout.strip()
    started = cri.crictl("start", cid)
    assert started.returncode == 0, f"{started.stderr}\n{cri.log()}"
    assert len(_kvmrkt_pods(kvmrkt)) == 1, "a container got a VM of its own"

    def exec_(container: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return cri.crictl("exec", container, *argv)

    # The sidecar reaches the server on localhost; both see the same /dev/shm; each has its own PID namespace.
    fetch = exec_(cid, BUSYBOX, "timeout", "20", BUSYBOX, "wget", "-q", "-O", "-", "http://127.0.0.1:8080/")
    assert fetch.returncode == 0 and fetch.stdout == "served from a kvmrkt pod\n", fetch.stderr
    assert exec_(sid, BUSYBOX, "sh", "-c", "echo shared > /dev/shm/note").returncode == 0
    assert exec_(cid, BUSYBOX, "cat", "/dev/shm/note").stdout == "shared\n"
    ipc = [exec_(c, BUSYBOX, "readlink", "/proc/self/ns/ipc").stdout for c in (sid, cid)]
    assert ipc[0] == ipc[1] and ipc[0].startswith("ipc:"), ipc
    pidns = [exec_(c, BUSYBOX, "readlink", "/proc/self/ns/pid").stdout for c in (sid, cid)]
    assert pidns[0] != pidns[1] and pidns[0].startswith("pid:"), pidns
    for i in range(10):
        assert exec_(sid, BUSYBOX, "cat", f"/v/{i}/f").stdout == f"volume {i}\n"
    ro = exec_(sid, BUSYBOX, "touch", "/v/0/new")
    assert ro.returncode != 0 and not (tmp_path / "vol0" / "new").exists()
    assert exec_(sid, BUSYBOX, "touch", "/v/1/new").returncode == 0 and (tmp_path / "vol1" / "new").exists()
    failed = exec_(sid, BUSYBOX, "sh", "-c", "exit 3")
    assert failed.returncode != 0 and "exit code 3" in failed.stderr, failed.stderr  # crictl's words

    # From the node: the pod IP answers; the node's namespace gained only the bridge and the pod's veth.
    page = cri.node_run(BUSYBOX, "timeout", "20", BUSYBOX, "wget", "-q", "-O", "-", f"http://{ip}:8080/")
    assert page.stdout == "served from a kvmrkt pod\n", page.stderr
    gained = {name: kind for name, kind in _links(cri).items() if name not in node_links}
    assert set(gained.values()) <= {"veth", "bridge"} and list(gained.values()).count("veth") == 1, gained
    assert "ingress" not in cri.node_run("tc", "qdisc", "show").stdout

    logs = cri.crictl("logs", sid)
    assert "server up" in logs.stdout + logs.stderr, logs

    # Stop and remove the sidecar: the server keeps serving.
    assert cri.crictl("stop", "--timeout", "5", cid).returncode == 0
    state = json.loads(cri.crictl("inspect", "-o", "json", cid).stdout)["status"]
    assert state["state"] == "CONTAINER_EXITED", state
    assert cri.crictl("rm", cid).returncode == 0
    again = exec_(sid, BUSYBOX, "cat", "/v/3/f")
    assert again.returncode == 0 and again.stdout == "volume 3\n"
    page = cri.node_run(BUSYBOX, "timeout", "20", BUSYBOX, "wget", "-q", "-O", "-", f"http://{ip}:8080/")
    assert page.stdout == "served from a kvmrkt pod\n"

    # stopp/rmp leave nothing: no VM, no kvmrkt pod or kvmrkt-oci state, no shim, no netns, no veth.
    stopp = cri.crictl("stopp", pod)
    assert stopp.returncode == 0, f"{stopp.stderr}\n{cri.log()}"
    assert cri.crictl("rmp", pod).returncode == 0
    assert cri.crictl("pods", "-q").stdout.split() == []
    assert cri.shims() == [] and cri.netns() == []
    assert _kvmrkt_pods(kvmrkt) == []
    assert not list((cri.base / "kvmrkt-oci").rglob("state.json")), "kvmrkt-oci state left behind"
    assert "veth" not in _links(cri).values()
