"""kvmrkt-oci against real VMs: its own command line (create/start/state/kill/delete/exec/ps), a real containerd
(Debian's, on a private socket) driving it through the stock runc shim with `ctr run --runc-binary`, and
Debian's podman with `--runtime`. State JSON is checked against the runtime-spec schema."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvmrkt.pods.manifest import Volume
from stage1_kvm import export as exports

from .conftest import BASE_CONFIG, Oci
from .registry import free_port
from .test_network import http_get

HTTPD = "mkdir -p /www && echo served from a VM > /www/index.html && exec httpd -f -p 80 -h /www"
# Wait (in the container) until its terminal has the size script(1) gave ctr's, then print it.
WAIT_SIZE = 'for i in $(seq 100); do s=$(stty size); [ "$s" = "33 101" ] && break; sleep 0.1; done; echo size $s'
# With a terminal, /dev/console is that terminal (the runtime spec's default device).
CONSOLE_IS_TTY = '[ "$(stat -c %t:%T /dev/console)" = "$(stat -c %t:%T $(tty))" ] && echo console is the tty'
# The runtime spec's default /dev (no console without a terminal), whatever the guest's devtmpfs holds.
OCI_DEV = "core fd full mqueue null ptmx pts random shm stderr stdin stdout tty urandom zero"
# Each line of /proc/self/mountinfo as "mount point:type:source".
MOUNTS_AWK = """'{i = 7; while ($i != "-") i++; print $5 ":" $(i+1) ":" $(i+2)}'"""
PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Make this test process the reaper of orphans, as containerd's shim is, so it sees supervisors exit."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def wait_exit(pid: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} did not exit")


def test_create_start_state_delete(oci: Oci, tmp_path: Path, subreaper: None) -> None:
    b = oci.bundle(tmp_path / "b", ["/bin/sh", "-c", "read x; echo hello $x from $(hostname); echo oops >&2; exit 3"],
                   hostname="ocibox")
    (tmp_path / "in").write_text("there\n")
    with (tmp_path / "in").open() as stdin:
        rc, out, err = oci.create("c1", b, stdin=stdin)
    assert rc == 0, err.read_text()
    pid = oci.pid("c1", b)
    st = oci.state("c1")
    assert st["status"] == "created" and st["pid"] == pid and st["bundle"] == str(b)
    assert json.loads(oci("ps", "--format", "json", "c1").stdout) == [pid]
    assert out.read_text() == ""  # held: nothing ran yet
    assert oci("start", "c1").returncode == 0
    assert wait_exit(pid) == 3  # the supervisor carries the process's exit status
    assert out.read_text() == "hello there from ocibox\n" and "oops" in err.read_text()
    st = oci.state("c1")
    assert st["status"] == "stopped" and st["pid"] == 0
    # The pod is an ordinary kvmrkt pod: measured, labelled, listed.
    pod = json.loads(oci.kvmrkt.ok("status", "--format", "json", st["pod"]).out)
    assert pod["measured"] is True and pod["selinux"]["process_label"]
    assert oci("start", "c1").returncode == 1
    assert oci("delete", "c1").returncode == 0
    assert oci("state", "c1").returncode == 1 and "does not exist" in oci("state", "c1").stderr
    assert oci.kvmrkt.ok("list", "--format", "json").out.strip() == "[]"


def test_measured_launch_records_the_bundle(oci: Oci, tmp_path: Path, subreaper: None) -> None:
    b = oci.bundle(tmp_path / "b", ["/bin/true"])
    assert oci.create("m1", b)[0] == 0
    oci("start", "m1")
    wait_exit(oci.pid("m1", b))
    log = json.loads(oci.kvmrkt.ok("attest", "log", "--format", "json").out)
    events = [e["event"].split(":", 2)[1:] for e in log["events"]]
    apps = [json.loads(data) for kind, data in events if kind == "app"]
    assert apps[-1]["bundle"] == str(b) and apps[-1]["image"] == "oci-bundle"
    config_digest = "sha256:" + hashlib.sha256((b / "config.json").read_bytes()).hexdigest()
    assert apps[-1]["config"] == config_digest
    assert apps[-1]["scope"] == "(oci bundle: not judged)" and apps[-1]["insecure"] is True
    # The same verdict schema as every other launch, saying honestly that no policy judged the bundle.
    trust = [json.loads(data) for kind, data in events if kind == "trust"][-1]["decisions"]
    assert trust == {apps[-1]["app"]: {
        "image": f"oci-bundle:{config_digest}", "identity": "oci-bundle", "scope": "(oci bundle: not judged)",
        "requirements": [], "signers": [], "insecure": True, "dependencies": []}}


def test_read_only_root_is_left_alone(oci: Oci, tmp_path: Path, subreaper: None) -> None:
    b = oci.bundle(tmp_path / "b", ["/bin/sh", "-c", "touch /x 2>/dev/null && exit 1; echo read-only; exit 0"],
                   root={"path": "rootfs", "readonly": True})
    before = sorted(p.name for p in (b / "rootfs" / "etc").iterdir())
    rc, out, err = oci.create("ro", b)
    assert rc == 0, err.read_text()
    oci("start", "ro")
    assert wait_exit(oci.pid("ro", b)) == 0 and out.read_text() == "read-only\n"
    assert sorted(p.name for p in (b / "rootfs" / "etc").iterdir()) == before  # nothing written into it
    assert oci("delete", "ro").returncode == 0


def test_a_writable_bundle_root_never_gets_privileged_files(oci: Oci, tmp_path: Path, subreaper: None) -> None:
    """The container is root in the guest; what it writes into its root on the host belongs to the pod's uid, is
    never set-uid or set-gid, never a device node; the root directory keeps its mode; the image's symlinks work.
    Its confinement comes from config.json's process fields."""
    attack = ("cp /bin/busybox /suid; chmod 4755 /suid; mknod /null c 1 3; chmod 0777 /; echo ok > /result; "
              "grep -E '^(CapBnd|Seccomp):' /proc/self/status; readlink /bin/sh")
    b = oci.bundle(tmp_path / "b", ["/bin/sh", "-c", attack])
    cfg = json.loads((b / "config.json").read_text())
    cfg["process"]["capabilities"] = {"bounding": ["CAP_CHOWN", "CAP_FOWNER", "CAP_MKNOD", "CAP_DAC_OVERRIDE"]}
    (b / "config.json").write_text(json.dumps(cfg))
    root = b / "rootfs"
    mode = stat.S_IMODE(root.stat().st_mode)
    rc, out, err = oci.create("w", b)
    assert rc == 0, err.read_text()
    oci("start", "w")
    assert wait_exit(oci.pid("w", b)) == 0, err.read_text()
    text = out.read_text()
    assert "CapBnd:\t000000000800000b" in text and "Seccomp:\t2" in text and "busybox" in text
    assert err.read_text().count("Operation not permitted") == 3
    pod = json.loads(oci.kvmrkt.ok("status", "--format", "json", oci.state("w")["pod"]).out)
    uid = pod["jail"]["uid"]
    assert stat.S_IMODE(root.stat().st_mode) == mode and (root / "result").read_text() == "ok\n"
    assert not (root / "null").exists()
    for name in ("suid", "result"):
        st = (root / name).lstat()
        assert stat.S_ISREG(st.st_mode) and not st.st_mode & (stat.S_ISUID | stat.S_ISGID) and st.st_uid == uid
    assert oci("delete", "w").returncode == 0


def test_dev_rlimits_and_capabilities_are_what_config_json_asks(oci: Oci, tmp_path: Path, subreaper: None) -> None:
    """The container's /dev is the spec's default (its links work: a program logging to /dev/stdout is heard),
    mounted in the spec's order; process.rlimits are applied as asked, and all five capability sets of
    process.capabilities."""
    script = ("echo dev: $(ls -A /dev); readlink /dev/ptmx; echo to-stdout > /dev/stdout; "
              "echo to-stderr > /dev/stderr; echo nofile $(ulimit -Sn) $(ulimit -Hn); grep ^Cap /proc/self/status; "
              f"echo mounts $(awk {MOUNTS_AWK} /proc/self/mountinfo)")
    b = oci.bundle(tmp_path / "b", ["/bin/sh", "-c", script])
    cfg = json.loads((b / "config.json").read_text())
    caps = ["CAP_CHOWN", "CAP_KILL", "CAP_NET_RAW"]
    sets = ("bounding", "effective", "permitted", "inheritable", "ambient")
    cfg["process"]["capabilities"] = dict.fromkeys(sets, caps)
    cfg["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 3000, "hard": 5000}]
    (b / "config.json").write_text(json.dumps(cfg))
    rc, out, err = oci.create("dev", b)
    assert rc == 0, err.read_text()
    oci("start", "dev")
    assert wait_exit(oci.pid("dev", b)) == 0, err.read_text()
    lines = out.read_text().splitlines()
    assert lines[:4] == [f"dev: {OCI_DEV}", "pts/ptmx", "to-stdout", "nofile 3000 5000"], lines
    assert err.read_text() == "to-stderr\n"
    assert lines[4:9] == [f"{k}:\t0000000000002021" for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")]
    # The default mounts in the spec's order (mount point:type:source), as runtime-tools checks it.
    mounts = iter(lines[9].split()[1:])
    for want in ("/proc:proc:proc", "/dev:tmpfs:tmpfs", "/dev/pts:devpts:devpts", "/dev/shm:tmpfs:shm",
                 "/dev/mqueue:mqueue:mqueue", "/sys:sysfs:sysfs"):
        assert want in mounts, (want, lines[9])  # consumes the iterator: in this order
    assert oci("delete", "dev").returncode == 0


def test_config_mounts_follow_the_default_mounts_in_their_order(oci: Oci, tmp_path: Path, subreaper: None) -> None:
    """config.json's mounts appear in the container's mount table after the default ones (/proc ... /sys) and in
    config.json's order, as the spec and runtime-tools want (they were bound before ns-init mounted /proc and
    /sys); a read-only bind stays read-only, a writable one writes through."""
    (tmp_path / "ro").mkdir()
    (tmp_path / "rw").mkdir()
    (tmp_path / "ro" / "f").write_text("ro\n")
    mounts = [{"destination": "/mnt/rw", "type": "bind", "source": str(tmp_path / "rw"), "options": ["rbind"]},
              {"destination": "/tmp/t", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
              {"destination": "/mnt/ro", "type": "bind", "source": str(tmp_path / "ro"), "options": ["bind", "ro"]}]
    script = (f"echo mounts $(awk {MOUNTS_AWK} /proc/self/mountinfo | cut -d: -f1); cat /mnt/ro/f; "
              "echo x > /mnt/ro/f || echo refused; echo written > /mnt/rw/f")
    b = oci.bundle(tmp_path / "b", ["/bin/sh", "-c", script])
    cfg = json.loads((b / "config.json").read_text())
    cfg["mounts"] += mounts
    (b / "config.json").write_text(json.dumps(cfg))
    rc, out, err = oci.create("order", b)
    assert rc == 0, err.read_text()
    oci("start", "order")
    assert wait_exit(oci.pid("order", b)) == 0, err.read_text()
    lines = out.read_text().splitlines()
    points = lines[0].split()[1:]
    first = [points.index(p) for p in ("/proc", "/sys", "/mnt/rw", "/tmp/t", "/mnt/ro")]
    assert first == sorted(first), lines[0]  # each one's first appearance, in this order
    assert lines[1:] == ["ro", "refused"], (lines, err.read_text())
    assert (tmp_path / "rw" / "f").read_text() == "written\n" and (tmp_path / "ro" / "f").read_text() == "ro\n"
    assert oci("delete", "order").returncode == 0


def _mountinfo(pid: int | str, under: str) -> dict[str, str]:
    """Mount point -> per-mount options of the mounts at or under ``under`` in ``pid``'s mount namespace."""
    out = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        point, opts = line.split()[4:6]
        if point == under or point.startswith(under + "/"):
            out[point] = opts
    return out


def _qemu_pid(oci: Oci, cid: str) -> tuple[Path, int]:
    """The container's pod directory and its QEMU's pid."""
    pod = next(oci.kvmrkt.data.glob(f"pods/*/{oci.state(cid)['pod']}"))
    return pod, int(json.loads((pod / "pid").read_text())["pid"])


def test_a_dozen_binds_reach_the_vm_through_one_export(oci: Oci, tmp_path: Path, subreaper: None) -> None:
    """Ten directory binds and two file binds (one read-only) fit in one VM: each is bound into the pod's one
    shared export on the host (one virtio-9p device, where one device per bind ran out of microvm's virtio-mmio
    slots after six). The read-only file is read-only on the host's bind and in the VMM jail's copy of it, so the
    container cannot change it, whatever it does; the writable binds write through; nothing stays mounted."""
    dirs = [tmp_path / f"d{i}" for i in range(10)]
    for i, d in enumerate(dirs):
        d.mkdir()
        (d / "name").write_text(f"dir{i}\n")
    (tmp_path / "ro.conf").write_text("read-only\n")
    (tmp_path / "rw.conf").write_text("writable\n")
    mounts = [{"destination": f"/mnt/{d.name}", "type": "bind", "source": str(d), "options": ["rbind", "rw"]}
              for d in dirs]
    mounts += [{"destination": "/etc/ro.conf", "type": "bind", "source": str(tmp_path / "ro.conf"),
                "options": ["rbind", "ro"]},
               {"destination": "/etc/rw.conf", "type": "bind", "source": str(tmp_path / "rw.conf"),
                "options": ["rbind", "rw"]}]
    script = ("cat /mnt/d*/name | tr '\\n' ' '; echo; cat /etc/ro.conf /etc/rw.conf; "
              "echo changed > /etc/ro.conf || echo refused; "
              "mount -o remount,rw /etc/ro.conf 2>/dev/null; echo changed > /etc/ro.conf || echo refused again; "
              "echo more >> /etc/rw.conf; echo new > /mnt/d9/new; "
              "while [ ! -e /mnt/d0/go ]; do sleep 0.1; done")
    b = oci.bundle(tmp_path / "b", ["/bin/sh", "-c", script], mounts=mounts)
    rc, out, err = oci.create("binds", b)
    assert rc == 0, err.read_text()
    pod, qemu = _qemu_pid(oci, "binds")
    export = str(pod / "shared")
    host, jail = _mountinfo("self", export), _mountinfo(qemu, "/shares/shared")
    assert host[f"{export}/binds/m10/ro.conf"].startswith("ro,") and host[f"{export}/binds/m11/rw.conf"].startswith(
        "rw,")
    assert jail["/shares/shared/binds/m10/ro.conf"].startswith("ro,"), jail  # QEMU's own view of it
    assert len([p for p in host if "/binds/" in p]) == 12
    argv = json.loads((pod / "stage1-run.json").read_text())["argv"]
    assert argv.count("virtio-9p-device,fsdev=root0,mount_tag=root0") == 1 and sum(
        a.startswith("virtio-9p-device") for a in argv) == 2  # the root and the export
    oci("start", "binds")
    assert oci.wait_status("binds", "running")["status"] == "running", (out.read_text(), err.read_text())
    deadline = time.monotonic() + 60
    while "more" not in (tmp_path / "rw.conf").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    (dirs[0] / "go").touch()
    assert wait_exit(oci.pid("binds", b)) == 0, err.read_text()
    lines = out.read_text().splitlines()
    assert lines[0].split() == [f"dir{i}" for i in range(10)], lines
    assert lines[1:5] == ["read-only", "writable", "refused", "refused again"], (lines, err.read_text())
    assert (tmp_path / "ro.conf").read_text() == "read-only\n"
    assert (tmp_path / "rw.conf").read_text() == "writable\nmore\n" and (dirs[9] / "new").read_text() == "new\n"
    assert oci("delete", "binds").returncode == 0
    assert not _mountinfo("self", export) and not Path(export).exists()


def _bind_while_running(oci: Oci, tmp_path: Path, vmm_view: Callable[[str], str]) -> None:
    """What the host binds under the pod's export while the VM runs propagates into the VMM's mount namespace
    (where QEMU sees the export at ``vmm_view(pod uuid)``) and so into the guest (Kata's model for the containers of a
    pod): one made inside a bind the container has, whose file the container then reads, and a new bind, read-only
    in QEMU's namespace too. Deleting the container unmounts all of it."""
    vol, later, extra = tmp_path / "vol", tmp_path / "later", tmp_path / "extra"
    for d in (vol, later, extra):
        d.mkdir()
    (later / "file").write_text("bound while running\n")
    (vol / "sub").mkdir()
    b = oci.bundle(tmp_path / "b", ["/bin/sleep", "600"],
                   mounts=[{"destination": "/data", "type": "bind", "source": str(vol), "options": ["rbind"]}])
    rc, _out, err = oci.create("live", b)
    assert rc == 0, err.read_text()
    oci("start", "live")
    assert oci.wait_status("live", "running")["status"] == "running"
    pod, qemu = _qemu_pid(oci, "live")
    export = pod / "shared"
    assert oci("exec", "live", "/bin/cat", "/data/sub/file").returncode != 0  # nothing there yet
    subprocess.run(["mount", "--bind", str(later), str(export / "binds" / "m0" / "vol" / "sub")], check=True)
    res = oci("exec", "live", "/bin/cat", "/data/sub/file")
    assert res.returncode == 0 and res.stdout == "bound while running\n", res.stderr
    # The host side, as a pod's next container will use it: a read-only bind, read-only in QEMU's namespace too.
    jail = json.loads((pod / "jail.json").read_text())
    exports.bind(export, Volume("extra", "bind", str(extra), read_only=True), data_dir=oci.kvmrkt.data,
                 pod=pod.name, live=[pod.name], uid=jail["uid"], gid=jail["gid"])
    view = vmm_view(pod.name)
    assert os.readlink(f"/proc/{qemu}/ns/mnt") != os.readlink("/proc/self/ns/mnt")  # QEMU's own mount namespace
    seen = _mountinfo(qemu, view)
    assert seen[f"{view}/binds/m0/vol/sub"].startswith("rw,"), seen
    assert seen[f"{view}/binds/extra/extra"].startswith("ro,"), seen
    assert oci("delete", "--force", "live").returncode == 0
    assert not _mountinfo("self", str(export)) and not export.exists()
    assert (later / "file").exists() and (vol / "sub").is_dir()  # the sources are left alone


def test_a_bind_made_while_the_pod_runs_reaches_the_vm(oci: Oci, tmp_path: Path, subreaper: None) -> None:
    _bind_while_running(oci, tmp_path, lambda _uuid: "/shares/shared")  # in the jail QEMU pivoted into


def test_a_bind_made_while_a_libvirt_pod_runs_reaches_the_vm(libvirtd: str, oci: Oci, tmp_path: Path,
                                                             subreaper: None) -> None:
    """libvirtd starts QEMU in a mount namespace of its own, a slave of the host's made when the domain starts:
    the export's bind under /run/kvmrkt/<uuid> is a peer of the export, so the host's later binds reach it too."""
    oci.kvmrkt.backend = "libvirt"
    oci.kvmrkt.write_config(BASE_CONFIG)
    _bind_while_running(oci, tmp_path, lambda uuid: f"/run/kvmrkt/{uuid}/shares/shared")


def test_a_crashed_pods_export_is_unmounted_and_nothing_is_deleted_through_a_mount(oci: Oci, tmp_path: Path,
                                                                                   subreaper: None) -> None:
    """A supervisor killed with SIGKILL leaves its export mounted; gc (which moves the pod to the garbage folder,
    its mounts with it) unmounts it, and the bound directory keeps every file. A pod directory with a mount that
    kvmrkt did not make under it (whose files a removal would otherwise delete) is kept, named, until it is
    unmounted."""
    vol = tmp_path / "vol"
    vol.mkdir()
    (vol / "keep").write_text("kept\n")
    b = oci.bundle(tmp_path / "b", ["/bin/sleep", "600"],
                   mounts=[{"destination": "/data", "type": "bind", "source": str(vol), "options": ["rbind"]}])
    rc, _out, err = oci.create("crash", b)
    assert rc == 0, err.read_text()
    oci("start", "crash")
    assert oci.wait_status("crash", "running")["status"] == "running"
    pod, qemu = _qemu_pid(oci, "crash")
    os.kill(oci.pid("crash", b), signal.SIGKILL)  # the supervisor this test started; its QEMU dies with it
    assert wait_exit(oci.pid("crash", b)) == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while Path(f"/proc/{qemu}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _mountinfo("self", str(pod / "shared"))  # the crash left the export mounted
    stray = pod / "stray"
    stray.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "canary", str(stray)], check=True)
    garbage = pod.parent.parent / "exited-garbage" / pod.name
    try:
        (stray / "canary").write_text("not kvmrkt's\n")
        res = oci.kvmrkt("gc", "--grace-period=0s")
        assert f"{garbage / 'stray'} is still mounted" in res.err, res.err
        assert (garbage / "stray" / "canary").read_text() == "not kvmrkt's\n"
        assert list(_mountinfo("self", str(garbage))) == [str(garbage / "stray")]  # the export is gone
    finally:
        subprocess.run(["umount", str(garbage / "stray")], check=True)
    assert oci("delete", "crash").returncode == 0
    assert not garbage.exists() and (vol / "keep").read_text() == "kept\n"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("rlimits", [{"type": "RLIMIT_TEST", "soft": 1024, "hard": 1024}], "process.rlimits[0].type: unknown rlimit"),
    ("capabilities", {"bounding": ["CAP_CHOWN", "CAP_TEST"]}, "process.capabilities.bounding: unknown capability"),
])  # fmt: skip
def test_a_refused_bundle_leaves_nothing(oci: Oci, tmp_path: Path, field: str, value: Any, message: str) -> None:
    b = oci.bundle(tmp_path / "b", ["/bin/true"])
    cfg = json.loads((b / "config.json").read_text())
    cfg["process"][field] = value
    (b / "config.json").write_text(json.dumps(cfg))
    rc, _out, err = oci.create("bad", b)
    assert rc != 0 and message in err.read_text(), err.read_text()
    assert "Traceback" not in err.read_text()
    assert oci("list", "--format", "json").stdout.strip() == "[]"
    assert oci.kvmrkt.ok("list", "--format", "json").out.strip() == "[]"
    assert not (oci.root / "kvmrkt-oci").exists() or not list((oci.root / "kvmrkt-oci").iterdir())


def test_create_then_delete_leaves_nothing(oci: Oci, tmp_path: Path) -> None:
    b = oci.bundle(tmp_path / "b", ["/bin/sleep", "600"])
    rc, _out, err = oci.create("c2", b)
    assert rc == 0, err.read_text()
    assert oci.state("c2")["status"] == "created"
    # `kvmrkt oci` is the same runtime, with kvmrkt's --dir/--config-dir.
    assert json.loads(oci.kvmrkt.ok("oci", "--root", str(oci.root), "state", "c2").out)["status"] == "created"
    assert oci("delete", "c2").returncode == 0  # a created container can be deleted (runc's rule)
    assert oci("list", "--format", "json").stdout.strip() == "[]"
    assert oci.kvmrkt.ok("list", "--format", "json").out.strip() == "[]"
    assert not list((oci.root / "kvmrkt-oci").iterdir())


def test_kill_exec_and_force_delete(oci: Oci, tmp_path: Path, subreaper: None) -> None:
    b = oci.bundle(tmp_path / "b", ["/bin/sh", "-c", "trap 'echo got TERM; exit 42' TERM; while :; do sleep 0.1; done"])
    rc, out, _err = oci.create("c3", b)
    assert rc == 0
    pid = oci.pid("c3", b)
    oci("start", "c3")
    assert oci.wait_status("c3", "running")["status"] == "running"
    res = oci("exec", "c3", "/bin/sh", "-c", "read x; echo from-exec $x; exit 4", input="typed\n")
    assert res.returncode == 4 and res.stdout == "from-exec typed\n"
    proc = tmp_path / "process.json"
    proc.write_text(json.dumps({"args": ["/bin/sh", "-c", 'echo "$(id -u):$(id -g) $PWD $GREETING"'],
                                "env": ["PATH=/bin", "GREETING=hi"], "cwd": "/tmp", "user": {"uid": 1000, "gid": 1001},
                                "terminal": False}))
    res = oci("exec", "--process", str(proc), "c3")
    assert res.returncode == 0 and res.stdout == "1000:1001 /tmp hi\n", res.stderr  # the process's own identity
    proc.write_text(json.dumps({"args": ["/bin/sh", "-c", "exit 5"], "cwd": "/", "terminal": False}))
    res = oci("exec", "--process", str(proc), "--detach", "--pid-file", str(tmp_path / "epid"), "c3")
    assert res.returncode == 0
    assert wait_exit(int((tmp_path / "epid").read_text())) == 5  # the detached exec's pid carries its status
    assert oci("delete", "c3").returncode == 1  # running, no --force
    assert oci("kill", "c3", "TERM").returncode == 0
    assert wait_exit(pid) == 42 and "got TERM" in out.read_text()
    killed = oci("kill", "c3", "KILL")  # stopped: nothing to signal, in the words the runc shim maps to "finished"
    assert killed.returncode == 1 and "container not running" in killed.stderr
    unknown = oci("kill", "no-such-container", "KILL")  # ... and to "no such container"
    assert unknown.returncode == 1 and "does not exist" in unknown.stderr
    # --force on a running container.
    b2 = oci.bundle(tmp_path / "b2", ["/bin/sleep", "600"])
    assert oci.create("c4", b2)[0] == 0
    oci("start", "c4")
    assert oci.wait_status("c4", "running")["status"] == "running"
    assert oci("delete", "--force", "c4").returncode == 0
    assert wait_exit(oci.pid("c4", b2)) != 0


def test_a_vm_that_dies_is_reported_stopped_with_a_failure(oci: Oci, tmp_path: Path, subreaper: None) -> None:
    b = oci.bundle(tmp_path / "b", ["/bin/sleep", "600"])
    assert oci.create("c5", b)[0] == 0
    pid = oci.pid("c5", b)
    oci("start", "c5")
    pod = oci.wait_status("c5", "running")["pod"]
    qemu = json.loads(oci.kvmrkt.ok("status", "--format", "json", pod).out)["pid"]
    os.kill(qemu, signal.SIGKILL)  # the VM dies under the container
    assert wait_exit(pid) != 0
    assert oci.state("c5")["status"] == "stopped"
    assert oci("delete", "c5").returncode == 0


def test_errors_reach_the_log_file(oci: Oci, tmp_path: Path) -> None:
    log = tmp_path / "log.json"
    (tmp_path / "empty").mkdir()
    res = oci("--log", str(log), "--log-format", "json", "create", "--bundle", str(tmp_path / "empty"), "bad")
    assert res.returncode == 1 and "no config.json" in res.stderr
    entry = json.loads(log.read_text().splitlines()[-1])
    assert entry["level"] == "error" and "no config.json" in entry["msg"]
    b = oci.bundle(tmp_path / "b", ["/bin/true"], terminal=True)
    rc, _out, err = oci.create("t", b)
    assert rc == 1 and "--console-socket" in err.read_text()
    # A second proc mount is not made in the VM: the container runs, and the log says what was left out.
    b3 = oci.bundle(tmp_path / "b3", ["/bin/true"])
    cfg = json.loads((b3 / "config.json").read_text())
    cfg["mounts"].append({"destination": "/mnt/proc2", "type": "proc", "source": "proc"})
    (b3 / "config.json").write_text(json.dumps(cfg))
    assert oci.create("w", b3, flags=("--log", str(log), "--log-format", "json"))[0] == 0
    warning = json.loads(log.read_text().splitlines()[-1])
    assert warning["level"] == "warning" and "/mnt/proc2 (proc of proc)" in warning["msg"]
    assert oci("delete", "w").returncode == 0
    assert oci("state", "nosuch").returncode == 1
    assert oci("start", "../x").returncode == 1
    assert oci("--version").stdout.startswith("kvmrkt-oci version ")
    assert json.loads(oci("features").stdout)["ociVersionMax"] == "1.0.2"


# --- containerd ---------------------------------------------------------------------------------------------

NS = "kvmrkt-test"


@dataclass
class Containerd:
    socket: Path
    image: str

    def ctr(self, *args: str, timeout: float = 120, tty: bool = False) -> subprocess.CompletedProcess[str]:
        argv = ["ctr", "--address", str(self.socket), "--namespace", NS, *args]
        if tty:  # ctr -t needs a terminal on its stdin: give it one (33x101) with script(1)
            argv = ["script", "-qec", "stty rows 33 cols 101; " + " ".join(f"'{a}'" for a in argv), "/dev/null"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def containerd(oci: Oci, tmp_path: Path) -> Iterator[Containerd]:
    base = Path(f"/tmp/kvmrkt-ctrd-{os.getpid()}")  # short: containerd's socket path must fit in sun_path
    base.mkdir()
    (base / "config.toml").write_text(
        f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n[grpc]\n  address = "{base}/c.sock"\n')
    proc = subprocess.Popen(["containerd", "--config", str(base / "config.toml")], stdout=subprocess.DEVNULL,
                            stderr=(base / "log").open("w"))
    try:
        deadline = time.monotonic() + 30
        while not (base / "c.sock").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (base / "log").read_text()[-2000:]
            time.sleep(0.05)
        archive = tmp_path / "busybox.tar"
        subprocess.run(["skopeo", "copy", f"oci:{oci.busybox_layout}:latest",
                        f"docker-archive:{archive}:localhost/busybox:latest"], check=True, capture_output=True)
        c = Containerd(base / "c.sock", "localhost/busybox:latest")
        res = c.ctr("image", "import", str(archive))
        assert res.returncode == 0, res.stderr
        yield c
        for task in c.ctr("task", "ls", "-q").stdout.split():
            c.ctr("task", "kill", "-s", "SIGKILL", task)
            time.sleep(1)
            c.ctr("task", "delete", "-f", task)
        for ctr in c.ctr("container", "ls", "-q").stdout.split():
            c.ctr("container", "delete", ctr)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        subprocess.run(["umount", "-R", str(base / "root")], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def run_args(oci: Oci, c: Containerd, *args: str) -> list[str]:
    return ["run", "--runc-binary", str(oci.binary), *args]


def test_ctr_run_output_exit_code_and_terminal(oci: Oci, containerd: Containerd) -> None:
    res = containerd.ctr(*run_args(oci, containerd, "--rm", containerd.image, "r1", "/bin/sh", "-c",
                                   "echo hello from $(uname -r); exit 3"))
    assert res.returncode == 3, res.stderr
    assert res.stdout == "hello from 6.1.192\n" or res.stdout.startswith("hello from ")
    # ctr passes its terminal's size on (a resize after start): the guest terminal follows.
    res = containerd.ctr(*run_args(oci, containerd, "--rm", "-t", containerd.image, "r2", "/bin/sh", "-c",
                                   f"tty; {WAIT_SIZE}; {CONSOLE_IS_TTY}; exit 6"), tty=True)
    assert res.returncode == 6, res.stdout + res.stderr
    assert "/dev/pts/0" in res.stdout and "size 33 101" in res.stdout and "console is the tty" in res.stdout
    res = containerd.ctr(*run_args(oci, containerd, "--rm", "--memory-limit", str(512 << 20), containerd.image, "r3",
                                   "/bin/sh", "-c", "grep MemTotal /proc/meminfo"))
    assert res.returncode == 0 and int(res.stdout.split()[1]) > 500_000  # the VM was sized from linux.resources


def test_ctr_task_kill_exec_delete(oci: Oci, containerd: Containerd) -> None:
    res = containerd.ctr(*run_args(oci, containerd, "-d", containerd.image, "k1", "/bin/sh", "-c",
                                   "trap 'exit 42' TERM; while :; do sleep 0.1; done"))
    assert res.returncode == 0, res.stderr
    res = containerd.ctr("task", "exec", "--exec-id", "e1", "k1", "/bin/sh", "-c", "echo exec-out; exit 4")
    assert res.returncode == 4 and res.stdout == "exec-out\n"
    res = containerd.ctr("task", "exec", "-t", "--exec-id", "e2", "k1", "/bin/sh", "-c", f"tty; {WAIT_SIZE}; exit 5",
                         tty=True)
    assert res.returncode == 5 and "/dev/pts/" in res.stdout and "size 33 101" in res.stdout, res.stdout + res.stderr
    assert "RUNNING" in containerd.ctr("task", "ls").stdout
    assert containerd.ctr("task", "kill", "k1").returncode == 0
    deadline = time.monotonic() + 60
    while "STOPPED" not in containerd.ctr("task", "ls").stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "STOPPED" in containerd.ctr("task", "ls").stdout
    res = containerd.ctr("task", "delete", "k1")
    assert res.returncode == 0, res.stderr
    assert containerd.ctr("container", "delete", "k1").returncode == 0
    assert oci.kvmrkt.ok("list", "--format", "json").out.strip() == "[]"  # the pod went with the task


def test_ctr_container_joins_the_network_namespace_it_is_given(oci: Oci, containerd: Containerd) -> None:
    """The bundle names a network namespace (here one the test made, with a veth to the host): its interface is
    carried into the VM, so the container serves on the namespace's address."""
    n = os.getpid() % 200 + 20
    ns = f"kvt-ctr-{n}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["ip", "link", "add", "name", f"kvc{n}h", "type", "veth", "peer", "name", f"kvc{n}p"],
                    ["ip", "link", "set", "dev", f"kvc{n}p", "netns", ns],
                    ["ip", "addr", "add", f"10.194.{n}.1/24", "dev", f"kvc{n}h"],
                    ["ip", "link", "set", "dev", f"kvc{n}h", "up"],
                    ["ip", "-n", ns, "addr", "add", f"10.194.{n}.2/24", "dev", f"kvc{n}p"],
                    ["ip", "-n", ns, "link", "set", "dev", f"kvc{n}p", "up"]):
            subprocess.run(cmd, check=True)
        res = containerd.ctr(*run_args(oci, containerd, "-d", "--with-ns", f"network:/run/netns/{ns}",
                                       containerd.image, "n1", "/bin/sh", "-c", HTTPD))
        assert res.returncode == 0, res.stderr
        assert http_get(f"http://10.194.{n}.2/") == "served from a VM\n"
        containerd.ctr("task", "kill", "-s", "SIGKILL", "n1")
        deadline = time.monotonic() + 60
        while "STOPPED" not in containerd.ctr("task", "ls").stdout and time.monotonic() < deadline:
            time.sleep(0.1)
        assert containerd.ctr("task", "delete", "n1").returncode == 0
        containerd.ctr("container", "delete", "n1")
        # kvmrkt removed its tap and redirect; the namespace and its interface are the owner's and stay.
        links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True, check=True).stdout
        assert "tap0" not in links and f"kvc{n}p" in links
        assert "ingress" not in subprocess.run(["tc", "-n", ns, "qdisc"], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["ip", "netns", "delete", ns], check=False)


def test_a_network_namespace_someone_lives_in_is_refused_and_left_as_it_was(oci: Oci, tmp_path: Path,
                                                                              subreaper: None) -> None:
    """A namespace that holds a process is not a pod's own (CRI hands app containers the sandbox pid's namespace,
    which for a VM runtime is the node's): kvmrkt-oci refuses it before adding a tap or a redirect."""
    n = os.getpid() % 200 + 20
    ns = f"kvt-lived-{n}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    resident = None
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", f"kvl{n}a", "type", "veth", "peer", "name", f"kvl{n}b"],
                       check=True)
        resident = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "600"])
        deadline = time.monotonic() + 10
        while os.stat(f"/proc/{resident.pid}/ns/net").st_ino != os.stat(f"/run/netns/{ns}").st_ino:
            assert time.monotonic() < deadline, "the resident process never entered the namespace"
            time.sleep(0.05)
        bundle = oci.bundle(tmp_path / "b", ["/bin/true"])
        cfg = json.loads((bundle / "config.json").read_text())
        cfg["linux"]["namespaces"] = [n for n in cfg["linux"]["namespaces"] if n["type"] != "network"] + [
            {"type": "network", "path": f"/run/netns/{ns}"}]
        (bundle / "config.json").write_text(json.dumps(cfg))
        code, _out, err = oci.create("lived", bundle)
        assert code != 0
        assert f"process {resident.pid} (sleep) lives in it" in err.read_text()
        links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True, check=True).stdout
        assert "tap" not in links
        assert "ingress" not in subprocess.run(["tc", "-n", ns, "qdisc"], capture_output=True, text=True).stdout
        assert oci.kvmrkt.ok("list", "--format", "json").out.strip() == "[]"  # nothing left of the container
    finally:
        if resident is not None:
            resident.kill()
            resident.wait()
        subprocess.run(["ip", "netns", "delete", ns], check=False)


# --- podman ---------------------------------------------------------------------------------------------------


@pytest.fixture
def podman(oci: Oci, tmp_path: Path) -> Iterator[list[str]]:
    base = Path(f"/tmp/kvmrkt-podman-{os.getpid()}")  # podman refuses a runroot longer than 50 characters
    pm = ["podman", "--root", str(base / "root"), "--runroot", str(base / "run"), "--storage-driver", "vfs",
          "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--runtime", str(oci.binary)]
    archive = tmp_path / "busybox.tar"
    subprocess.run(["skopeo", "copy", f"oci:{oci.busybox_layout}:latest",
                    f"docker-archive:{archive}:localhost/busybox:latest"], check=True, capture_output=True)
    try:
        subprocess.run([*pm, "load", "-i", str(archive)], check=True, capture_output=True)
        yield pm
    finally:
        subprocess.run([*pm, "rm", "--all", "--force"], capture_output=True, check=False)
        subprocess.run([*pm, "system", "reset", "--force"], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)
    assert oci.kvmrkt.ok("list", "--format", "json").out.strip() == "[]"


def test_podman_run(podman: list[str]) -> None:
    pm = podman
    res = subprocess.run([*pm, "run", "--rm", "--network", "none", "localhost/busybox:latest", "/bin/sh", "-c",
                          "echo hello from podman; exit 5"], capture_output=True, text=True, timeout=180)
    assert res.returncode == 5, res.stderr
    assert res.stdout == "hello from podman\n"
    cmd = " ".join([*pm, "run", "--rm", "-t", "--network", "none", "localhost/busybox:latest", "/bin/sh", "-c",
                    "'tty; exit 7'"])
    res = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, timeout=180)
    assert res.returncode == 7, res.stdout + res.stderr
    assert "/dev/pts/0" in res.stdout


def test_podman_bridge_network_and_published_port(podman: list[str]) -> None:
    """podman's own network (netavark, a bridge and its port forwarding): the VM takes the container's interface."""
    port = free_port()
    res = subprocess.run([*podman, "run", "-d", "--name", "web", "-p", f"127.0.0.1:{port}:80",
                          "localhost/busybox:latest", "/bin/sh", "-c", HTTPD], capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr
    assert http_get(f"http://127.0.0.1:{port}/") == "served from a VM\n"
    assert subprocess.run([*podman, "rm", "--force", "web"], capture_output=True, timeout=120).returncode == 0


def test_libvirt_backend_runs_containers(libvirtd: str, oci: Oci, tmp_path: Path, subreaper: None) -> None:
    # (libvirtd first: a libvirtd started while this process is a subreaper would be reparented to it)
    oci.kvmrkt.backend = "libvirt"
    oci.kvmrkt.write_config(BASE_CONFIG)
    b = oci.bundle(tmp_path / "b", ["/bin/sh", "-c", "echo hello from libvirt; exit 9"])
    rc, out, err = oci.create("lv1", b)
    assert rc == 0, err.read_text()
    assert oci.state("lv1")["status"] == "created"
    oci("start", "lv1")
    assert wait_exit(oci.pid("lv1", b)) == 9 and out.read_text().startswith("hello from")
    assert oci("delete", "lv1").returncode == 0
    # libvirt places its domains' QEMU in cgroups of its own: a bundle's cgroupsPath is refused, not ignored.
    cfg = json.loads((b / "config.json").read_text())
    cfg["linux"]["cgroupsPath"] = f"/kvmrkt-test-{uuid.uuid4().hex[:8]}"
    (b / "config.json").write_text(json.dumps(cfg))
    rc, _out, err = oci.create("lv2", b)
    assert rc != 0 and "needs the qemu backend" in err.read_text()
    assert not Path("/sys/fs/cgroup/pids", cfg["linux"]["cgroupsPath"].lstrip("/")).exists()
    assert oci("list", "--format", "json").stdout.strip() == "[]"


@pytest.mark.parametrize("relative", [False, True])
def test_cgroups_path_places_the_container_with_its_limits(oci: Oci, tmp_path: Path, relative: bool) -> None:
    """linux.cgroupsPath: the supervisor (the container's pid) and its VMM go there (absolute: from the hierarchy's
    root; relative: from the runtime's own cgroup, as runc), with the bundle's pids and CPU limits; delete removes
    the cgroup and the directories made for it."""
    top = f"kvmrkt-test-{uuid.uuid4().hex[:8]}"
    path = f"{top}/pod/c1" if relative else f"/{top}/pod/c1"
    b = oci.bundle(tmp_path / "b", ["/bin/sleep", "600"])
    cfg = json.loads((b / "config.json").read_text())
    cfg["linux"]["cgroupsPath"] = path
    cfg["linux"]["resources"] = {"pids": {"limit": 500}, "cpu": {"shares": 512, "quota": 150000, "period": 100000},
                                 "blockIO": {"weight": 10}}
    (b / "config.json").write_text(json.dumps(cfg))
    rc, _out, err = oci.create("cg", b, flags=("--log", str(tmp_path / "log")))
    assert rc == 0, err.read_text()
    assert "linux.resources.blockIO.weight is not honoured by a VM" in (tmp_path / "log").read_text()
    own = {ctrl: line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
           for ctrl in line.split(":")[1].split(",")}
    base = own["pids"].lstrip("/") if relative else ""
    pids_dir = Path("/sys/fs/cgroup/pids") / base / path.lstrip("/")
    cpu_dir = Path("/sys/fs/cgroup/cpu") / (own["cpu"].lstrip("/") if relative else "") / path.lstrip("/")
    try:
        assert (pids_dir / "pids.max").read_text().strip() == "500"
        assert (cpu_dir / "cpu.shares").read_text().strip() == "512"
        assert (cpu_dir / "cpu.cfs_quota_us").read_text().strip() == "150000"
        procs = {int(p) for p in (pids_dir / "cgroup.procs").read_text().split()}
        supervisor = oci.state("cg")["pid"]
        assert supervisor in procs
        assert any("qemu" in os.readlink(f"/proc/{p}/exe") for p in procs - {supervisor}), procs
        assert oci("delete", "--force", "cg").returncode == 0
        assert not pids_dir.exists() and not cpu_dir.exists()
        assert not pids_dir.parents[1].exists()  # the directories made above it: <top>/pod
    finally:
        oci("delete", "--force", "cg")
        for d in (pids_dir, pids_dir.parent, pids_dir.parent.parent, cpu_dir, cpu_dir.parent, cpu_dir.parent.parent):
            with contextlib.suppress(OSError):
                d.rmdir()


def test_a_systemd_cgroups_path_is_refused(oci: Oci, tmp_path: Path) -> None:
    b = oci.bundle(tmp_path / "b", ["/bin/true"])
    cfg = json.loads((b / "config.json").read_text())
    cfg["linux"]["cgroupsPath"] = "kubepods-besteffort.slice:cri-containerd:abc"
    (b / "config.json").write_text(json.dumps(cfg))
    rc, _out, err = oci.create("sd", b)
    assert rc != 0
    assert "systemd's slice:prefix:name form" in err.read_text()
    assert oci("list", "--format", "json").stdout.strip() == "[]"


def _hook(log: Path, name: str) -> dict[str, Any]:
    """A host hook that appends its name to ``log`` and keeps the state it read on stdin in ``log.<name>``."""
    return {"path": "/bin/sh", "args": ["sh", "-c", f"cat > {log}.{name}; echo {name} >> {log}"]}


def _hook_status(log: Path, name: str) -> str:
    return str(json.loads(Path(f"{log}.{name}").read_text())["status"])


def test_hooks_run_on_the_host_at_their_points(oci: Oci, tmp_path: Path, subreaper: None) -> None:
    log = tmp_path / "hooks.log"
    b = oci.bundle(tmp_path / "b", ["/bin/sh", "-c", "exit 0"], hooks={
        "prestart": [_hook(log, "prestart")], "createRuntime": [_hook(log, "createRuntime")],
        "poststart": [{"path": "/bin/false"}, _hook(log, "poststart")], "poststop": [_hook(log, "poststop")]})
    rc, _out, err = oci.create("h1", b)
    assert rc == 0, err.read_text()
    assert log.read_text().split("\n")[:2] == ["prestart", "createRuntime"]
    assert _hook_status(log, "prestart") == _hook_status(log, "createRuntime") == "created"
    assert oci("--log", str(tmp_path / "log"), "start", "h1").returncode == 0  # a failed poststart hook: a warning
    assert log.read_text().splitlines()[2] == "poststart" and _hook_status(log, "poststart") in ("running", "stopped")
    assert "poststart hook 0 (/bin/false): exited with status 1" in (tmp_path / "log").read_text()
    assert wait_exit(oci.pid("h1", b)) == 0
    assert "poststop" not in log.read_text()
    assert oci("delete", "h1").returncode == 0
    assert log.read_text().splitlines()[3] == "poststop" and _hook_status(log, "poststop") == "stopped"


def test_a_failing_prestart_hook_fails_create_and_leaves_nothing(oci: Oci, tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    b = oci.bundle(tmp_path / "b", ["/bin/sh", "-c", "touch /ran"], hooks={
        "prestart": [{"path": "/bin/sh", "args": ["sh", "-c", "echo no network for you >&2; exit 4"]}],
        "poststop": [_hook(log, "poststop")]})
    rc, _out, err = oci.create("h2", b)
    assert rc != 0 and "prestart hook 0 (/bin/sh): exited with status 4: no network for you" in err.read_text()
    assert oci("state", "h2").returncode != 0 and not (b / "rootfs" / "ran").exists()
    assert log.read_text() == "poststop\n"  # the spec's step 9
    assert oci("list", "--format", "json").stdout.strip() == "[]"
    assert oci.kvmrkt.ok("list", "--format", "json").out.strip() == "[]"


def test_hooks_that_would_run_inside_the_vm_are_refused(oci: Oci, tmp_path: Path) -> None:
    b = oci.bundle(tmp_path / "b", ["/bin/true"], hooks={"createContainer": [{"path": "/bin/true"}]})
    rc, _out, err = oci.create("h3", b)
    assert rc != 0 and "hooks.createContainer run in the container's namespaces" in err.read_text()
    assert oci("list", "--format", "json").stdout.strip() == "[]"


def test_sysctls_oom_score_and_devices_reach_the_vms_kernel(oci: Oci, tmp_path: Path, subreaper: None) -> None:
    script = ("cat /proc/sys/net/ipv4/ip_forward /proc/sys/kernel/msgmax /proc/self/oom_score_adj; "
              "stat -c '%F %t:%T %a %u:%g' /dev/test1 /dev/sub/fifo")
    b = oci.bundle(tmp_path / "b", ["/bin/sh", "-c", script])
    cfg = json.loads((b / "config.json").read_text())
    cfg["process"]["oomScoreAdj"] = 500
    cfg["linux"]["sysctl"] = {"net.ipv4.ip_forward": "1", "kernel.msgmax": "4096"}
    cfg["linux"]["devices"] = [
        {"path": "/dev/test1", "type": "c", "major": 10, "minor": 666, "fileMode": 0o660, "uid": 1, "gid": 2},
        {"path": "/dev/sub/fifo", "type": "p", "fileMode": 0o600}]
    (b / "config.json").write_text(json.dumps(cfg))
    host_msgmax = Path("/proc/sys/kernel/msgmax").read_text().strip()
    assert host_msgmax != "4096"
    rc, out, err = oci.create("k1", b)
    assert rc == 0, err.read_text()
    oci("start", "k1")
    assert wait_exit(oci.pid("k1", b)) == 0, err.read_text()
    assert out.read_text().splitlines() == ["1", "4096", "500", "character special file a:29a 660 1:2",
                                            "fifo 0:0 600 0:0"]
    assert Path("/proc/sys/kernel/msgmax").read_text().strip() == host_msgmax  # the host's kernel is untouched
    assert oci("delete", "k1").returncode == 0


def test_a_sysctl_the_vms_kernel_lacks_fails_the_container_naming_it(oci: Oci, tmp_path: Path,
                                                                     subreaper: None) -> None:
    b = oci.bundle(tmp_path / "b", ["/bin/true"])
    cfg = json.loads((b / "config.json").read_text())
    cfg["linux"]["sysctl"] = {"kernel.no_such_knob": "1"}
    (b / "config.json").write_text(json.dumps(cfg))
    rc, _out, err = oci.create("k2", b)
    if rc == 0:
        oci("start", "k2")
        assert wait_exit(oci.pid("k2", b)) == 125
    assert "sysctl kernel.no_such_knob: No such file or directory" in err.read_text()
    oci("delete", "--force", "k2")


def test_podman_pod_is_one_vm(podman: list[str], oci: Oci) -> None:
    """A podman pod: its infra container boots the pod's VM (podman's own pause image, catatonit), and the pod's
    containers, which name the infra's namespaces, are created inside that VM, sharing its network and IPC."""
    pm = podman
    res = subprocess.run([*pm, "pod", "create", "--name", "p1", "--network", "none"], capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([*pm, "run", "-d", "--pod", "p1", "--name", "srv", "localhost/busybox:latest", "/bin/sh",
                          "-c", "echo pod-shared > /dev/shm/x; " + HTTPD.replace("-p 80", "-p 8080")],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    assert len(json.loads(oci.kvmrkt.ok("list", "--format", "json").out)) == 1  # infra and srv: one VM
    res = subprocess.run([*pm, "run", "--rm", "--pod", "p1", "localhost/busybox:latest", "/bin/sh", "-c",
                          "for i in $(seq 50); do [ -e /dev/shm/x ] && break; sleep 0.2; done; cat /dev/shm/x; "
                          "wget -q -O - http://127.0.0.1:8080/; exit 6"], capture_output=True, text=True, timeout=180)
    assert res.returncode == 6 and res.stdout == "pod-shared\nserved from a VM\n", res.stdout + res.stderr
    cmd = " ".join([*pm, "run", "--rm", "-t", "--pod", "p1", "localhost/busybox:latest", "/bin/sh", "-c",
                    "'tty; stty size; exit 7'"])  # a terminal of its own in the pod's VM (--console-socket)
    res = subprocess.run(["script", "-qec", f"stty rows 33 cols 101; {cmd}", "/dev/null"], capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 7 and "/dev/pts/0" in res.stdout and "33 101" in res.stdout, res.stdout + res.stderr
    assert len(json.loads(oci.kvmrkt.ok("list", "--format", "json").out)) == 1
    res = subprocess.run([*pm, "pod", "rm", "--force", "p1"], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
