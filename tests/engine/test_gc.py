"""Engine tests on the fake stage1: pod gc (marking, grace, expiry, running pods untouched) and image gc."""

from __future__ import annotations

from kvmrkt.pods.pod import Pod
from tests.engine.conftest import Env

HOUR = 3600.0


def test_gc_marks_exited_pods_then_collects_them_after_the_grace_period(env: Env) -> None:
    env.image("example.com/app:1")
    pod = env.prepare("example.com/app:1")
    assert env.start(pod).join() == 0
    engine = env.engine()
    assert engine.gc(grace_period=HOUR, expire_prepared=HOUR) == {"marked": [pod.uuid], "removed": []}
    assert engine.status(pod.uuid)["state"] == "exited garbage"
    assert env.calls("gc") == []
    assert engine.gc(grace_period=0, expire_prepared=HOUR) == {"marked": [], "removed": [pod.uuid]}
    assert env.pod_dirs() == []
    assert env.calls("gc") == [f"gc {pod.uuid}"]


def test_gc_expires_prepared_pods_and_never_touches_a_running_one(env: Env) -> None:
    env.image("example.com/app:1")
    env.script({"app": {"block": "term"}})
    running_pod = env.prepare("example.com/app:1")
    running = env.start(running_pod)
    prepared = env.prepare("example.com/app:1")
    engine = env.engine()
    assert engine.gc(grace_period=0, expire_prepared=HOUR) == {"marked": [], "removed": []}
    assert engine.gc(grace_period=0, expire_prepared=0) == {"marked": [prepared.uuid], "removed": [prepared.uuid]}
    assert env.pod_dirs() == [f"run/{running_pod.uuid}"]
    assert engine.status(running_pod.uuid)["state"] == "running"
    assert env.calls("gc") == [f"gc {prepared.uuid}"] and env.calls("stop") == []
    assert engine.stop(running_pod.uuid) == "exited"
    assert running.join() == 143


def test_image_gc_keeps_images_of_prepared_and_running_pods(env: Env) -> None:
    prepared_img = env.image("example.com/prepared:1")
    running_img = env.image("example.com/running:1")
    unused_img = env.image("example.com/unused:1")
    env.prepare("example.com/prepared:1")
    env.script({"running": {"block": "term"}})
    running_pod = env.prepare("example.com/running:1")
    running = env.start(running_pod)
    engine = env.engine()
    assert engine.image_gc(grace_period=HOUR)["images"] == []  # the unused one is too recent
    removed = engine.image_gc(grace_period=0)["images"]
    assert removed == [f"{unused_img} example.com/unused:1"]
    assert {r.id for r, _names in engine.images()} == {prepared_img, running_img}
    engine.stop(running_pod.uuid)
    running.join()
    engine.gc(grace_period=0, expire_prepared=0)  # both pods go; then their images are unreferenced
    assert Pod.all(env.config.data_dir) == []
    assert len(engine.image_gc(grace_period=0)["images"]) == 2
    assert engine.images() == []
