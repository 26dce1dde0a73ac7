"""kvmrkt.pods.stopping: the one stop policy (agent STOP, then the hard kill stop_timeout + STOP_MARGIN later, or at
once when no guest answers), on a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmrkt.config import RuntimeConfig, Stage1Config
from kvmrkt.engine import Engine
from kvmrkt.errors import AgentError
from kvmrkt.pods import stopping
from kvmrkt.pods.pod import Pod as RealPod
from kvmrkt.pods.stopping import STOP_MARGIN, StopEscalation, escalate


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_hard_kill_is_due_only_after_the_grace_and_the_margin() -> None:
    clock = Clock()
    policy = StopEscalation(3, clock=clock)
    assert policy.grace == 3 and not policy.started and not policy.kill_due()
    policy.asked()
    assert policy.started and policy.remaining() == 3 + STOP_MARGIN
    clock.now += 3 + STOP_MARGIN
    assert policy.remaining() == 0 and not policy.kill_due()  # a guest that ends right at the deadline is not killed
    assert not policy.outcome.forced
    clock.now += 0.01
    assert policy.kill_due() and policy.outcome.forced
    assert policy.outcome.reason == f"the pod did not stop within {3 + STOP_MARGIN:g}s; its VM was killed"


def test_a_guest_that_never_answers_is_killed_at_once() -> None:
    policy = StopEscalation(10, clock=Clock())
    policy.unanswered("the guest was not ready")
    assert policy.started and policy.kill_due() and policy.remaining() == 0
    assert policy.outcome.reason == "the guest was not ready; its VM was killed"


def test_asking_twice_does_not_restart_the_clock() -> None:
    clock = Clock()
    policy = StopEscalation(0, clock=clock)
    policy.asked()
    clock.now += STOP_MARGIN + 1
    policy.asked()  # a second Ctrl-C
    assert policy.kill_due()


class FakeVM:
    """A fake VM: ends ``ends_after`` seconds after the agent STOP (never: None); records the host's steps."""

    def __init__(self, clock: Clock, *, ends_after: float | None, answers: bool = True) -> None:
        self.clock, self.ends_after, self.answers = clock, ends_after, answers
        self.steps: list[str] = []

    def soft(self) -> None:
        self.steps.append("STOP")
        if not self.answers:
            raise AgentError("the guest agent did not answer")

    def hard(self) -> None:
        self.steps.append("kill")

    def ended(self, timeout: float) -> bool:
        self.steps.append(f"wait {timeout:g}")
        if self.ends_after is not None and self.ends_after <= timeout:
            self.clock.now += self.ends_after
            return True
        self.clock.now += timeout
        return False


@pytest.mark.parametrize("ends_after", [0.5, 7 + STOP_MARGIN])
def test_a_pod_that_stops_in_time_is_not_killed(ends_after: float) -> None:
    clock = Clock()
    pod = FakeVM(clock, ends_after=ends_after)
    outcome = escalate(StopEscalation(7, clock=clock), soft=pod.soft, hard=pod.hard, ended=pod.ended)
    assert pod.steps == ["STOP", f"wait {7 + STOP_MARGIN:g}"] and not outcome.forced


def test_a_pod_that_ignores_the_stop_is_killed_after_the_deadline_and_reported() -> None:
    clock = Clock()
    pod = FakeVM(clock, ends_after=None)
    outcome = escalate(StopEscalation(7, clock=clock), soft=pod.soft, hard=pod.hard, ended=pod.ended)
    assert pod.steps == ["STOP", f"wait {7 + STOP_MARGIN:g}", "kill"]
    assert outcome.forced and f"within {7 + STOP_MARGIN:g}s" in outcome.reason


def test_a_guest_whose_agent_fails_is_killed_without_waiting() -> None:
    clock = Clock()
    pod = FakeVM(clock, ends_after=0.1, answers=False)
    outcome = escalate(StopEscalation(7, clock=clock), soft=pod.soft, hard=pod.hard, ended=pod.ended)
    assert pod.steps == ["STOP", "kill"] and clock.now == 100.0
    assert outcome.forced and "did not accept the stop request" in outcome.reason


class HungBackend:
    """A backend whose guest accepts STOP but never ends; the hard kill ends the pod (releases its lock)."""

    def __init__(self, holder: RealPod) -> None:
        self.holder = holder
        self.calls: list[bool] = []

    def stop(self, pod: RealPod, *, force: bool) -> None:
        self.calls.append(force)
        if force:
            self.holder.unlock()


@pytest.mark.parametrize("force", [False, True])
def test_engine_stop_warns_only_when_it_had_to_kill_the_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           force: bool) -> None:
    monkeypatch.setattr(stopping, "STOP_MARGIN", 0.2)
    pod = RealPod.create(tmp_path / "data")
    for phase in ("prepare", "prepared", "run"):
        pod.move(phase)  # held by this test as `kvmrkt run` would hold it
    warnings: list[str] = []
    engine = Engine(RuntimeConfig(data_dir=tmp_path / "data", stage1=Stage1Config(stop_timeout=0)),
                    warn=warnings.append)
    backend = HungBackend(pod)
    monkeypatch.setattr("kvmrkt.pods.control.backend_for", lambda _config, _pod: backend)
    assert engine.stop(pod.uuid, force=force) == "exited"
    assert backend.calls == ([True] if force else [False, True])
    assert warnings == ([] if force else ["the pod did not stop within 0.2s; its VM was killed"])
