"""VM templates against real VMs: a clone runs as a booted pod does, clones are unique, a template is measured,
and an altered, foreign or misfiled template is never resumed (stage1_kvm/template.py, guest/template.c)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from measure.events import parse_log
from measure.replay import replay

from .conftest import REPO, Kvmrkt, _our_processes

PROBE = ("echo host=$(hostname); echo rand=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'); "
         "echo boot=$(cat /proc/sys/kernel/random/boot_id); echo time=$(date +%s); echo disk=$(ls /)")


@pytest.fixture
def templated(kvmrkt: Kvmrkt, tmp_path: Path) -> Kvmrkt:
    """A kvmrkt with templates of its own (none built yet)."""
    kvmrkt.templates = tmp_path / "templates"
    kvmrkt.templates.mkdir(mode=0o700)
    kvmrkt.write_config("[stage1]\nstop_timeout = 3\n")
    return kvmrkt


def _probe(k: Kvmrkt, tmp_path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Run the probe pod; its printed facts and its stage1 run record."""
    uuid_file = tmp_path / f"uuid-{time.monotonic_ns()}"
    res = k("run", "--uuid-file-save", str(uuid_file), "busybox", "--exec", "/bin/sh", "--", "-c", PROBE)
    assert res.rc == 0, res.err
    facts = dict(line.split("=", 1) for line in res.out.splitlines() if "=" in line)
    record = json.loads(next(k.data.glob(f"pods/*/{uuid_file.read_text().strip()}/stage1-run.json")).read_text())
    return facts, record


def _build(k: Kvmrkt) -> dict[str, Any]:
    built = json.loads(k.ok("stage1", "template", "build", "--format", "json").out)["built"]
    assert len(built) == 1, built
    return dict(built[0])


def test_a_clone_runs_as_a_booted_pod_and_every_clone_is_unique(templated: Kvmrkt, tmp_path: Path) -> None:
    k = templated
    booted, record = _probe(k, tmp_path)
    assert record["template"] is None
    listed = json.loads(k.ok("stage1", "template", "list", "--format", "json").out)
    assert listed == {"templates": [], "wanted": 1}  # the booted pod's shape was recorded
    tmpl = _build(k)
    assert tmpl["disks"] >= 1 and tmpl["memory_mib"] >= 256 and tmpl["digest"].startswith("sha256:")
    for path in [k.templates, *k.templates.rglob("*")]:  # type: ignore[union-attr]
        assert path.stat().st_uid == 0 and not path.stat().st_mode & 0o077, path
    clones = [_probe(k, tmp_path) for _ in range(2)]
    for facts, rec in clones:
        assert rec["template"]["key"] == tmpl["key"]
        assert facts["disk"] == booted["disk"]  # the clone's own disk, probed after the handoff
        assert abs(int(facts["time"]) - time.time()) < 60  # the host's clock, not the template's
    facts = [booted, *(f for f, _ in clones)]
    for key in ("host", "rand", "boot"):
        assert len({f[key] for f in facts}) == 3, (key, facts)
    # The clones' stage1 events name the template; the booted pod's does not.
    rep = replay(parse_log(next((k.data / "measure").glob("*.cel")).read_bytes()))
    stage1 = [json.loads(e["event"].split(":", 2)[2]) for e in rep.events if e["event"].startswith("kvmrkt:stage1:")]
    assert [s.get("template", {}).get("state") for s in stage1] == [None, tmpl["digest"], tmpl["digest"]]
    assert "(matches)" in k.ok("attest", "log").out


def test_an_altered_template_is_never_resumed(templated: Kvmrkt, tmp_path: Path) -> None:
    k = templated
    _probe(k, tmp_path)
    tmpl = _build(k)
    state = Path(tmpl["path"]) / "state"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in guest memory
    state.write_bytes(bytes(data))
    res = k("run", "busybox", "--exec", "/bin/sh", "--", "-c", "echo ran")
    assert res.rc == 8 and "is altered" in res.err and "was not resumed" in res.err, res.err
    assert "ran" not in res.out and "Traceback" not in res.err
    assert not _our_processes(str(k.data))
    k.ok("stage1", "template", "rm", tmpl["key"])
    assert _probe(k, tmp_path)[1]["template"] is None  # boots again


@pytest.mark.parametrize("tamper", ["group-readable", "misfiled"])
def test_a_template_that_is_not_kvmrkts_own_is_refused(templated: Kvmrkt, tmp_path: Path, tamper: str) -> None:
    k = templated
    _probe(k, tmp_path)
    path = Path(_build(k)["path"])
    if tamper == "group-readable":
        (path / "state").chmod(0o640)
        want = "is not root's own"
    else:  # another shape's template put where this shape's belongs
        meta = json.loads((path / "template.json").read_text())
        meta["shape"]["memory_mib"] += 1
        (path / "template.json").write_text(json.dumps(meta))
        want = "built for another shape"
    res = k("run", "busybox", "--exec", "/bin/true")
    assert res.rc == 8 and want in res.err and "stage1 template rm" in res.err, res.err
    assert not _our_processes(str(k.data))


def test_a_template_of_another_kernel_is_not_used(templated: Kvmrkt, tmp_path: Path) -> None:
    k = templated
    _probe(k, tmp_path)
    _build(k)
    k.write_config('[stage1]\nkernel = "debian-cloud"\nstop_timeout = 3\n')
    record = _probe(k, tmp_path)[1]
    assert record["template"] is None and record["kernel"]["kind"] == "debian-cloud"
    listed = json.loads(k.ok("stage1", "template", "list", "--format", "json").out)
    assert len(listed["templates"]) == 1 and listed["wanted"] == 1


def test_templates_off_boots(templated: Kvmrkt, tmp_path: Path) -> None:
    k = templated
    _probe(k, tmp_path)
    _build(k)
    k.write_config("[stage1]\ntemplates = false\n")
    assert _probe(k, tmp_path)[1]["template"] is None
    shutil.rmtree(k.templates)  # type: ignore[arg-type]


def test_a_clone_on_the_default_network_gets_its_own_mac_and_address(templated: Kvmrkt, tmp_path: Path) -> None:
    """The NIC's MAC is device state the snapshot restores: the clone sets the pod's own before the network is
    configured (else the pod config's NIC is not found, or two clones would share a MAC)."""
    k = templated
    probe = "cat /sys/class/net/eth0/address; ip -o -4 addr show eth0; ping -c1 -W5 172.16.28.1"
    k.ok("run", "--net=default", "busybox", "--exec", "/bin/sh", "--", "-c", "true")
    _build(k)
    macs = set()
    for _ in range(2):
        uuid_file = tmp_path / f"net-{time.monotonic_ns()}"
        res = k.ok("run", "--net=default", "--uuid-file-save", str(uuid_file), "busybox", "--exec", "/bin/sh", "--",
                   "-c", probe)
        pod = next(k.data.glob(f"pods/*/{uuid_file.read_text().strip()}"))
        assert json.loads((pod / "stage1-run.json").read_text())["template"] is not None
        assert "eth0    inet 172.16.28." in res.out and "1 packets received" in res.out, res.out
        macs.add(res.out.split()[0])
    assert len(macs) == 2 and "52:54:00:00:00:01" not in macs  # the pods' own, not the template's


def test_a_clone_mounts_its_own_host_volume(templated: Kvmrkt, tmp_path: Path) -> None:
    """A 9p share is plugged into the template unmounted; each clone's QEMU exports the pod's own directory."""
    k = templated
    outs = []
    for i in range(3):  # boots (recording the shape), then two clones after the build
        vol = tmp_path / f"v{i}"
        vol.mkdir()
        (vol / "in").write_text(f"volume {i}\n")
        uuid_file = tmp_path / f"vol-{i}"
        res = k.ok("run", "--uuid-file-save", str(uuid_file), "--volume", f"v,kind=host,source={vol}", "busybox",
                   "--mount", "volume=v,target=/v", "--exec", "/bin/sh", "--", "-c", "cat /v/in; echo out > /v/out")
        outs.append(res.out)
        assert (vol / "out").read_text() == "out\n"
        record = json.loads(next(k.data.glob(f"pods/*/{uuid_file.read_text().strip()}/stage1-run.json")).read_text())
        assert (record["template"] is None) == (i == 0)
        if i == 0:
            _build(k)
    assert outs == [f"volume {i}\n" for i in range(3)]


@pytest.mark.parametrize("frame", [
    b"POD x 00 1 2\n",  # not numbers, a short seed
    b"POD 5000000 " + b"00" * 64 + b" 1 2\nversion 6\n",  # a config over the 4 MiB limit
    b"POD 10 " + b"zz" * 64 + b" 1 2\nversion 6\n",  # a seed that is not hex
    b"NOT A FRAME\n",
])
def test_a_malformed_handoff_ends_the_clone(templated: Kvmrkt, tmp_path: Path, frame: bytes) -> None:
    """The guest parses its handoff with bounds: a malformed one (sent here by patching the host) ends the VM
    with a FATAL status, never a pod started on half a config."""
    k = templated
    _probe(k, tmp_path)
    _build(k)
    patched = ("import sys, stage1_kvm.template as t; "
               f"t.handoff_frame = lambda config: {frame!r}; "
               "from kvmrkt.cli import main; sys.argv[0] = 'kvmrkt'; main()")
    argv = [sys.executable, "-c", patched, *k.argv("run", "busybox", "--exec", "/bin/sh", "--", "-c", "echo ran")[3:]]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 8 and "template handoff failed" in res.stderr, res.stderr
    assert "ran" not in res.stdout and "Traceback" not in res.stderr
    assert not _our_processes(str(k.data))
