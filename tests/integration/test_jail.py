"""Confinement against real VMs, tried as an attacker would: the VMM jail on the host (uid, capabilities,
no_new_privs, seccomp, private root, cgroup limits, shares that cannot plant privileged files), the apps in the
guest (namespaces, capabilities, seccomp, masked paths, no reach to the init or the ports) and the operator's
resource caps. Both backends where the jail differs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import BASE_CONFIG, Kvmrkt, use_backend

HERE = Path(__file__).resolve().parent
# The OCI default bounding set (CAP_CHOWN ... CAP_SETFCAP), as /proc/PID/status shows it.
DEFAULT_CAPBND = "00000000a80425fb"
NOBODY = 65534


@pytest.fixture(params=["qemu", "libvirt"])
def backend(kvmrkt: Kvmrkt, request: pytest.FixtureRequest) -> Kvmrkt:
    return use_backend(kvmrkt, request, request.param)


@pytest.fixture(scope="session")
def escape_tool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/integration/escape.c, built static, in a directory the tests share read-only into pods."""
    out = tmp_path_factory.mktemp("escape")
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out / "escape"), str(HERE / "escape.c")], check=True)
    out.chmod(0o755)
    return out


def proc_status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if ":\t" in line)


def as_uid(uid: int, *argv: str, netns_pid: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run a host command as ``uid`` (its own gid, no other groups), optionally in a process's mount namespace."""
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    if netns_pid is not None:
        cmd = ["nsenter", "-t", str(netns_pid), "-m", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def sleeper(backend: Kvmrkt, tmp_path: Path) -> Iterator[dict[str, object]]:
    """A running pod (its app sleeps) and its status JSON."""
    uuid_file = tmp_path / "uuid"
    backend.start("run", "--uuid-file-save", str(uuid_file), "busybox", "--memory", "200Mi", "--exec", "/bin/sh",
                  "--", "-c", "sleep 120")
    uuid = backend.wait_running(uuid_file)
    yield json.loads(backend.ok("status", "--format", "json", uuid).out)
    backend.ok("stop", "--force", uuid)


def test_the_vmm_is_jailed(backend: Kvmrkt, sleeper: dict[str, object], tmp_path: Path) -> None:
    jail = sleeper["jail"]
    assert isinstance(jail, dict)
    uid, pid = jail["uid"], sleeper["pid"]
    assert isinstance(uid, int) and isinstance(pid, int) and uid >= 2000000000
    st = proc_status(pid)
    assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4
    assert st["CapEff"] == st["CapPrm"] == st["CapAmb"] == "0000000000000000"
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
    assert "tcg" in str(jail["isolation"]) and "boundary" in str(jail["isolation"])
    limits = jail["limits"]
    assert isinstance(limits, dict) and limits["memory_limit_mib"] == 200 + 128 + 256
    cgroup = dict(line.split(":", 2)[1:] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines())
    mem_dir = Path("/sys/fs/cgroup/memory") / cgroup["memory"].lstrip("/")
    while mem_dir.name == "emulator":
        mem_dir = mem_dir.parent
    assert int((mem_dir / "memory.limit_in_bytes").read_text()) == (200 + 128 + 256) << 20
    assert (Path("/sys/fs/cgroup/pids") / cgroup["pids"].lstrip("/") / "pids.max").read_text().strip() == "1024"
    if backend.backend == "qemu":
        assert st["CapBnd"] == "0000000000000000"
        assert sorted(os.listdir(f"/proc/{pid}/root")) == ["bin", "dev", "etc", "images", "initrd.img", "kernel",
                                                          "kvmrkt-vmm-guard", "lib", "lib64", "proc", "sbin", "usr"]
        assert sorted(os.listdir(f"/proc/{pid}/root/dev")) == ["null", "urandom"]
        assert str(sleeper["uuid"]) in cgroup["memory"] and str(sleeper["uuid"]) in cgroup["cpu"]
        # In its namespace, the VMM's uid reads its own image and sees no other, nor the host.
        assert as_uid(uid, "wc", "-c", "/images/app0", netns_pid=pid).returncode == 0
        assert as_uid(uid, "ls", "/var/lib", netns_pid=pid).returncode != 0
    # On the host, that uid cannot read the store (any pod's image), the pod directories or /etc/shadow.
    store_images = list((backend.data / "cas" / "rootfs").glob("*.erofs"))
    assert store_images
    for path in (store_images[0], backend.data / "pods", Path("/etc/shadow")):
        res = as_uid(uid, "cat", str(path))
        assert res.returncode != 0 and "Permission denied" in res.stderr, (path, res)
    # A second pod at the same time gets another uid.
    uuid_file = tmp_path / "uuid2"
    backend.start("run", "--uuid-file-save", str(uuid_file), "busybox", "--exec", "/bin/sleep", "--", "60")
    other = json.loads(backend.ok("status", "--format", "json", backend.wait_running(uuid_file)).out)
    assert other["jail"]["uid"] != uid and proc_status(other["pid"])["Uid"].split()[0] == str(other["jail"]["uid"])
    backend.ok("stop", "--force", other["uuid"])


ATTACK = ("cp /bin/busybox /v/suid; chmod 4755 /v/suid; chmod 2755 /v/suid; install -m 4755 /bin/busybox /v/inst; "
          "mknod /v/null c 1 3; mknod /v/sda b 8 0; chmod 0777 /v; mkdir /v/dir; chmod 4777 /v/dir; "
          "echo written > /v/result.txt; ln -s result.txt /v/link; cat /v/link; ls -ln /v")


def _assert_nothing_privileged(share: Path, uid: int, out: str, err: str) -> None:
    assert stat.S_IMODE(share.stat().st_mode) == 0o755  # the share's root keeps its mode
    assert "system.posix_acl_access" not in os.listxattr(share)  # the pod's access was revoked
    for name in ("suid", "dir", "result.txt"):
        st = (share / name).lstat()
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), name
        assert st.st_uid == uid and st.st_gid == uid, name
    assert not (share / "null").exists() and not (share / "sda").exists()  # no device node, real or not
    assert not (share / "inst").exists() or not (share / "inst").stat().st_mode & stat.S_ISUID
    # The guest was told: set-id bits and device nodes are refused, the share root is not its to chmod.
    assert err.count("Operation not permitted") >= 5, err
    assert (share / "result.txt").read_text() == "written\n"  # the ordinary case: the owner (root) reads it
    assert "written" in out and (share / "link").is_symlink()  # symlinks are real
    # The copied busybox run by another host user gives nothing but that user's own identity.
    res = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                          str(share / "suid"), "id", "-u"], capture_output=True, text=True, check=False)
    assert res.returncode != 0 or res.stdout.strip() == str(NOBODY), res


def test_a_writable_host_volume_never_gets_privileged_files(backend: Kvmrkt, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    share.chmod(0o755)
    (share / "host-file").write_text("from the host\n")
    uuid_file = tmp_path / "uuid"
    res = backend("run", "--uuid-file-save", str(uuid_file), "--volume", f"v,kind=host,source={share}",
                  "busybox", "--mount", "volume=v,target=/v", "--exec", "/bin/sh", "--", "-c",
                  ATTACK + "; cat /v/host-file; if echo x >> /v/host-file; then echo APPENDED; fi")
    assert res.rc == 0, res.err
    assert "from the host" in res.out and "APPENDED" not in res.out  # not its file, not writable for it
    st = json.loads(backend.ok("status", "--format", "json", uuid_file.read_text().strip()).out)
    _assert_nothing_privileged(share, st["jail"]["uid"], res.out, res.err)
    assert (share / "host-file").stat().st_uid == 0


def test_apps_cannot_reach_the_init_the_ports_or_each_other(kvmrkt: Kvmrkt, escape_tool: Path) -> None:
    res = kvmrkt("run", "--volume", f"t,kind=host,source={escape_tool},readOnly=true",
                 "busybox", "--name", "victim", "--exec", "/bin/sh", "--", "-c", "sleep 3; exit 7", "---",
                 "busybox", "--name", "attacker", "--mount", "volume=t,target=/t", "--exec", "/t/escape", "--",
                 "victim")
    lines = dict(line.split(" ", 1) for line in res.out.splitlines() if " " in line)
    assert res.rc == 7, res  # the victim's failure is reported as it happened
    assert lines["open-dev-port"].startswith("denied")  # no port nodes in /dev
    assert lines["open-made-port"].startswith("denied") and lines["open-port-in-shm"].startswith("denied")
    assert "write-forged-exit" not in lines and "write-stolen-fd" not in lines
    for attempt in ("pidfd-getfd", "ptrace-1", "mount-tmpfs", "finit-module", "kexec-load", "bpf", "keyctl",
                    "open-by-handle"):
        assert lines[attempt] == "denied EPERM", (attempt, lines[attempt])
    assert lines["proc-1-is-ours"] == "ok"  # PID 1 of its namespace is its own ns-init, not the VM's init
    st = json.loads(kvmrkt.ok("list", "--format", "json").out)[0]
    status = json.loads(kvmrkt.ok("status", "--format", "json", st["uuid"]).out)
    assert {a["name"]: a["exit_code"] for a in status["apps"]} == {"victim": 7, "attacker": 0}


PROBE = ("grep -E '^(CapBnd|Seccomp|NoNewPrivs):' /proc/self/status | tr -d ':'; "
         "echo timer_list $(wc -c < /proc/timer_list); echo ro_proc_sys $(grep -c ' /proc/sys proc ro' /proc/mounts); "
         "echo dev $(ls /dev); echo pid1 $(cat /proc/1/comm); echo hostname $(hostname); "
         "echo dev_stdout works > /dev/stdout")


def _probe(kvmrkt: Kvmrkt, *flags: str, app_flags: tuple[str, ...] = ()) -> dict[str, str]:
    """What an app sees of its confinement: one "key value" line per probe."""
    res = kvmrkt(*flags, "run", "--hostname", "probe", "busybox", *app_flags, "--exec", "/bin/sh", "--", "-c", PROBE)
    assert res.rc == 0, res.err
    return {**dict(line.split(None, 1) for line in res.out.splitlines()), "stderr": res.err}


def test_apps_get_the_default_confinement_and_each_insecure_option_lifts_one_layer(kvmrkt: Kvmrkt) -> None:
    default = _probe(kvmrkt)
    assert default["CapBnd"] == DEFAULT_CAPBND and default["Seccomp"] == "2" and default["NoNewPrivs"] == "0"
    assert default["timer_list"] == "0" and default["ro_proc_sys"] == "1"
    # The OCI default /dev (no console without a terminal; no virtio port, disk or kmsg); its links work.
    assert default["dev"].split() == ["core", "fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm",
                                      "stderr", "stdin", "stdout", "tty", "urandom", "zero"]
    assert default["dev_stdout"] == "works"
    assert default["pid1"] == "init" and default["hostname"] == "probe"
    caps = _probe(kvmrkt, "--insecure-options=capabilities")
    assert caps["CapBnd"] == "000001ffffffffff" and caps["Seccomp"] == "2" and caps["timer_list"] == "0"
    assert "WARNING: --insecure-options=capabilities" in caps["stderr"]
    sec = _probe(kvmrkt, "--insecure-options=seccomp")
    assert sec["Seccomp"] == "0" and sec["CapBnd"] == DEFAULT_CAPBND and sec["ro_proc_sys"] == "1"
    paths = _probe(kvmrkt, "--insecure-options=paths")
    assert int(paths["timer_list"]) > 0 and paths["ro_proc_sys"] == "0" and paths["Seccomp"] == "2"
    assert paths["CapBnd"] == DEFAULT_CAPBND
    # Recorded in the pod and in its measured manifest.
    pods = json.loads(kvmrkt.ok("list", "--format", "json").out)
    lifted = {}
    for p in pods:
        st = json.loads(kvmrkt.ok("status", "--format", "json", p["uuid"]).out)
        manifest = json.loads(kvmrkt.ok("cat-manifest", p["uuid"]).out)
        lifted[tuple(st["insecure_options"])] = manifest["apps"][0]["confinement"]
    assert lifted[("capabilities",)]["capabilities"][-1] == "CAP_CHECKPOINT_RESTORE"
    assert lifted[("seccomp",)]["seccomp"] is None and lifted[()]["seccomp"]["mode"] == "remove"
    assert lifted[("paths",)]["maskedPaths"] == [] and lifted[()]["maskedPaths"]


def test_capability_and_seccomp_flags(kvmrkt: Kvmrkt) -> None:
    raw = _probe(kvmrkt, app_flags=("--caps-retain", "CAP_NET_RAW,CAP_KILL"))
    assert raw["CapBnd"] == "0000000000002020"
    res = kvmrkt("run", "busybox", "--seccomp", "mode=remove,errno=ENOSYS,mkdir,mkdirat", "--exec", "/bin/sh", "--",
                 "-c", "mkdir /tmp/x; echo rc=$?")
    assert res.rc == 0 and "rc=1" in res.out and "Function not implemented" in res.err + res.out
    res = kvmrkt("run", "busybox", "--caps-retain", "CAP_MAKE_COFFEE", "--exec", "/bin/true")
    assert res.rc == 2 and "unknown capability" in res.err


def test_pods_asking_for_more_than_the_host_allows_are_refused(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    res = kvmrkt("run", "busybox", "--memory", "1Ti", "--exec", "/bin/true")
    assert res.rc == 2 and "more than this host allows" in res.err and "max_memory_mib" in res.err
    res = kvmrkt("run", "busybox", "--cpu", "1000", "--exec", "/bin/true")
    assert res.rc == 2 and "1000 vCPUs" in res.err
    uuid = kvmrkt.ok("prepare", "--quiet", "busybox", "--exec", "/bin/true").out.strip()
    manifest = json.loads(kvmrkt.ok("cat-manifest", uuid).out)
    manifest["apps"][0]["memoryMiB"] = 1 << 20
    (tmp_path / "pod.json").write_text(json.dumps(manifest))
    res = kvmrkt("run", "--pod-manifest", str(tmp_path / "pod.json"))
    assert res.rc == 2 and "more than this host allows" in res.err
    kvmrkt.write_config(BASE_CONFIG + "\n[pods]\nmax_memory_mib = 300\nmax_vcpus = 1\n")
    res = kvmrkt("run", "busybox", "--memory", "256M", "--exec", "/bin/true")
    assert res.rc == 2 and "(300 MiB)" in res.err
    assert kvmrkt("run", "busybox", "--cpu", "2", "--exec", "/bin/true").rc == 2
    assert kvmrkt("run", "busybox", "--exec", "/bin/true").rc == 0


def test_a_guest_that_exhausts_memory_is_stopped_by_its_cgroup(kvmrkt: Kvmrkt) -> None:
    # The margin is 1 MiB: QEMU's own memory plus what the guest touches cannot fit, as if QEMU leaked.
    kvmrkt.write_config(BASE_CONFIG + "\n[jail]\nmemory_margin_mib = 1\n")
    started = time.monotonic()
    res = kvmrkt("run", "busybox", "--exec", "/bin/sh", "--", "-c",
                 "dd if=/dev/zero of=/dev/shm/fill bs=1M count=120; dd if=/dev/zero of=/tmp/fill bs=1M count=120; "
                 "echo filled")
    assert res.rc == 8, res
    assert "more than the pod's memory limit of 257 MiB" in res.err and "cgroup" in res.err
    assert time.monotonic() - started < 60
    st = json.loads(kvmrkt.ok("status", "--format", "json",
                              json.loads(kvmrkt.ok("list", "--format", "json").out)[0]["uuid"]).out)
    assert st["state"] == "exited"


def test_a_uid_range_that_collides_with_an_account_is_refused(kvmrkt: Kvmrkt) -> None:
    kvmrkt.write_config(BASE_CONFIG + '\n[jail]\nuid_range = "65000-65535"\n')
    res = kvmrkt("run", "busybox", "--exec", "/bin/true")
    assert res.rc == 2 and "nobody" in res.err and "uid_range" in res.err
    kvmrkt.write_config(BASE_CONFIG + '\n[jail]\nuid_range = "0-100"\n')
    assert kvmrkt("run", "busybox", "--exec", "/bin/true").rc == 2


def test_an_image_cannot_widen_its_confinement_or_its_size(kvmrkt: Kvmrkt, busybox_layout: Path,
                                                          tmp_path: Path) -> None:
    from .test_images import _aci

    greedy = _aci(tmp_path, "greedy", {"name": "example.com/greedy", "app": {
        "exec": ["/bin/sh", "-c", "grep -E '^(CapBnd|Seccomp):' /proc/self/status"], "user": "0", "group": "0",
        "isolators": [{"name": "os/linux/capabilities-retain-set", "value": {"set": ["CAP_SYS_ADMIN", "CAP_NET_RAW"]}},
                      {"name": "os/linux/seccomp-retain-set", "value": {"set": ["@appc.io/all"]}}]}}, busybox_layout)
    huge = _aci(tmp_path, "huge", {"name": "example.com/huge", "app": {
        "exec": ["/bin/true"], "user": "0", "group": "0",
        "isolators": [{"name": "resource/memory", "value": {"limit": "1T"}}]}}, busybox_layout)
    kvmrkt.ok("image", "import", str(greedy))
    kvmrkt.ok("image", "import", str(huge))
    res = kvmrkt.ok("run", "example.com/greedy")
    assert "CapBnd:\t0000000000002000" in res.out and "Seccomp:\t2" in res.out  # only what the default allowed
    res = kvmrkt("run", "example.com/huge")
    assert res.rc == 2 and "more than this host allows" in res.err


GUARD_PROBE = r"""
import ctypes, errno, os, stat
libc = ctypes.CDLL(None, use_errno=True)
def call(name, *args):
    rc = libc.syscall(*args)
    print(name, "ok" if rc >= 0 else errno.errorcode[ctypes.get_errno()])
d = os.environ["D"].encode()
f = d + b"/f"
os.close(os.open(f, os.O_CREAT | os.O_WRONLY, 0o644))
call("chmod-suid", 90, f, 0o4755)
call("chmod-plain", 90, f, 0o755)
call("fchmodat-sgid", 268, -100, f, 0o2755, 0)
call("openat-create-suid", 257, -100, d + b"/g", os.O_CREAT | os.O_WRONLY, 0o4755)
call("mknodat-char", 259, -100, d + b"/c", stat.S_IFCHR | 0o600, os.makedev(1, 3))
call("mknodat-fifo", 259, -100, d + b"/p", stat.S_IFIFO | 0o600, 0)
call("openat2", 437, -100, f, None, 0)
call("io_uring_setup", 425, 1, None)
call("fchmodat2", 452, -100, f, 0o4755, 0)
"""


def test_the_vmm_guard_refuses_privileged_files_and_unchecked_calls() -> None:
    import shutil
    import tempfile

    from kvmrkt.config import Stage1Config
    from stage1_kvm.assets import load_assets

    uid = 2000065000
    work = Path(tempfile.mkdtemp(prefix="kvmrkt-guard-", dir="/tmp"))  # reachable for an unprivileged uid
    try:
        guard = work / "guard"
        shutil.copyfile(load_assets(Stage1Config()).guard, guard)
        guard.chmod(0o755)
        os.chown(work, uid, uid)
        res = as_uid(uid, "env", f"D={work}", str(guard), "/usr/bin/python3", "python3", "-c", GUARD_PROBE)
        got = dict(line.split() for line in res.stdout.splitlines())
        assert got == {"chmod-suid": "EPERM", "chmod-plain": "ok", "fchmodat-sgid": "EPERM",
                       "openat-create-suid": "EPERM", "mknodat-char": "EPERM", "mknodat-fifo": "ok",
                       "openat2": "ENOSYS", "io_uring_setup": "ENOSYS", "fchmodat2": "ENOSYS"}, res.stderr
        assert not (work / "f").stat().st_mode & stat.S_ISUID and not (work / "g").exists()
    finally:
        shutil.rmtree(work)
