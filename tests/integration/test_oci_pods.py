"""kvmrkt-oci's Kubernetes pod model driven by its own command line, as containerd's shim drives it: a sandbox
(``io.kubernetes.cri.container-type: sandbox``) boots the pod's VM; containers naming it
(``io.kubernetes.cri.sandbox-id``) are created inside that VM, each with its own pid (its holder), state, start,
kill, exec, exit status and delete; each is measured as one more app of the pod; the hostile cases are refused."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from kvmrkt.host.wait import wait_until

from .conftest import Oci, use_backend
from .test_oci import subreaper, wait_exit  # noqa: F401 (a fixture)

SANDBOX = {"io.kubernetes.cri.container-type": "sandbox"}


def member(sandbox: str, pid: int) -> dict[str, Any]:
    """The annotations and shared namespaces containerd gives a container of ``sandbox`` (whose pid is ``pid``)."""
    return {"annotations": {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": sandbox,
                            "io.kubernetes.cri.image-name": "localhost/busybox:test"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc", "path": f"/proc/{pid}/ns/ipc"},
                                     {"type": "uts", "path": f"/proc/{pid}/ns/uts"},
                                     {"type": "network", "path": f"/proc/{pid}/ns/net"}]}}


@pytest.mark.parametrize("backend", ["qemu", "libvirt"])
def test_containers_of_a_sandbox_share_its_vm(oci: Oci, tmp_path: Path, request: pytest.FixtureRequest,
                                              backend: str) -> None:
    use_backend(oci.kvmrkt, request, backend)  # (libvirtd first: one started under a subreaper would be its child)
    request.getfixturevalue("subreaper")
    box = oci.bundle(tmp_path / "box", ["/bin/sleep", "600"], annotations=SANDBOX, hostname="podhost")
    rc, _, err = oci.create("box", box)
    assert rc == 0, err.read_text()
    assert oci("start", "box").returncode == 0
    box_pid = oci.pid("box", box)

    a = oci.bundle(tmp_path / "a", ["/bin/sh", "-c", "read x; echo got $x on $(hostname); exit 7"],
                   **member("box", box_pid))
    (tmp_path / "in").write_text("input\n")
    with (tmp_path / "in").open() as stdin:
        rc, out, err = oci.create("a", a, stdin=stdin)
    assert rc == 0, err.read_text()
    holder = oci.pid("a", a)
    st = oci.state("a")
    assert st["status"] == "created" and st["pid"] == holder and st["pod"] == oci.state("box")["pod"]
    assert len(json.loads(oci.kvmrkt.ok("list", "--format", "json").out)) == 1  # no VM of its own
    assert oci("start", "a").returncode == 0
    assert wait_exit(holder) == 7
    assert out.read_text() == "got input on podhost\n"  # its stdin, its output, the pod's UTS namespace
    assert oci.state("a")["status"] == "stopped"
    assert oci("kill", "a", "TERM").returncode == 1 and "container not running" in oci("kill", "a", "TERM").stderr
    assert oci("delete", "a").returncode == 0

    # A long-running one: exec into it, signals reach it, the sandbox outlives it.
    b = oci.bundle(tmp_path / "b", ["/bin/sh", "-c", "trap 'echo term; exit 9' TERM; echo ready; "
                                    "while true; do sleep 0.1; done"], **member("box", box_pid))
    rc, out, err = oci.create("b", b)
    assert rc == 0, err.read_text()
    assert oci("start", "b").returncode == 0
    assert oci.wait_status("b", "running")["status"] == "running"
    res = oci("exec", "b", "/bin/sh", "-c", "echo in $(hostname); exit 4")
    assert res.returncode == 4 and res.stdout == "in podhost\n", res.stderr
    assert wait_until(lambda: "ready" in out.read_text(), timeout=30)  # its trap is set
    assert oci("kill", "b", "TERM").returncode == 0
    assert wait_exit(oci.pid("b", b)) == 9 and "term" in out.read_text()
    assert oci.state("box")["status"] == "running"

    # Held and ended by a signal before start: 128 + the signal, nothing ran.
    c = oci.bundle(tmp_path / "c", ["/bin/echo", "never"], **member("box", box_pid))
    rc, out, err = oci.create("c", c)
    assert rc == 0, err.read_text()
    assert oci("kill", "c", "TERM").returncode == 0
    assert wait_exit(oci.pid("c", c)) == 128 + signal.SIGTERM and out.read_text() == ""

    # Every container is measured as an app of the pod.
    log = json.loads(oci.kvmrkt.ok("attest", "log", "--format", "json").out)
    apps = [json.loads(e["event"].split(":", 2)[2]) for e in log["events"] if e["event"].split(":", 2)[1] == "app"]
    pod = oci.state("box")["pod"]
    assert {x["bundle"] for x in apps if x["pod"] == pod} == {str(box), str(a), str(b), str(c)}

    for cid in ("b", "c"):
        assert oci("delete", cid).returncode == 0
    assert oci("kill", "box", "KILL").returncode == 0
    wait_exit(box_pid)
    assert oci("delete", "box").returncode == 0
    assert json.loads(oci.kvmrkt.ok("list", "--format", "json").out) == []


def test_a_container_reaches_only_its_own_running_sandbox(oci: Oci, tmp_path: Path, subreaper: None) -> None:  # noqa: F811
    lone = oci.bundle(tmp_path / "lone", ["/bin/true"], **member("nosuchbox", 1))
    rc, _, err = oci.create("lone", lone)
    assert rc != 0 and "its sandbox 'nosuchbox' is not a kvmrkt-oci container" in err.read_text()

    box = oci.bundle(tmp_path / "box", ["/bin/sleep", "600"], annotations=SANDBOX)
    assert oci.create("box", box)[0] == 0
    box_pid = oci.pid("box", box)
    held = oci.bundle(tmp_path / "held", ["/bin/true"], **member("box", box_pid))
    rc, _, err = oci.create("held", held)
    assert rc != 0 and "is not a running pod VM" in err.read_text()  # created, not started yet
    assert oci("start", "box").returncode == 0

    # The node's namespaces (PID 1's), or another process's, are not the sandbox's.
    for pid in (1, box_pid + 100000):
        other = oci.bundle(tmp_path / f"other{pid}", ["/bin/true"], **member("box", pid))
        rc, _, err = oci.create(f"other{pid}", other)
        assert rc != 0 and "is not the sandbox's" in err.read_text()
    shares_pid = member("box", box_pid)
    shares_pid["linux"]["namespaces"][0] = {"type": "pid", "path": f"/proc/{box_pid}/ns/pid"}
    pidns = oci.bundle(tmp_path / "pidns", ["/bin/true"], **shares_pid)
    rc, _, err = oci.create("pidns", pidns)
    assert rc != 0 and "the pid namespace at" in err.read_text() and "cannot be joined" in err.read_text()
    states = [json.loads(oci("list", "--format", "json").stdout or "[]")]
    assert [c["id"] for c in states[0]] == ["box"], states  # nothing half-made was left
    assert oci("kill", "box", "KILL").returncode == 0
    wait_exit(box_pid)
    assert oci("delete", "box").returncode == 0
