"""Engine tests on the fake stage1: graceful stop, escalation to a forced stop, a backend that fails in run,
and the contract rules the fake enforces like the qemu backend (lock, network mode, before_boot)."""

from __future__ import annotations

import io

import pytest

from kvmrkt.errors import PodStateError, VMLaunchError
from kvmrkt.pods import stopping
from kvmrkt.pods.pod import Pod
from kvmrkt.stage1 import JailSpec, RunOptions, load_backend
from tests.engine.conftest import Env, Running


def _started(env: Env, behaviour: dict[str, str]) -> tuple[Pod, Running]:
    env.image("example.com/app:1")
    env.script({"app": behaviour})
    pod = env.prepare("example.com/app:1")
    return pod, env.start(pod)


def test_a_soft_stop_the_apps_honour_ends_the_pod_without_force(env: Env) -> None:
    pod, running = _started(env, {"block": "term"})
    assert env.engine().status(pod.uuid)["state"] == "running"
    assert env.engine().stop(pod.uuid) == "exited"
    assert running.join() == 143
    assert env.calls("stop") == [f"stop {pod.uuid} soft"]
    assert env.engine().status(pod.uuid)["apps"][0]["exit_code"] == 143


def test_an_app_that_ignores_sigterm_is_killed_by_the_guest_after_the_stop_timeout(env: Env) -> None:
    pod, running = _started(env, {"block": "ignore-term"})
    assert env.engine().stop(pod.uuid) == "exited"
    assert running.join() == 137
    assert env.calls("stop") == [f"stop {pod.uuid} soft"]


def test_a_failed_soft_stop_escalates_to_force(env: Env) -> None:
    pod, running = _started(env, {"block": "agent-down"})
    assert env.engine().stop(pod.uuid) == "exited"
    assert running.join() == 137
    assert env.calls("stop") == [f"stop {pod.uuid} soft", f"stop {pod.uuid} force"]


def test_a_soft_stop_the_guest_ignores_escalates_to_force(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stopping, "STOP_MARGIN", 0.3)  # the host's wait after the stop timeout (0 here)
    pod, running = _started(env, {"block": "hung"})
    assert env.engine().stop(pod.uuid) == "exited"
    assert running.join() == 137
    assert env.calls("stop") == [f"stop {pod.uuid} soft", f"stop {pod.uuid} force"]
    assert env.warnings[-1] == "the pod did not stop within 0.3s; its VM was killed"


def test_a_backend_error_in_run_leaves_the_pod_exited_and_gc_cleans_it(env: Env) -> None:
    env.image("example.com/app:1")
    env.script({}, run_error="guest kernel panic")
    pod = env.prepare("example.com/app:1")
    with pytest.raises(VMLaunchError, match="guest kernel panic"):
        env.start(pod).join()
    assert env.calls("booted") == [f"booted {pod.uuid}"]
    engine = env.engine()
    status = engine.status(pod.uuid)
    assert status["state"] == "exited"
    assert status["measured"] is False  # before_boot ran the engine's measured-launch step (unmeasured: tpm)
    assert engine.gc(grace_period=0, expire_prepared=0) == {"marked": [pod.uuid], "removed": [pod.uuid]}
    assert env.pod_dirs() == [] and env.calls("gc") == [f"gc {pod.uuid}"]


def test_the_fake_refuses_a_pod_its_caller_has_not_locked(env: Env) -> None:
    env.image("example.com/app:1")
    pod = env.prepare("example.com/app:1")
    engine = env.engine()
    manifest = engine.pod_manifest(pod)
    rootfs, _verity = engine.app_disks(manifest)
    backend = load_backend("fake", env.config)
    opts = RunOptions(rootfs=rootfs, jail=JailSpec(uid=65534, gid=65534, memory_mib=256, vcpus=1,
                                                   memory_limit_mib=512, pids_max=64))
    with pod.locked():
        pod.move("run")  # in the run phase, but nobody holds its lock any more
    with pytest.raises(PodStateError, match="locked"):
        backend.run(pod, manifest, opts, stdout=io.BytesIO(), stderr=io.BytesIO())
    assert env.calls("booted") == []
