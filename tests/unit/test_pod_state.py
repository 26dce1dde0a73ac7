"""The on-disk pod state machine: phases, locks, renames, lookups, manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmrkt.errors import ManifestError, PodNotFoundError, PodStateError
from kvmrkt.pods.manifest import AppSpec, PodManifest
from kvmrkt.pods.pod import Phase, Pod
from kvmrkt.pods.records import EXIT, ExitRecord


def test_lifecycle_states(tmp_path: Path) -> None:
    pod = Pod.create(tmp_path)
    assert pod.state() == "embryo"
    pod.move("prepare")
    assert pod.state() == "preparing"
    pod.move("prepared")
    assert pod.state() == "prepared"
    pod.move("run")
    assert pod.state() == "running"
    pod.unlock()
    assert pod.state() == "exited"
    other = Pod.find(tmp_path, pod.uuid[:8])
    other.lock()
    assert pod.state() == "running"
    other.unlock()
    pod.lock()
    pod.move("exited-garbage")
    assert pod.state() == "deleting"
    pod.unlock()
    assert pod.state() == "exited garbage"


@pytest.mark.parametrize(("path", "bad"), [
    ((), Phase.RUN),  # an embryo never runs without being prepared
    ((Phase.PREPARE,), Phase.RUN),
    ((Phase.PREPARE, Phase.PREPARED, Phase.RUN), Phase.GARBAGE),  # a pod that ran is exited garbage
    ((Phase.PREPARE, Phase.PREPARED, Phase.RUN), Phase.PREPARED),  # no way back
    ((Phase.GARBAGE,), Phase.PREPARE),
])
def test_the_lifecycle_refuses_moves_it_does_not_have(tmp_path: Path, path: tuple[Phase, ...], bad: Phase) -> None:
    pod = Pod.create(tmp_path)
    for phase in path:
        pod.move(phase)
    before = pod.path
    with pytest.raises(PodStateError, match="cannot move"):
        pod.move(bad)
    assert pod.path == before and before.is_dir()


def test_only_the_lock_holder_moves_a_pod(tmp_path: Path) -> None:
    pod = Pod.create(tmp_path)
    pod.unlock()
    other = Pod.find(tmp_path, pod.uuid)
    with pytest.raises(PodStateError, match="needs its lock"):
        other.move(Phase.PREPARE)
    assert other.phase == Phase.EMBRYO and (tmp_path / "pods" / "embryo" / pod.uuid).is_dir()


def test_aborted_prepare_is_visible(tmp_path: Path) -> None:
    pod = Pod.create(tmp_path)
    pod.move("prepare")
    pod.unlock()
    assert Pod.find(tmp_path, pod.uuid).state() == "aborted prepare"


def test_lock_is_exclusive_across_open_file_descriptions(tmp_path: Path) -> None:
    pod = Pod.create(tmp_path)
    with pytest.raises(PodStateError):
        Pod.find(tmp_path, pod.uuid).lock()
    pod.unlock()
    Pod.find(tmp_path, pod.uuid).lock()


def test_find_errors(tmp_path: Path) -> None:
    with pytest.raises(PodNotFoundError):
        Pod.find(tmp_path, "nope")
    pods = [Pod.create(tmp_path) for _ in range(40)]
    firsts = [p.uuid[0] for p in pods]
    shared = next(c for c in firsts if firsts.count(c) > 1)  # 40 pods, 16 hex digits: a collision is certain
    with pytest.raises(PodNotFoundError, match="ambiguous"):
        Pod.find(tmp_path, shared)


def test_atomic_json(tmp_path: Path) -> None:
    pod = Pod.create(tmp_path)
    pod.write_json("x.json", {"a": 1})
    assert pod.read_json("x.json") == {"a": 1}
    assert not [p for p in pod.path.iterdir() if p.name.startswith(".")]
    assert pod.read_json("missing.json", 5) == 5


def test_manifest_roundtrip_and_strictness() -> None:
    app = AppSpec(name="web", image_id="sha256:" + "a" * 64, image_name="x:latest",
                  rootfs_digest="sha256:" + "b" * 64, exec=("/bin/true",), env=(("A", "1"),), uid=5, gid=6)
    m = PodManifest(uuid="u", apps=(app,), hostname="h")
    assert PodManifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    doc = m.to_dict()
    doc["apps"][0]["surprise"] = 1
    with pytest.raises(ManifestError, match="surprise"):
        PodManifest.from_dict(doc)
    doc = m.to_dict()
    doc["apps"][0]["uid"] = -1
    with pytest.raises(ManifestError, match="uid"):
        PodManifest.from_dict(doc)
    with pytest.raises(ManifestError):
        PodManifest(uuid="u", apps=(app, app))
    with pytest.raises(ManifestError):
        AppSpec(name="Web", image_id="", image_name="", rootfs_digest="", exec=("x",))
    with pytest.raises(ManifestError, match="nothing to execute"):
        AppSpec(name="web", image_id="", image_name="", rootfs_digest="", exec=())


@pytest.mark.parametrize("doc", [[1, 2], {"exit_codes": {"app": "zero"}}, {"exit_codes": [1]},
                                 {"finished": "yesterday"}])
def test_a_damaged_exit_record_reads_as_not_known(tmp_path: Path, doc: object) -> None:
    pod = Pod.create(tmp_path)
    (pod.path / EXIT).write_text(json.dumps(doc))
    assert ExitRecord.read(pod) is None


def test_an_exit_record_reads_back_as_written(tmp_path: Path) -> None:
    pod = Pod.create(tmp_path)
    record = ExitRecord({"app": 3}, True, ("sha mismatch",), 12.5)
    pod.write_json(EXIT, record.to_dict())
    assert ExitRecord.read(pod) == record
