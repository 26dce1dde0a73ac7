"""The pod lifecycle against real VMs (TCG on this build host): run, exit codes, apps, enter, stop, gc."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import REPO, Kvmrkt, use_backend, wait_output

SH = ["busybox", "--exec", "/bin/sh", "--"]


@pytest.fixture(params=["qemu", "libvirt", "qemu-template"])
def kvmrkt(kvmrkt: Kvmrkt, request: pytest.FixtureRequest) -> Kvmrkt:
    """Every lifecycle test runs against both backends: QEMU started directly, and a libvirt domain; and with
    QEMU, its pods restored from a VM template (those of the template's shape: one app, no volume, no terminal;
    the others boot, as a pod without a template of its shape does)."""
    return use_backend(kvmrkt, request, request.param)


@pytest.mark.parametrize(("script", "code"), [("exit 0", 0), ("exit 7", 7), ("exit 255", 255), ("kill -KILL $$", 137)])
def test_exit_codes(kvmrkt: Kvmrkt, script: str, code: int) -> None:
    res = kvmrkt("run", *SH, "-c", script)
    assert res.rc == code, res.err


def test_stdout_stderr_env_user_workdir(kvmrkt: Kvmrkt) -> None:
    res = kvmrkt("run", "--set-env", "POD=1", "busybox", "--exec", "/bin/sh", "--user", "app", "--working-dir",
                 "/tmp", "--set-env", "GREETING=hello world", "--", "-c",
                 'echo "$GREETING|$POD|$AC_APP_NAME"; id -u; id -g; id -G; pwd; echo oops >&2; hostname')
    assert res.rc == 0, res.err
    lines = res.out.splitlines()
    assert lines[0] == "hello world|1|busybox"
    assert lines[1:4] == ["1000", "1000", "1000 1001"]
    assert lines[4] == "/tmp"
    assert lines[5].startswith("kvmrkt-")
    assert "oops" in res.err and "oops" not in res.out


def test_args_keep_spaces_and_empty_strings(kvmrkt: Kvmrkt) -> None:
    res = kvmrkt("run", *SH, "-c", 'for a in "$@"; do echo "[$a]"; done', "sh", "a b", "", "100%", "x\ny")
    assert res.out.splitlines() == ["[a b]", "[]", "[100%]", "[x", "y]"], res.err


def test_image_defaults_apply(kvmrkt: Kvmrkt) -> None:
    # The image's cmd is `sh` with stdin /dev/null: it exits 0 at once.
    res = kvmrkt("run", "busybox")
    assert res.rc == 0, res.err


def test_multi_app_pod_exit_code_is_first_nonzero(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    uuid_file = tmp_path / "uuid"
    res = kvmrkt("--insecure-options=http,tpm", "run", "--uuid-file-save", str(uuid_file), "--hostname", "podhost",
                 "busybox", "--name", "one", "--exec", "/bin/sh", "--", "-c", "echo from-$(hostname); exit 0", "---",
                 "busybox", "--name", "two", "--exec", "/bin/sh", "--", "-c", "echo from-two; exit 3", "---",
                 "busybox", "--name", "three", "--exec", "/bin/sh", "--", "-c", "exit 4")
    assert res.rc == 3, res.err
    assert "from-podhost" in res.out and "from-two" in res.out
    st = json.loads(kvmrkt.ok("status", "--format", "json", uuid_file.read_text().strip()).out)
    assert st["state"] == "exited"
    assert {a["name"]: a["exit_code"] for a in st["apps"]} == {"one": 0, "two": 3, "three": 4}
    assert st["accel"] in ("tcg", "kvm") and st["exit_code"] == 3
    assert st["insecure_options"] == ["http", "tpm"]
    logs = kvmrkt.data / "pods" / "run" / st["uuid"] / "logs"
    assert (logs / "two.stdout").read_text() == "from-two\n"


def test_missing_exec_path(kvmrkt: Kvmrkt) -> None:
    res = kvmrkt("run", "busybox", "--exec", "/no/such/program")
    assert res.rc == 127
    assert "/no/such/program" in res.err


def test_prepare_run_prepared_status_list_rm(kvmrkt: Kvmrkt) -> None:
    uuid = kvmrkt.ok("prepare", "--quiet", *SH, "-c", "echo prepared-ran; exit 5").out.strip()
    assert len(uuid) == 36
    assert json.loads(kvmrkt.ok("status", "--format", "json", uuid).out)["state"] == "prepared"
    listed = json.loads(kvmrkt.ok("list", "--format", "json").out)
    assert [p["state"] for p in listed if p["uuid"] == uuid] == ["prepared"]
    manifest = json.loads(kvmrkt.ok("cat-manifest", uuid[:8]).out)
    assert manifest["apps"][0]["exec"] == ["/bin/sh", "-c", "echo prepared-ran; exit 5"]
    res = kvmrkt("run-prepared", uuid)
    assert res.rc == 5 and "prepared-ran" in res.out
    again = kvmrkt("run-prepared", uuid)
    assert again.rc == 7 and "not prepared" in again.err
    text = kvmrkt.ok("status", uuid).out
    assert "state=exited" in text and "app-busybox=5" in text
    kvmrkt.ok("rm", uuid)
    assert kvmrkt("status", uuid).rc == 7


def test_enter_and_graceful_stop(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    uuid_file = tmp_path / "uuid"
    proc = kvmrkt.start("run", "--uuid-file-save", str(uuid_file), *SH, "-c",
                        "trap 'echo got-term; exit 42' TERM; echo started; while :; do sleep 0.2; done")
    uuid = kvmrkt.wait_running(uuid_file)
    wait_output(kvmrkt, uuid, "started")
    res = kvmrkt("enter", uuid, "/bin/sh", "-c", "echo inside $(hostname); echo to-err >&2; exit 5")
    assert res.rc == 5
    assert res.out.startswith("inside kvmrkt-") and res.err == "to-err\n"
    assert kvmrkt("enter", "--app", "nope", uuid, "true").rc == 2
    res = kvmrkt("enter", "-i", uuid, "/bin/sh", "-c", "read a; read b; echo got $a $b; cat | wc -c",
                 input="one\ntwo\n" + "x" * 200_000)
    assert res.rc == 0 and res.out.split() == ["got", "one", "two", "200000"]  # stdin, in frames, until EOF
    # -t: a terminal in the guest, sized like ours (script(1) gives this test a 40x120 one).
    cmd = shlex.join(kvmrkt.argv("enter", "-t", uuid, "/bin/sh", "-c", "tty; stty size; exit 3"))
    term = subprocess.run(["script", "-qec", f"stty rows 40 cols 120; {cmd}", "/dev/null"], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert term.returncode == 3 and "/dev/pts/" in term.stdout and "40 120" in term.stdout, term.stdout
    assert kvmrkt.ok("stop", uuid).out.split() == [uuid, "exited"]
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 42, err
    assert "got-term" in out
    assert kvmrkt("enter", uuid, "true").rc == 7
    assert kvmrkt("stop", uuid).rc == 7


def test_concurrent_enter_sessions(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    """Enter sessions into one pod run at once (the ctl port is multiplexed): the first, with stdin, waits on a
    fifo that the second writes, then on one that a third, on a terminal, writes. Input the first does not read
    stalls only its own session."""
    uuid_file = tmp_path / "uuid"
    kvmrkt.start("run", "--uuid-file-save", str(uuid_file), *SH, "-c",
                 "mkfifo /tmp/f /tmp/g; echo started; while :; do sleep 0.2; done")
    uuid = kvmrkt.wait_running(uuid_file)
    wait_output(kvmrkt, uuid, "started")
    (tmp_path / "stdin").write_text("typed\n" + "z" * (2 << 20))  # it reads one line: the rest fills its window
    with (tmp_path / "stdin").open() as stdin:
        first = subprocess.Popen(kvmrkt.argv("enter", "-i", uuid, "/bin/sh", "-c", "read a; cat /tmp/f; cat /tmp/g; "
                                             'echo "first $a"'),
                                 stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    kvmrkt.procs.append(first)
    second = kvmrkt("enter", uuid, "/bin/sh", "-c", "echo from-second > /tmp/f; echo second-done", timeout=30)
    assert second.rc == 0 and second.out == "second-done\n", second.err
    assert first.poll() is None  # still running, waiting on /tmp/g
    cmd = shlex.join(kvmrkt.argv("enter", "-t", uuid, "/bin/sh", "-c", "tty; echo from-third > /tmp/g"))
    term = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert term.returncode == 0 and "/dev/pts/" in term.stdout, term.stdout
    out, err = first.communicate(timeout=30)
    assert first.returncode == 0, err
    assert out.splitlines() == ["from-second", "from-third", "first typed"]
    kvmrkt.ok("stop", uuid)


def test_stop_kills_apps_that_ignore_sigterm(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    uuid_file = tmp_path / "uuid"
    proc = kvmrkt.start("run", "--uuid-file-save", str(uuid_file), *SH, "-c",
                        "trap '' TERM; echo ready; while :; do sleep 1; done")
    uuid = kvmrkt.wait_running(uuid_file)
    wait_output(kvmrkt, uuid, "ready")  # a stop before the trap would (rightly) end the app with SIGTERM
    kvmrkt.ok("stop", uuid)
    proc.communicate(timeout=60)
    assert proc.returncode == 137
    # The guest reported the SIGKILL itself (a VM killed from the host reports no exit code for its apps).
    status = json.loads(kvmrkt.ok("status", "--format", "json", uuid).out)
    assert status["apps"][0]["exit_code"] == 137


def test_forced_stop(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    uuid_file = tmp_path / "uuid"
    proc = kvmrkt.start("run", "--uuid-file-save", str(uuid_file), *SH, "-c", "sleep 600")
    uuid = kvmrkt.wait_running(uuid_file)
    kvmrkt.ok("stop", "--force", uuid)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert json.loads(kvmrkt.ok("status", "--format", "json", uuid).out)["state"] == "exited"


def test_sigterm_to_kvmrkt_run_stops_the_pod(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    uuid_file = tmp_path / "uuid"
    proc = kvmrkt.start("run", "--uuid-file-save", str(uuid_file), *SH, "-c", "sleep 600")
    uuid = kvmrkt.wait_running(uuid_file)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert json.loads(kvmrkt.ok("status", "--format", "json", uuid).out)["state"] == "exited"


def test_killed_run_is_recovered_by_gc(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    uuid_file = tmp_path / "uuid"
    proc = kvmrkt.start("run", "--uuid-file-save", str(uuid_file), *SH, "-c", "sleep 600")
    uuid = kvmrkt.wait_running(uuid_file)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while json.loads(kvmrkt.ok("status", "--format", "json", uuid).out)["state"] != "exited":
        assert time.monotonic() < deadline, "QEMU outlived its killed kvmrkt run"
        time.sleep(0.1)
    gc = json.loads(kvmrkt.ok("gc", "--grace-period=0s", "--format", "json").out)
    assert uuid in gc["marked"] and uuid in gc["removed"]
    assert kvmrkt("status", uuid).rc == 7
    assert not (kvmrkt.data / "pods" / "run" / uuid).exists()


def test_gc_grace_period(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    uuid_file = tmp_path / "uuid"
    kvmrkt.ok("run", "--uuid-file-save", str(uuid_file), *SH, "-c", "true")
    uuid = uuid_file.read_text().strip()
    first = json.loads(kvmrkt.ok("gc", "--format", "json").out)
    assert first == {"marked": [uuid], "removed": []}
    assert json.loads(kvmrkt.ok("status", "--format", "json", uuid).out)["state"] == "exited garbage"
    assert json.loads(kvmrkt.ok("gc", "--grace-period=0s", "--format", "json").out)["removed"] == [uuid]


def test_volumes_read_only_and_read_write(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "input.txt").write_text("from the host\n")
    res = kvmrkt("run", "--volume", f"in,kind=host,source={ro},readOnly=true",
                 "--volume", f"out,kind=host,source={rw}", "--volume", "scratch,kind=empty",
                 "busybox", "--mount", "volume=in,target=/in", "--mount", "volume=out,target=/out",
                 "--mount", "volume=scratch,target=/scratch", "--exec", "/bin/sh", "--", "-c",
                 "cat /in/input.txt; echo written > /out/result.txt; echo s > /scratch/s && cat /scratch/s; "
                 "if echo x > /in/nope 2>/dev/null; then echo RO-BROKEN; fi")
    assert res.rc == 0, res.err
    assert res.out.splitlines() == ["from the host", "s"], res.err
    assert (rw / "result.txt").read_text() == "written\n"
    assert not (ro / "nope").exists()


def test_interactive_stdin(kvmrkt: Kvmrkt) -> None:
    res = kvmrkt("run", "--interactive", "busybox", "--exec", "/bin/sh", "--", "-c", "tr a-z A-Z",
                 input="hello stdin\n")
    assert res.rc == 0, res.err
    assert res.out == "HELLO STDIN\n"


def test_rootfs_is_writable_in_memory_only(kvmrkt: Kvmrkt) -> None:
    kvmrkt.ok("run", *SH, "-c", "echo changed > /bin/marker && cat /bin/marker")
    res = kvmrkt("run", *SH, "-c", "cat /bin/marker")
    assert res.rc == 1


def test_debian_cloud_kernel(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    kvmrkt.write_config('[stage1]\nkernel = "debian-cloud"\nstop_timeout = 3\n')
    res = kvmrkt("run", *SH, "-c", "uname -r; exit 9")
    assert res.rc == 9, res.err
    assert res.out.strip().endswith("-cloud-amd64")
    vol = tmp_path / "v"
    vol.mkdir()
    res = kvmrkt("run", "--volume", f"v,kind=host,source={vol}", "busybox", "--mount", "volume=v,target=/v",
                 "--exec", "/bin/true")
    assert res.rc == 2 and "9p" in res.err


def test_run_accepts_an_oci_layout_directly(kvmrkt: Kvmrkt, busybox_layout: Path) -> None:
    res = kvmrkt("run", f"oci:{busybox_layout}:latest", "--exec", "/bin/sh", "--", "-c", "echo direct")
    assert res.rc == 0 and res.out == "direct\n", res.err


def test_pod_manifest_from_cat_manifest(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    uuid = kvmrkt.ok("prepare", "--quiet", *SH, "-c", "echo from-manifest; exit 6").out.strip()
    manifest = json.loads(kvmrkt.ok("cat-manifest", uuid).out)
    manifest["apps"][0]["env"].append({"name": "EXTRA", "value": "yes"})
    manifest["apps"][0]["exec"] = ["/bin/sh", "-c", "echo $EXTRA; exit 6"]
    path = tmp_path / "pod.json"
    path.write_text(json.dumps(manifest))
    res = kvmrkt("run", "--pod-manifest", str(path))
    assert res.rc == 6 and res.out == "yes\n", res.err
    manifest["apps"][0]["surprise"] = True
    path.write_text(json.dumps(manifest))
    res = kvmrkt("run", "--pod-manifest", str(path))
    assert res.rc == 2 and "surprise" in res.err


def test_repeated_boots_never_hang(kvmrkt: Kvmrkt) -> None:
    # Under TCG about 1 boot in 6 used to hang at TSC calibration; tsc_early_khz must prevent it.
    for i in range(12):
        res = kvmrkt("run", *SH, "-c", f"exit {i}", timeout=60)
        assert res.rc == i, res.err


def test_status_wait(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    uuid_file = tmp_path / "uuid"
    proc = kvmrkt.start("run", "--uuid-file-save", str(uuid_file), *SH, "-c", "sleep 1; exit 4")
    uuid = kvmrkt.wait_running(uuid_file)
    st = json.loads(kvmrkt.ok("status", "--wait", "--format", "json", uuid).out)
    assert st["state"] == "exited" and st["apps"][0]["exit_code"] == 4
    proc.communicate(timeout=30)
    assert proc.returncode == 4


def test_memory_and_cpu_size_the_vm(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    uuid_file = tmp_path / "uuid"
    res = kvmrkt("run", "--uuid-file-save", str(uuid_file), "busybox", "--memory", "300Mi", "--cpu", "2",
                 "--exec", "/bin/sh", "--", "-c", "nproc; grep MemTotal /proc/meminfo")
    assert res.rc == 0, res.err
    nproc, meminfo = res.out.splitlines()
    assert nproc == "2"
    assert 300 * 1024 < int(meminfo.split()[1]) <= 428 * 1024
    st = json.loads(kvmrkt.ok("status", "--format", "json", uuid_file.read_text().strip()).out)
    assert (st["memory_mib"], st["vcpus"]) == (428, 2)


def test_output_to_a_closed_pipe_is_not_a_crash(kvmrkt: Kvmrkt) -> None:
    import shlex
    import subprocess

    proc = subprocess.run(shlex.join(kvmrkt.argv("run", *SH, "-c", "yes | head -n 20000")) + " | head -n 1",
                          shell=True, capture_output=True, text=True, timeout=120)
    assert proc.stdout == "y\n"
    assert "Traceback" not in proc.stderr


def test_libvirt_domain_is_valid_and_transient(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    import subprocess

    if kvmrkt.backend != "libvirt":
        return
    uuid_file = tmp_path / "uuid"
    proc = kvmrkt.start("run", "--uuid-file-save", str(uuid_file), *SH, "-c", "sleep 600")
    uuid = kvmrkt.wait_running(uuid_file)
    listed = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--name"], capture_output=True, text=True)
    assert f"kvmrkt-{uuid}" in listed.stdout.split()
    xml = kvmrkt.data / "pods" / "run" / uuid / "domain.xml"
    check = subprocess.run(["virt-xml-validate", str(xml), "domain"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    kvmrkt.ok("stop", uuid)
    proc.communicate(timeout=60)
    listed = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                            text=True)
    assert f"kvmrkt-{uuid}" not in listed.stdout.split()
