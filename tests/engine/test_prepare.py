"""Engine tests on the fake stage1: prepare leaves a whole pod or nothing, and run-prepared judges trust again."""

from __future__ import annotations

import json

import pytest

from kvmrkt.errors import ImageNotFoundError, PolicyDeniedError
from kvmrkt.pods.pod import Pod
from tests.engine.conftest import ACCEPT, REJECT, Env


def _jail_leases(env: Env) -> set[str]:
    """The pods holding a jail uid (keys starting with @ are the allocator's own bookkeeping)."""
    path = env.config.data_dir / "jail" / "uids.json"
    return {k for k in (json.loads(path.read_text()) if path.exists() else {}) if not k.startswith("@")}


def test_prepare_of_an_unknown_image_leaves_nothing(env: Env) -> None:
    env.image("example.com/good:1")
    with pytest.raises(ImageNotFoundError):
        env.prepare("example.com/good:1", "example.com/nosuch:1")
    assert env.pod_dirs() == []
    assert env.engine().list_pods() == []


def test_prepare_refused_by_the_judge_midway_leaves_nothing(env: Env) -> None:
    # The manifest is built, the SELinux pair and jail uid are leased; then the trust judge refuses app 2.
    env.image("example.com/good:1")
    env.image("example.com/bad:1")
    env.policy({**ACCEPT, "transports": {"oci": {"example.com/bad": [{"type": "reject"}]}}})
    with pytest.raises(PolicyDeniedError):
        env.prepare("example.com/good:1", "example.com/bad:1")
    assert env.pod_dirs() == []
    assert env.engine().list_pods() == []
    assert _jail_leases(env) == set()  # the uid leased for the refused pod was given back
    assert env.engine().gc(grace_period=0, expire_prepared=0) == {"marked": [], "removed": []}


def test_run_prepared_judges_trust_again_and_never_reaches_the_backend(env: Env) -> None:
    env.image("example.com/app:1")
    pod = env.prepare("example.com/app:1")
    env.policy(REJECT)
    with pytest.raises(PolicyDeniedError):
        env.start(pod).join()
    assert env.calls("run") == []
    assert Pod.find(env.config.data_dir, pod.uuid).state() == "prepared"  # refused, not lost
    env.policy(ACCEPT)
    assert env.start(pod).join() == 0
    assert env.calls("run") == [f"run {pod.uuid}"]
