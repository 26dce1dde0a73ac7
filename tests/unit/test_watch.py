"""kvmrkt.host.watch.Waker: a supervision loop wakes when its status file is written or its child ends, not
after a fixed sleep; and it degrades to the old polling when there is nothing it can watch."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

from kvmrkt.host.watch import Waker


def _timed(waker: Waker, timeout: float = 5.0, unwatched: float = 5.0) -> float:
    begin = time.monotonic()
    waker.wait(timeout, unwatched=unwatched)
    return time.monotonic() - begin


def test_a_write_to_the_file_wakes_it(tmp_path: Path) -> None:
    status = tmp_path / "guest-status"
    status.touch()
    with Waker(status, None) as waker:
        threading.Timer(0.2, lambda: status.open("a").write("READY\n")).start()
        assert 0.1 < _timed(waker) < 2.5
        assert _timed(waker, timeout=0.3) < 1.0  # drained: the next wait blocks until the next write (or timeout)


def test_the_childs_end_wakes_it(tmp_path: Path) -> None:
    (tmp_path / "s").touch()
    child = subprocess.Popen(["sleep", "0.3"])
    try:
        with Waker(tmp_path / "s", child.pid) as waker:
            assert _timed(waker) < 2.5
            assert child.poll() == 0 or child.wait(1) == 0
    finally:
        child.kill()
        child.wait()


def test_without_anything_to_watch_it_sleeps_the_polling_interval(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    with Waker(tmp_path / "missing", None) as waker:
        assert _timed(waker, unwatched=0.05) < 1.0
    with Waker(tmp_path / "missing", 2**22 + 12345) as waker:  # no such process: not watched, no error
        assert _timed(waker, unwatched=0.05) < 1.0


def test_a_timeout_bounds_the_wait(tmp_path: Path) -> None:
    (tmp_path / "s").touch()
    with Waker(tmp_path / "s", None) as waker:
        assert 0.15 < _timed(waker, timeout=0.2) < 1.5
