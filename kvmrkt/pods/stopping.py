"""The one stop policy for a running pod: ask the guest, then kill the VM if it has not ended in time.

Role: pure decision logic, shared by ``kvmrkt stop`` (``Engine.stop``) and the supervise loop of ``kvmrkt run``
(Ctrl-C/SIGTERM). The steps are: agent ``STOP <stop_timeout>`` (the guest SIGTERMs the apps and SIGKILLs them
itself after ``stop_timeout``), then, when the VM has still not ended ``STOP_MARGIN`` seconds after that, or at
once when there is no guest to ask, the hard kill (the hypervisor's: QMP ``quit`` then SIGKILL of the verified
pid for QEMU, ``destroy`` for libvirt). The clock is injected, so the policy is tested without processes or
sleeps. Trust boundary: none of its own; the margin is what the host grants a guest that never answers, so a
hostile guest can delay a stop by at most ``stop_timeout + STOP_MARGIN`` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmrkt.errors import KvmrktError

STOP_MARGIN = 10.0
"""Seconds past ``stop_timeout`` the host waits for the VM to end (the guest's own SIGKILL, its reports and its
shutdown) before it kills the VM."""


@dataclass(frozen=True, slots=True)
class StopOutcome:
    """How a stop ended: ``forced`` when the VM had to be killed although a graceful stop was asked for (cf.
    QEMU's ``AbnormalShutdown``); ``reason`` says why, for a warning. A ``--force`` stop is not forced."""

    forced: bool = False
    reason: str = ""


class StopEscalation:
    """One graceful stop of one pod, on an injectable monotonic clock.

    Use: ``asked()`` once the guest accepted the agent STOP (the clock starts), ``unanswered()`` when there is
    no guest to ask (the hard kill is due at once); ``kill_due()`` says when to kill the VM, ``remaining()`` how
    long to wait for it to end before that.
    """

    def __init__(self, stop_timeout: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.stop_timeout = stop_timeout
        self._clock = clock
        self._asked_at: float | None = None
        self._outcome: StopOutcome | None = None

    @property
    def grace(self) -> float:
        """The grace period sent with the agent STOP: the guest SIGKILLs the apps after it."""
        return self.stop_timeout

    @property
    def deadline(self) -> float:
        """Seconds after the agent STOP at which the host kills the VM."""
        return self.stop_timeout + STOP_MARGIN

    @property
    def started(self) -> bool:
        """The stop has begun (the guest was asked, or could not be)."""
        return self._asked_at is not None or self._outcome is not None

    def asked(self) -> None:
        """The guest accepted the agent STOP."""
        if self._asked_at is None:
            self._asked_at = self._clock()

    def unanswered(self, why: str = "the pod's guest did not accept the stop request") -> None:
        """There is no guest to ask (not ready, or its agent failed): kill the VM now."""
        self._outcome = self._outcome or StopOutcome(forced=True, reason=f"{why}; its VM was killed")

    def remaining(self) -> float:
        """Seconds left before the hard kill (0 once it is due; the full deadline before the guest was asked)."""
        if self._outcome is not None:
            return 0.0
        if self._asked_at is None:
            return self.deadline
        return max(0.0, self._asked_at + self.deadline - self._clock())

    def kill_due(self) -> bool:
        """Whether the VM must be killed now (from then on the outcome is forced)."""
        if self._outcome is None and self._asked_at is not None and self._clock() - self._asked_at > self.deadline:
            self.expired()
        return self._outcome is not None

    def expired(self) -> None:
        """The VM did not end within the deadline after the agent STOP: kill it."""
        self._outcome = self._outcome or StopOutcome(
            forced=True, reason=f"the pod did not stop within {self.deadline:g}s; its VM was killed")

    @property
    def outcome(self) -> StopOutcome:
        """The outcome so far: forced once the hard kill was due."""
        return self._outcome or StopOutcome()


def escalate(policy: StopEscalation, *, soft: Callable[[], None], hard: Callable[[], None],
             ended: Callable[[float], bool]) -> StopOutcome:
    """Run ``policy`` to its end, blocking: ``soft()`` sends the agent STOP (a ``KvmrktError`` means no guest
    answered), ``ended(seconds)`` waits up to that long for the VM to end (True if it did); if it did not, or the
    guest could not be asked, ``hard()`` kills the VM."""
    try:
        soft()
        policy.asked()
    except KvmrktError:
        policy.unanswered()
    if not policy.kill_due():
        if ended(policy.remaining()):
            return policy.outcome
        policy.expired()
    hard()
    return policy.outcome
