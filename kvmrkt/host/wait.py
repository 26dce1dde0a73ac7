"""Waiting: the one polling loop (``wait_until``) and the deadline it runs against (``Deadline``).

Role: every "poll until X or give up after T seconds" in kvmrkt, stage1_kvm and measure goes through here, so
the loop's shape (check first, then the deadline, then sleep) is written once. Trust boundary: none; a
predicate's exceptions pass through untouched and a timeout is reported as False, the caller decides what it
means (most raise their own ``KvmrktError``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable


class Deadline:
    """A point in monotonic time ``timeout`` seconds from now (``None``: never)."""

    def __init__(self, timeout: float | None) -> None:
        self._end = math.inf if timeout is None else time.monotonic() + timeout

    def expired(self) -> bool:
        """True once the deadline has passed."""
        return time.monotonic() > self._end

    def remaining(self) -> float:
        """Seconds left (0 once expired; ``inf`` for a deadline that never comes)."""
        return max(0.0, self._end - time.monotonic())


def wait_until(predicate: Callable[[], object], *, timeout: float | None, interval: float = 0.05) -> bool:
    """Call ``predicate`` every ``interval`` seconds until it returns something true (then True) or ``timeout``
    seconds have passed (then False; ``None`` waits forever). The predicate is always called at least once,
    and once more after the deadline; its exceptions propagate."""
    deadline = Deadline(timeout)
    while True:
        if predicate():
            return True
        if deadline.expired():
            return False
        time.sleep(interval)
