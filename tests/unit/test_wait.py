"""kvmrkt.host.wait: the one polling loop and its deadline."""

from __future__ import annotations

import time

import pytest

from kvmrkt.host import wait
from kvmrkt.host.wait import Deadline, wait_until


def test_early_success_returns_true_without_sleeping(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(wait.time, "sleep", sleeps.append)
    assert wait_until(lambda: True, timeout=10) is True
    assert sleeps == []


def test_success_after_some_rounds_sleeps_the_interval_between_them(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(wait.time, "sleep", sleeps.append)
    answers = iter([False, False, 0, "ready"])
    assert wait_until(lambda: next(answers), timeout=10, interval=0.25) is True
    assert sleeps == [0.25, 0.25, 0.25]


def test_timeout_returns_false_after_a_last_check() -> None:
    calls: list[float] = []

    def never() -> bool:
        calls.append(time.monotonic())
        return False

    start = time.monotonic()
    assert wait_until(never, timeout=0.2, interval=0.05) is False
    elapsed = time.monotonic() - start
    assert 0.2 <= elapsed < 1.0
    assert calls[-1] - start >= 0.2  # the last check came after the deadline
    assert 2 <= len(calls) <= 6


def test_zero_or_negative_timeout_still_checks_once() -> None:
    assert wait_until(lambda: True, timeout=0) is True
    assert wait_until(lambda: False, timeout=-1) is False


def test_no_timeout_waits_until_true(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wait.time, "sleep", lambda _s: None)
    rounds = iter(range(1000))
    assert wait_until(lambda: next(rounds) == 999, timeout=None) is True


def test_predicate_exceptions_pass_through() -> None:
    def broken() -> bool:
        raise OSError("gone")

    with pytest.raises(OSError, match="gone"):
        wait_until(broken, timeout=5)


def test_deadline() -> None:
    never = Deadline(None)
    assert not never.expired() and never.remaining() == float("inf")
    past = Deadline(-1)
    assert past.expired() and past.remaining() == 0.0
    soon = Deadline(30)
    assert not soon.expired() and 29 < soon.remaining() <= 30
