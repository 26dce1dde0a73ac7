"""Faults at the worst moments, with real components: ``kill -9`` of ``kvmrkt run`` at each stage of a launch (the
CLI's own timeline stamps, ``kvmrkt.host.timeline``, say when a stage is reached), of QEMU and of the guest's
app, of the TPM during a launch and of a CNI plugin in the middle of its ADD; damaged files (a truncated pod
manifest, a corrupted store database, a half-written measurement log record), a full filesystem under the data
dir, and libvirtd killed under a running libvirt pod. After each, the failing command
itself or the next ``kvmrkt gc`` leaves the host clean (the fixture's census: processes, networks, jail), what
remains of the store verifies, the measurement log replays, and no later command ends in a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .conftest import (
    OWN_LIBVIRTD,
    REPO,
    Kvmrkt,
    Result,
    libvirtd_answers,
    start_libvirtd,
    start_swtpm,
    stop_swtpm,
    use_backend,
)

SH = ["busybox", "--exec", "/bin/sh", "--"]
# Stages of `kvmrkt run` in order (see the stamp() calls); killing at one means killing while the next is done.
STAGES = ["image-resolved", "pod-prepared", "network-up", "jail-built", "qemu-spawned", "measured", "guest-ready",
          "app-started", "vm-exited"]


def no_traceback(res: Result) -> Result:
    assert "Traceback" not in res.err, res.err
    return res


def healthy(kvmrkt: Kvmrkt) -> None:
    """What every fault must leave: gc cleans up, the store verifies, the measurement log replays, and a pod
    runs again."""
    no_traceback(kvmrkt.ok("gc", "--grace-period=0s", "--expire-prepared=0s"))
    assert json.loads(no_traceback(kvmrkt.ok("list", "--format", "json")).out) == []
    no_traceback(kvmrkt.ok("image", "verify", "busybox"))
    assert kvmrkt.ok("run", *SH, "-c", "echo again").out == "again\n"
    log = no_traceback(kvmrkt.ok("attest", "log"))  # exit 0: it replays, with no tamper evidence in it
    assert "TAMPER" not in log.out + log.err, log.out + log.err
    no_traceback(kvmrkt.ok("gc", "--grace-period=0s"))


def run_until(kvmrkt: Kvmrkt, stage: str, *args: str) -> subprocess.Popen[str]:
    """Start ``kvmrkt run ARGS`` and return it once it has stamped ``stage`` (or ended without reaching it)."""
    rfd, wfd = os.pipe()
    proc = subprocess.Popen(kvmrkt.argv("run", *args), env={**os.environ, "KVMRKT_TIMELINE_FD": str(wfd)},
                            pass_fds=[wfd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    kvmrkt.procs.append(proc)
    os.close(wfd)
    reached = []
    with os.fdopen(rfd, "rb") as stamps:
        for line in stamps:
            reached.append(line.split()[2].decode())
            if reached[-1] == stage:
                return proc
    raise AssertionError(f"kvmrkt run ended before {stage} (reached {reached}): {proc.communicate()[1]}")


@pytest.mark.parametrize("stage", STAGES)
def test_kill_9_of_kvmrkt_run_at_each_stage(kvmrkt: Kvmrkt, stage: str) -> None:
    proc = run_until(kvmrkt, stage, "--net=default", *SH, "-c", "sleep 1")
    proc.kill()
    proc.communicate(timeout=60)
    pods = json.loads(no_traceback(kvmrkt.ok("list", "--format", "json")).out)
    for pod in pods:
        no_traceback(kvmrkt.ok("status", str(pod["uuid"])))
    healthy(kvmrkt)


def test_kill_9_of_qemu(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    uuid_file = tmp_path / "uuid"
    proc = kvmrkt.start("run", "--uuid-file-save", str(uuid_file), "--net=default", *SH, "-c", "sleep 600")
    uuid = kvmrkt.wait_running(uuid_file)
    pid = json.loads(kvmrkt.ok("status", "--format", "json", uuid).out)["pid"]
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err and "kvmrkt" in err, err
    healthy(kvmrkt)


def test_kill_9_of_the_guest_app(kvmrkt: Kvmrkt) -> None:
    """The app dies of SIGKILL (sent by itself: a kill sent through ``enter`` would race the end of the enter
    session's own command, which dies with the app's PID namespace): the run ends with 137, the host is clean."""
    res = kvmrkt("run", "--net=default", *SH, "-c", "trap '' TERM; echo up; sleep 1; kill -9 $$; echo survived")
    assert res.rc == 137 and res.out == "up\n" and "Traceback" not in res.err, (res.rc, res.out, res.err)
    healthy(kvmrkt)


def test_the_tpm_dies_during_a_launch(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    """The TPM is killed (-9) while a launch is on its way to measuring: the launch fails closed (exit 5, naming
    the TPM) and no VM runs; once the TPM is back (restarted on its state: a TPM reset, as kvmrkt sees it) pods
    run and the log says the TPM was reset, not that it was tampered with."""
    (tmp_path / "tpm").mkdir()
    tpm = start_swtpm(tmp_path / "tpm")
    try:
        config = (kvmrkt.config / "config.toml").read_text().replace(kvmrkt.tcti, tpm.tcti)
        (kvmrkt.config / "config.toml").write_text(config)
        kvmrkt.ok("run", *SH, "-c", "true")  # the log now starts on this TPM
        proc = run_until(kvmrkt, "network-up", *SH, "-c", "true")
        tpm.proc.kill()
        tpm.proc.wait()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 5 and "Traceback" not in err and "TPM" in err, (proc.returncode, err)
        no_traceback(kvmrkt.ok("gc", "--grace-period=0s"))
        tpm = start_swtpm(tmp_path / "tpm", tpm.port)
        res = kvmrkt.ok("run", *SH, "-c", "true")
        assert "the TPM was reset" in res.err and "TAMPER" not in res.err, res.err
        healthy(kvmrkt)
    finally:
        stop_swtpm(tpm)


def test_a_cni_plugin_killed_in_the_middle_of_its_add(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    plugins = tmp_path / "cni"
    plugins.mkdir()
    pidfile = tmp_path / "plugin.pid"
    (plugins / "stuck").write_text(f"#!/bin/sh\n[ \"$CNI_COMMAND\" = ADD ] || exit 0\necho $$ > {pidfile}\n"
                                   "exec sleep 600\n")
    (plugins / "stuck").chmod(0o755)
    (kvmrkt.config / "net.d").mkdir()
    (kvmrkt.config / "net.d" / "10-stuck.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "stuck", "plugins": [{"type": "stuck"}]}))
    config = (kvmrkt.config / "config.toml").read_text()
    config = config.replace("[network]\n", f'[network]\nplugin_dirs = ["{plugins}", "/usr/lib/cni"]\n')
    (kvmrkt.config / "config.toml").write_text(config)
    proc = kvmrkt.start("run", "--net=stuck", *SH, "-c", "true")
    deadline = time.monotonic() + 60
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline and proc.poll() is None, "the plugin never ran"
        time.sleep(0.05)
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 9 and "stuck" in err and "Traceback" not in err, (proc.returncode, err)
    healthy(kvmrkt)


def test_a_truncated_pod_manifest(kvmrkt: Kvmrkt) -> None:
    uuid = kvmrkt.ok("prepare", "--quiet", *SH, "-c", "true").out.strip()
    manifest = next((kvmrkt.data / "pods").glob(f"*/{uuid}")) / "pod"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    for args in (["list"], ["status", uuid], ["cat-manifest", uuid]):
        no_traceback(kvmrkt(*args))
    res = no_traceback(kvmrkt("run-prepared", uuid))
    assert res.rc != 0 and "pod" in res.err and uuid in res.err, res.err
    healthy(kvmrkt)
    assert kvmrkt("status", uuid).rc == 7


def test_a_corrupted_store_database(kvmrkt: Kvmrkt) -> None:
    """The store's index is damaged: every command that needs it says so and names the file (exit 3, no
    traceback); what to rebuild is the operator's call (the blobs are intact), so kvmrkt changes nothing."""
    db = kvmrkt.data / "cas" / "index.db"
    for part in (db, db.with_name("index.db-wal")):  # its pages may all still be in the write-ahead log
        if part.exists():
            data = bytearray(part.read_bytes())
            data[0:4096] = os.urandom(min(4096, len(data)))
            part.write_bytes(bytes(data))
    before = db.read_bytes()
    for args in (["image", "list"], ["run", *SH, "-c", "true"], ["image", "verify", "busybox"]):
        res = no_traceback(kvmrkt(*args))
        assert res.rc == 3 and f"index {db} cannot be read" in res.err, (args, res.rc, res.err)
    assert db.read_bytes() == before
    no_traceback(kvmrkt.ok("gc", "--grace-period=0s"))  # pods do not need the index


def test_a_half_written_measurement_log_record(kvmrkt: Kvmrkt) -> None:
    """A crash in the middle of appending a record leaves a torn one at the log's end: later launches append
    after it, and the log still replays (the torn record, never extended, is not part of the history)."""
    kvmrkt.ok("run", *SH, "-c", "true")
    log = next((kvmrkt.data / "measure").glob("*.cel"))
    with log.open("ab") as f:
        f.write(b'\x1e{"recnum": 99, "pcr": 15, "content_type": "kvmrkt-ev')
    healthy(kvmrkt)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB ext4 filesystem on a loop device (no blocks reserved for root), unmounted after the test."""
    image, mnt = tmp_path / "small.img", tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@contextmanager
def nearly_full(fs: Path, keep: int) -> Iterator[None]:
    """Fill ``fs`` up to ``keep`` free bytes for the block; free it after."""
    st = os.statvfs(fs)
    filler = fs / "filler"
    with filler.open("wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, max(st.f_bavail * st.f_frsize - keep, 1))
    try:
        yield
    finally:
        filler.unlink()


def test_enospc_during_import_and_prepare(kvmrkt: Kvmrkt, busybox_layout: Path, small_fs: Path) -> None:
    """The data dir's filesystem is full: import and prepare fail with the system's reason (no traceback), leave
    no half image, work file or pod behind, and once there is room again the same commands work."""
    small = Kvmrkt(small_fs / "data", kvmrkt.config, kvmrkt.tcti)
    with nearly_full(small_fs, keep=512 << 10):
        res = no_traceback(small("image", "import", f"oci:{busybox_layout}:latest", "--name", "busybox"))
        assert res.rc != 0 and "No space left on device" in res.err, (res.rc, res.err)
        assert json.loads(small.ok("image", "list", "--format", "json").out) == []
        assert not list((small.data / "cas" / "tmp").iterdir())
    small.ok("image", "import", f"oci:{busybox_layout}:latest", "--name", "busybox")
    small.ok("image", "verify", "busybox")
    with nearly_full(small_fs, keep=0):
        res = no_traceback(small("prepare", "--quiet", *SH, "-c", "true"))
        assert res.rc != 0 and "No space left on device" in res.err, (res.rc, res.err)
        no_traceback(small.ok("gc", "--grace-period=0s", "--expire-prepared=0s"))
    healthy(small)
    assert not list((small.data / "pods").glob("*/*-*"))


def killed_after(kvmrkt: Kvmrkt, delay: float, *args: str) -> None:
    """Start a kvmrkt command, SIGKILL it after ``delay`` seconds (if it is still running)."""
    proc = kvmrkt.start(*args)
    time.sleep(delay)
    proc.kill()
    proc.communicate(timeout=60)


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])
def test_kill_9_during_import(kvmrkt: Kvmrkt, busybox_layout: Path, tmp_path: Path, delay: float) -> None:
    fresh = Kvmrkt(tmp_path / "fresh", kvmrkt.config, kvmrkt.tcti)
    killed_after(fresh, delay, "image", "import", f"oci:{busybox_layout}:latest", "--name", "busybox")
    for image in json.loads(no_traceback(fresh.ok("image", "list", "--format", "json")).out):
        fresh.ok("image", "verify", image["id"])  # whatever the killed import recorded is whole
    no_traceback(fresh.ok("image", "gc", "--grace-period=0s"))  # sweeps the dead import's work files
    assert not list((fresh.data / "cas" / "tmp").iterdir())
    fresh.ok("image", "import", f"oci:{busybox_layout}:latest", "--name", "busybox")
    healthy(fresh)


def test_kill_9_during_stop_and_during_gc(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    uuid_file = tmp_path / "uuid"
    proc = kvmrkt.start("run", "--uuid-file-save", str(uuid_file), "--net=default", *SH, "-c", "sleep 600")
    uuid = kvmrkt.wait_running(uuid_file)
    killed_after(kvmrkt, 0.2, "stop", uuid)
    no_traceback(kvmrkt("status", uuid))
    no_traceback(kvmrkt.ok("stop", uuid))  # a stop again, whole this time
    proc.communicate(timeout=60)
    for code in range(3):
        assert kvmrkt("run", "--net=default", *SH, "-c", f"exit {code}").rc == code
    killed_after(kvmrkt, 0.3, "gc", "--grace-period=0s")
    healthy(kvmrkt)


# A libvirtd that runs before the test session starts is not the session's to kill (CI and this suite's own
# fixture start one; a developer's machine may run the system's).
@pytest.mark.skipif(libvirtd_answers(), reason="libvirtd was running before this test session")
def test_kill_9_of_libvirtd_while_a_libvirt_pod_runs(kvmrkt: Kvmrkt, request: pytest.FixtureRequest,
                                                     tmp_path: Path) -> None:
    """libvirtd dies (-9) under a running libvirt pod: the pod runs on (its QEMU is not libvirtd's child, and
    status and enter go through kvmrkt's own supervisor), a forced stop says libvirtd is unreachable (no
    traceback), and once libvirtd is back the pod stops and gc leaves the host clean."""
    use_backend(kvmrkt, request, "libvirt")
    assert OWN_LIBVIRTD, "the session's libvirtd fixture did not start libvirtd"
    uuid_file = tmp_path / "uuid"
    proc = kvmrkt.start("run", "--uuid-file-save", str(uuid_file), "--net=default", *SH, "-c", "sleep 600")
    uuid = kvmrkt.wait_running(uuid_file)
    pidfile = OWN_LIBVIRTD[0]
    os.kill(int(pidfile.read_text()), signal.SIGKILL)
    try:
        assert json.loads(kvmrkt.ok("status", "--format", "json", uuid).out)["state"] == "running"
        assert kvmrkt.ok("enter", uuid, "/bin/echo", "still-here").out == "still-here\n"
        res = no_traceback(kvmrkt("stop", "--force", uuid))
        assert res.rc != 0 and "libvirt" in res.err, (res.rc, res.err)
    finally:
        pidfile.unlink(missing_ok=True)
        start_libvirtd(pidfile)
    kvmrkt.ok("stop", uuid)
    proc.communicate(timeout=60)
    assert proc.returncode == 143, proc.returncode
    healthy(kvmrkt)
