"""Waiting for a file to be written or a child process to end, without polling: inotify and a pidfd, through
poll(2).

Role: ``Waker(path, pid)``: ``wait(timeout)`` returns as soon as the file at ``path`` was written to, the process
``pid`` ended, or ``timeout`` seconds passed, whichever comes first. A return only says that something may have
changed: callers check their state again after every one. Where inotify or a pidfd cannot be had (no such
process, an old kernel, no ``pid`` given), that source is not watched; with nothing watched, ``wait`` sleeps the
caller's polling interval: the caller's loop polls as it did before. Trust boundary: none of its own; it
reads only inotify events (discarded) from its own descriptors and never the watched file.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import threading
import time
from pathlib import Path
from types import TracebackType

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC


def _inotify(path: Path) -> int | None:
    """An inotify descriptor watching ``path`` for writes, or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    if libc.inotify_add_watch(fd, os.fsencode(path), IN_MODIFY | IN_CLOSE_WRITE) < 0:
        os.close(fd)
        return None
    return fd


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


class Waker:
    """Wakes a supervision loop when its status file is written or its VMM process ends (see the module doc)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self._fds: list[int] = []
        self._poll = select.poll()
        watch = _inotify(path)
        if watch is not None:
            self._inotify = watch
            self._fds.append(watch)
            self._poll.register(watch, select.POLLIN)
        else:
            self._inotify = -1
        if pid is not None:
            with contextlib.suppress(OSError, AttributeError):  # gone already, or no pidfd on this kernel
                pidfd = os.pidfd_open(pid)
                self._fds.append(pidfd)
                self._poll.register(pidfd, select.POLLIN)

    def wait(self, timeout: float, *, unwatched: float) -> None:
        """Block until a watched event or ``timeout`` seconds; with nothing watched, sleep ``unwatched`` seconds
        (the caller's polling interval). Nothing is reported."""
        if not self._fds:
            time.sleep(unwatched)
            return
        if self._poll.poll(max(0, int(timeout * 1000))) and self._inotify >= 0:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._inotify, 4096):  # drain: the next wait blocks until the next write
                    pass

    def close(self) -> None:
        """Close the descriptors; the inotify one in the background: the kernel waits for a grace period when an
        inotify instance goes (10-20 ms measured here), which the caller's next steps need not wait for."""
        for fd in self._fds:
            if fd == self._inotify:
                threading.Thread(target=_close, args=(fd,), name="inotify-close", daemon=True).start()
            else:
                _close(fd)
        self._fds = []

    def __enter__(self) -> Waker:
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None) -> None:
        self.close()
