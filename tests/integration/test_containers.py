"""Containers created inside a running pod VM (the CRI "pod sandbox = VM" model, ``stage1_kvm/guest/containers.c``).

A sandbox VM is booted through kvmrkt-oci (its app 0 ``container`` sleeps); a busybox rootfs and bind volumes are
bound into its shared export with ``stage1_kvm.export.bind``, the container's config is written to
``POD/shared/ctr/<name>.cfg`` (``vmspec.guest_container_config``), and the container is driven through
``agent.ContainerSession`` over the pod supervisor's ``enter.sock``. Real VMs under TCG.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmrkt.errors import AgentError
from kvmrkt.ocirt.bundle import STATE_DIR
from kvmrkt.pods.manifest import AppSpec, MountPoint, Volume
from kvmrkt.pods.pod import Pod
from stage1_kvm import agent, export
from stage1_kvm.ctlmux import SESSIONS_SOCKET
from stage1_kvm.vmspec import (
    CONTAINERS_DIR,
    EXPORT_DIR,
    container_config_path,
    escape,
    export_path,
    guest_container_config,
)

from .conftest import Oci

pytestmark = pytest.mark.usefixtures("capabilities")

APP0 = "container"  # the sandbox's app (kvmrkt/ocirt/bundle.py:APP)


@dataclass
class Sandbox:
    """A running sandbox VM and what its containers need from the host."""

    oci: Oci
    pod_dir: Path
    uuid: str
    uid: int
    gid: int
    rootfs: Path
    bound: set[str] = field(default_factory=set)

    @property
    def export(self) -> Path:
        return self.pod_dir / EXPORT_DIR

    def bind(self, volume: Volume) -> None:
        if volume.name in self.bound:
            return
        data = self.oci.kvmrkt.data
        export.bind(self.export, volume, data_dir=data, pod=self.uuid, live=Pod.live_uuids(data), uid=self.uid,
                    gid=self.gid)
        self.bound.add(volume.name)

    def write(self, name: str, text: bytes) -> None:
        """The container's config, as the host writes it (0640 root:<the pod's group>)."""
        ctr = self.export / CONTAINERS_DIR
        if not ctr.exists():
            ctr.mkdir(mode=0o750)
            os.chown(ctr, 0, self.gid)
        path = self.export / (container_config_path(name) if re.fullmatch(r"[a-z0-9-]{1,40}", name)
                              else f"{CONTAINERS_DIR}/{name}.cfg")
        path.write_bytes(text)
        os.chown(path, 0, self.gid)
        path.chmod(0o640)

    def config(self, name: str, argv: list[str], *, volumes: tuple[Volume, ...] = (),
               mounts: tuple[MountPoint, ...] = (), read_only: bool = True, share: bool = True) -> None:
        """Bind the busybox rootfs as the container's root and write its config running ``argv``."""
        root = Volume(name=f"{name}-root", kind="bind", source=str(self.rootfs), read_only=read_only)
        self.bind(root)
        for v in volumes:
            if v.kind == "bind":
                self.bind(v)
        app = AppSpec(name=name, image_id="", image_name="busybox", rootfs_digest="", exec=tuple(argv),
                      env=(("PATH", "/bin:/usr/bin:/sbin:/usr/sbin"),), mounts=mounts)
        shared = APP0 if share else None
        self.write(name, guest_container_config(app, volumes, root=export_path(root), read_only=read_only,
                                                join=shared, shm=shared))

    def create(self, name: str, *, tty: bool = False, stdin: bool = False) -> agent.ContainerSession:
        return agent.ContainerSession.create(self.pod_dir, SESSIONS_SOCKET, name, tty=tty, stdin=stdin)

    def enter(self, app: str, argv: list[str]) -> tuple[int, str, str]:
        out, err = io.BytesIO(), io.BytesIO()
        code = agent.enter(self.pod_dir, SESSIONS_SOCKET, app, argv, stdout=out, stderr=err, timeout=60)
        return code, out.getvalue().decode(), err.getvalue().decode()

    def raw(self, line: str) -> str:
        """One request as a client would send it, bypassing agent.py's own checks; the first reply line."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s, agent.socket_path(self.pod_dir,
                                                                                      SESSIONS_SOCKET) as path:
            s.settimeout(60)
            s.connect(path)
            s.sendall(line.encode() + b"\n")
            return s.makefile("rb").readline().decode()


def run(session: agent.ContainerSession) -> tuple[int, str, str]:
    out, err = io.BytesIO(), io.BytesIO()
    session.go()
    code = session.relay(out, err)
    session.close()
    return code, out.getvalue().decode(), err.getvalue().decode()


@pytest.fixture
def sandbox(oci: Oci, tmp_path: Path) -> Sandbox:
    bundle = oci.bundle(tmp_path / "sb", ["sleep", "600"], hostname="sandbox-host")
    rc, _out, err = oci.create("sb", bundle)
    assert rc == 0, err.read_text()
    assert oci("start", "sb").returncode == 0
    assert oci.wait_status("sb", "running")["status"] == "running"
    uuid = json.loads((oci.root / STATE_DIR / "sb" / "state.json").read_text())["pod"]
    pod_dir = oci.kvmrkt.data / "pods" / "run" / uuid
    jail = json.loads((pod_dir / "jail.json").read_text())
    rootfs = tmp_path / "ctr-image"
    subprocess.run(["umoci", "unpack", "--image", f"{oci.busybox_layout}:latest", str(rootfs)], check=True,
                   capture_output=True)
    return Sandbox(oci, pod_dir, uuid, int(jail["uid"]), int(jail["gid"]), rootfs / "rootfs")


def test_output_exit_code_bind_volume_and_enter(sandbox: Sandbox, tmp_path: Path) -> None:
    data = tmp_path / "host-data"
    data.mkdir()
    (data / "file").write_text("from the host\n")
    vol = Volume(name="c1-data", kind="bind", source=str(data), read_only=True)
    sandbox.config("c1", ["sh", "-c", "cat /data/file; echo oops >&2; exit 7"], volumes=(vol,),
                   mounts=(MountPoint(volume="c1-data", target="/data"),))
    assert run(sandbox.create("c1")) == (7, "from the host\n", "oops\n")

    # A long-running container: ENTER reaches it (its namespaces, its volume), not app 0.
    work = Volume(name="c2-work", kind="empty")
    sandbox.config("c2", ["sh", "-c", "echo c2 > /work/mark; sleep 600"], volumes=(work,),
                   mounts=(MountPoint(volume="c2-work", target="/work"),))
    c2 = sandbox.create("c2")
    pid = c2.go()
    assert pid > 1
    assert sandbox.enter("c2", ["sh", "-c", "while ! cat /work/mark 2>/dev/null; do sleep 0.1; done"]) == (
        0, "c2\n", "")
    assert sandbox.enter(APP0, ["cat", "/work/mark"])[0] != 0  # another root
    c2.signal(signal.SIGKILL)
    assert c2.relay(io.BytesIO(), io.BytesIO()) == 137
    c2.close()


def test_containers_share_ipc_uts_and_shm_with_app0_not_pids(sandbox: Sandbox) -> None:
    probe = "for ns in ipc pid mnt; do readlink /proc/self/ns/$ns; done; hostname"
    sandbox.config("c2", ["sh", "-c", "echo shared > /dev/shm/from-c2; sleep 600"])
    c2 = sandbox.create("c2")
    c2.go()
    sandbox.config("c3", ["sh", "-c", f"cat /dev/shm/from-c2; {probe}"])
    code, out3, err3 = run(sandbox.create("c3"))
    assert code == 0, err3
    code, out2, _ = sandbox.enter("c2", ["sh", "-c", probe])
    assert code == 0
    code, out0, _ = sandbox.enter(APP0, ["sh", "-c", f"cat /dev/shm/from-c2; {probe}"])
    assert code == 0
    shm3, ipc3, pid3, mnt3, host3 = out3.split("\n")[:5]
    ipc2, pid2, mnt2, host2 = out2.split("\n")[:4]
    shm0, ipc0, pid0, mnt0, host0 = out0.split("\n")[:5]
    assert shm3 == shm0 == "shared"
    assert ipc3 == ipc2 == ipc0 and host3 == host2 == host0 == "sandbox-host"
    assert len({pid0, pid2, pid3}) == 3 and len({mnt0, mnt2, mnt3}) == 3
    c2.signal(signal.SIGTERM)  # its ns-init forwards it to sh
    assert c2.relay(io.BytesIO(), io.BytesIO()) == 143
    c2.close()


def test_stdin_and_tty(sandbox: Sandbox) -> None:
    sandbox.config("cin", ["sh", "-c", "tr a-z A-Z; echo done"])
    s = sandbox.create("cin", stdin=True)
    r, w = os.pipe()
    os.write(w, b"hello\n" * 1000)
    os.close(w)
    s.pump_input(r)
    code, out, _ = run(s)
    assert code == 0 and out == "HELLO\n" * 1000 + "done\n"

    sandbox.config("ctty", ["sh", "-c", "tty; stty size; stat -c %t:%T /dev/console $(tty)"])
    s = sandbox.create("ctty", tty=True)
    s.winsize(30, 100)  # while held: the terminal exists already
    code, out, _ = run(s)
    assert code == 0
    lines = out.replace("\r", "").split("\n")
    assert lines[:2] == ["/dev/pts/0", "30 100"] and lines[2] == lines[3]  # /dev/console is its terminal


def test_signal_before_go_and_after(sandbox: Sandbox) -> None:
    sandbox.config("held", ["sh", "-c", "touch /dev/shm/held-ran; sleep 600"])
    s = sandbox.create("held")
    s.signal(signal.SIGTERM)
    with pytest.raises(AgentError, match="ended"):
        s.go()
    assert s.relay(io.BytesIO(), io.BytesIO()) == 128 + signal.SIGTERM
    s.close()
    assert sandbox.enter(APP0, ["ls", "/dev/shm/held-ran"])[0] != 0  # no process ran
    with pytest.raises(AgentError, match=r"not running|no such"):
        sandbox.enter("held", ["true"])

    s = sandbox.create("held")  # the name is free again
    s.go()
    s.signal(signal.SIGKILL)
    assert s.relay(io.BytesIO(), io.BytesIO()) == 137
    s.close()


def _shmem_kib(sandbox: Sandbox) -> int:
    code, out, _ = sandbox.enter(APP0, ["cat", "/proc/meminfo"])
    assert code == 0
    return int(re.search(r"^Shmem:\s+(\d+) kB", out, re.M).group(1))  # type: ignore[union-attr]


def test_exit_leaves_nothing_behind(sandbox: Sandbox) -> None:
    """A container's tmpfs volume (guest memory) is freed when it exits, its registry
    entry is gone (ENTER fails), and the same name can be created again: containers come and go in a long-lived
    VM. Measured through the VM's Shmem (tmpfs pages), which a leaked mount would keep."""
    vol = Volume(name="cx-scratch", kind="empty")
    write = "cat /scratch/was-here 2>/dev/null; dd if=/dev/zero of=/scratch/f bs=1M count=16 2>/dev/null; " \
            "echo x > /scratch/was-here; ls /scratch"
    sandbox.config("cx", ["sh", "-c", write], volumes=(vol,), mounts=(MountPoint(volume="cx-scratch",
                                                                                    target="/scratch"),))
    before = _shmem_kib(sandbox)
    for _ in range(3):
        code, out, err = run(sandbox.create("cx"))
        assert (code, out) == (0, "f\nwas-here\n"), err  # a fresh volume each time (was-here was not there)
        with pytest.raises(AgentError, match="no such app or running container"):
            sandbox.enter("cx", ["true"])
    after = _shmem_kib(sandbox)
    print(f"Shmem before {before} kB, after 3 containers that wrote 16 MiB each into a tmpfs volume: {after} kB")
    assert after - before < 4096, (before, after)


def test_hostile_creates_fail_clearly_and_mount_nothing(sandbox: Sandbox) -> None:
    for bad in ("..", "a%2Fb", "%2E%2E%2Fetc", "A", "x" * 41, "%"):
        reply = sandbox.raw(f"CREATE {bad}")
        assert reply.startswith("FAIL ") and "bad%20container%20name" in reply, (bad, reply)
    with pytest.raises(AgentError, match="bad container name"):
        sandbox.create("../x")  # refused before it reaches the guest

    with pytest.raises(AgentError, match=r"missing: .*/ctr/missing\.cfg: No such file"):
        sandbox.create("missing")
    sandbox.config("two", ["true"])
    good = (sandbox.export / container_config_path("two")).read_bytes()
    sandbox.write("two", good + good[good.index(b"app "):])
    with pytest.raises(AgentError, match="exactly one app"):
        sandbox.create("two")
    sandbox.write("two", re.sub(rb"rootdir [^\n]*\n", b"", good))
    with pytest.raises(AgentError, match="no rootdir"):
        sandbox.create("two")
    for root in ("binds/two-root/../../..", "/binds/two-root/rootfs", "binds/./two-root"):
        sandbox.write("two", re.sub(rb"rootdir \S+", b"rootdir " + escape(root).encode(), good))
        with pytest.raises(AgentError, match="rootdir must be a relative path"):
            sandbox.create("two")
    sandbox.write("two", good.replace(b"version 6", b"version 5"))
    with pytest.raises(AgentError, match="not valid"):
        sandbox.create("two")
    # Nothing of those stayed registered or mounted: the name works once the config does.
    sandbox.write("two", good)
    assert run(sandbox.create("two"))[0] == 0
    with pytest.raises(AgentError, match="no such app or running container"):
        sandbox.enter("missing", ["true"])
