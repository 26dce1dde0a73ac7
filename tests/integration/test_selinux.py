"""sVirt labels on a host where SELinux is off (as here): allocated per pod, unique under concurrency, freed
by gc and after crashes, written as security.selinux xattrs on pod files, measured, refused in required mode.

No enforcing SELinux environment can be built on this host (the kernel has SELinux disabled), so the test that
one pod's process cannot read another pod's files is not here; the label plumbing that would make it so is."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from pathlib import Path

from measure.events import parse_log
from measure.replay import replay
from policy import selinux

from .conftest import Kvmrkt, _our_processes

LABEL = re.compile(r"^system_u:system_r:svirt_t:s0:c(\d+),c(\d+)$")


def test_labels_are_allocated_recorded_written_and_measured(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    uuid_file = tmp_path / "uuid"
    kvmrkt.ok("run", "--uuid-file-save", str(uuid_file), "busybox", "--exec", "/bin/true")
    uuid = uuid_file.read_text().strip()
    st = json.loads(kvmrkt.ok("status", "--format", "json", uuid).out)["selinux"]
    m = LABEL.match(st["process_label"])
    assert m and int(m.group(1)) < int(m.group(2))
    assert st["file_label"] == st["process_label"].replace("system_r:svirt_t", "object_r:svirt_image_t")
    assert st["process_label_applied"] is (selinux.enabled())
    annotations = {a["name"]: a["value"] for a in json.loads(kvmrkt.ok("cat-manifest", uuid).out)["annotations"]}
    assert annotations["kvmrkt.selinux/process-label"] == st["process_label"]
    pod_dir = kvmrkt.data / "pods" / "run" / uuid
    for name in ("console.log", "guest-status", "logs/busybox.stdout", "pod"):
        assert selinux.read_label(pod_dir / name) == st["file_label"], name
    rep = replay(parse_log(next((kvmrkt.data / "measure").glob("*.cel")).read_bytes()))
    stage1 = json.loads(rep.events[0]["event"].split(":", 2)[2])
    assert stage1["selinux"]["process"] == st["process_label"]


def test_required_mode_refuses_where_labels_cannot_be_applied(kvmrkt: Kvmrkt) -> None:
    if selinux.enabled():
        return
    res = kvmrkt("run", "--selinux=required", "busybox", "--exec", "/bin/true")
    assert res.rc == 6 and "SELinux is not enabled" in res.err
    assert not _our_processes(str(kvmrkt.data))
    kvmrkt.write_config('[selinux]\nmode = "required"\n')
    assert kvmrkt("run", "busybox", "--exec", "/bin/true").rc == 6


def test_pairs_are_freed_by_gc_and_after_crashes(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    table = kvmrkt.data / "selinux" / "mcs.json"
    uuid_file = tmp_path / "uuid"
    kvmrkt.ok("run", "--uuid-file-save", str(uuid_file), "busybox", "--exec", "/bin/true")
    uuid = uuid_file.read_text().strip()
    assert uuid in json.loads(table.read_text())
    kvmrkt.ok("gc", "--grace-period=0s")
    assert uuid not in json.loads(table.read_text())
    selinux.allocate(table, "crashed-pod-that-left-no-directory", None)  # as if a run died mid-prepare
    kvmrkt.ok("prepare", "--quiet", "busybox", "--exec", "/bin/true")
    assert "crashed-pod-that-left-no-directory" not in json.loads(table.read_text())


def _allocate_many(args: tuple[str, int]) -> list[tuple[int, int]]:
    path, worker = args
    return [selinux.allocate(Path(path), f"pod-{worker}-{i}", None).mcs for i in range(50)]


def test_pairs_are_unique_across_concurrent_processes(tmp_path: Path) -> None:
    table = tmp_path / "mcs.json"
    with multiprocessing.get_context("fork").Pool(20) as pool:
        results = pool.map(_allocate_many, [(str(table), w) for w in range(20)])
    pairs = [p for r in results for p in r]
    assert len(pairs) == 1000 and len(set(pairs)) == 1000
    assert all(0 <= a < b <= 1023 for a, b in pairs)
    assert len(json.loads(table.read_text())) == 1000
    assert os.stat(table).st_mode & 0o777 == 0o600
