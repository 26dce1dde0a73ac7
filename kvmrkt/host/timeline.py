"""Launch timeline: monotonic stamps at the stages of a command, for ``bench/launch_profile.py``.

Role: ``stamp("stage")`` writes one line ``<CLOCK_MONOTONIC ns> <CPU ns> <stage>`` (the CPU time is this process's
own, all threads, without its children's) to the file descriptor named by the
environment variable ``KVMRKT_TIMELINE_FD``, and does nothing at all when it is unset (the normal case). The
profiler passes the write end of a pipe; it reads the same clock, so its own stamps (process spawned, process
ended) line up with these. Trust boundary: the variable comes from whoever started this process (root's own
environment); only an already open descriptor is written, no path is ever opened, and a descriptor that is
not open or not writable turns stamping off instead of failing the command. Stage names are constants from
the code, never data.
"""

from __future__ import annotations

import os
import time

_ENV = "KVMRKT_TIMELINE_FD"


def _fd() -> int | None:
    value = os.environ.get(_ENV, "")
    if not value.isdigit() or len(value) > 6:
        return None
    return int(value)


_FD = _fd()


def stamp(stage: str) -> None:
    """Record that ``stage`` was reached now (a no-op unless ``KVMRKT_TIMELINE_FD`` is set)."""
    global _FD
    if _FD is None:
        return
    try:
        os.write(_FD, f"{time.monotonic_ns()} {time.process_time_ns()} {stage}\n".encode())
    except OSError:
        _FD = None
