"""The host side of what the guest writes: its console and each app's stdout/stderr, bounded on disk.

Role: QEMU serves the console and the output ports as unix sockets (no file of its own); kvmrkt, which
supervises the pod for its whole life, connects before the guest runs and an ``OutputPump`` thread reads them
all, appending each stream to a ``BoundedLog`` in the pod directory. A log never exceeds ``[pods]
max_log_bytes``: when it would, it is compacted in place to its latest half under a one-line marker that counts
the bytes dropped so far, so the host survives a guest writing forever and the log keeps the most recent
output. The pump never waits for a terminal: ``Follower`` threads copy each log to ``kvmrkt run``'s
stdout/stderr at their own pace (one that falls behind by more than the log keeps skips, with a marker). While
reading the console, the pump scans every line for the guest kernel's dm-verity corruption reports
(``IntegrityScan``): the host sees each byte the guest kernel prints, so flooding the console cannot push a
report out of sight, and nothing the guest writes elsewhere can retract one.

Trust boundary: every byte read here is the untrusted guest's. It is stored and copied, never parsed beyond
the line scan; lines quoted in messages are shortened and made printable.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from kvmrkt.config import MIN_LOG_BYTES
from kvmrkt.errors import VMLaunchError
from stage1_kvm.agent import printable, socket_path

CHUNK = 1 << 16  # read from a socket at once
COPY_CHUNK = 1 << 20
ALIGN_WITHIN = 4096  # a compacted log starts at a line boundary when one is this close to the cut
MAX_REPORTS = 5  # integrity report lines kept (the count is exact)


def marker(dropped: int, limit: int) -> bytes:
    """The first line of a compacted log."""
    return (f"[kvmrkt: {dropped} earlier bytes of this log were dropped ([pods] max_log_bytes = {limit}); "
            "the rest is the latest output]\n").encode()


class BoundedLog:
    """A log file of at most ``limit`` bytes holding the latest output of one stream (thread-safe: one writer,
    any number of ``read`` callers). Positions are offsets in the whole stream, dropped bytes included."""

    def __init__(self, path: Path, limit: int) -> None:
        assert limit >= MIN_LOG_BYTES >= 4 * CHUNK  # the config checks it
        self.path, self.limit = path, limit
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.cond = threading.Condition()
        self.total = 0  # bytes of the stream so far
        self.dropped = 0  # bytes of it no longer in the file
        self.head = 0  # length of the marker line at the start of the file
        self.closed = False
        self.error: str | None = None

    @property
    def size(self) -> int:
        return self.head + self.total - self.dropped

    def write(self, data: bytes) -> None:
        """Append ``data`` (at most ``CHUNK`` bytes), compacting first if the file would exceed the limit. A
        failing disk loses the log, never the stream (the pump keeps draining the guest)."""
        assert len(data) <= CHUNK
        with self.cond:
            if self.error is None:
                try:
                    if self.size + len(data) > self.limit:
                        self._compact(keep=self.limit // 2 - len(data))
                    os.pwrite(self.fd, data, self.size)
                except OSError as exc:
                    self.error = f"{self.path.name}: {exc.strerror or exc}"
            self.total += len(data)
            if self.error is not None:
                self.dropped = self.total
            self.cond.notify_all()

    def _compact(self, keep: int) -> None:
        """Keep the last ``keep`` bytes of the stream (from the next line start, if one is near) under a new
        marker line: copied forwards in place, so the file is never larger than it was."""
        body = self.total - self.dropped
        cut = body - keep
        start = self.head + cut
        nl = os.pread(self.fd, ALIGN_WITHIN, start).find(b"\n")
        if nl >= 0:
            start, cut = start + nl + 1, cut + nl + 1
        dropped = self.dropped + cut
        head = marker(dropped, self.limit)
        length = self.head + body - start
        dst = len(head)
        os.pwrite(self.fd, head, 0)
        done = 0
        while done < length:  # dst < start: each chunk is read before anything at or after it is written
            data = os.pread(self.fd, min(COPY_CHUNK, length - done), start + done)
            os.pwrite(self.fd, data, dst + done)
            done += len(data)
        os.ftruncate(self.fd, dst + length)
        self.dropped, self.head = dropped, len(head)

    def read(self, pos: int, size: int = COPY_CHUNK) -> tuple[int, bytes]:
        """Up to ``size`` bytes of the stream from ``pos``, and the position after them; a reader that fell
        behind what the file keeps gets a line saying how much it skipped, then the oldest kept bytes. Call with
        ``cond`` held."""
        if pos < self.dropped:
            return self.dropped, f"\n[kvmrkt: {self.dropped - pos} bytes of output skipped]\n".encode()
        n = min(size, self.total - pos)
        if n <= 0 or self.error is not None:
            return pos, b""
        data = os.pread(self.fd, n, self.head + pos - self.dropped)
        return pos + len(data), data

    def end(self) -> None:
        """No more writes: wake the followers so they finish."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class IntegrityScan:
    """Finds the guest kernel's dm-verity corruption reports in console output given in arbitrary chunks."""

    def __init__(self) -> None:
        self.partial = b""
        self.reports: list[str] = []
        self.count = 0

    def feed(self, data: bytes) -> bool:
        """Scan ``data``; True when a report line was kept (one of the first ``MAX_REPORTS``)."""
        text = self.partial + data
        lines = text.split(b"\n")
        self.partial = lines.pop()[-ALIGN_WITHIN:]
        kept = False
        for line in lines:
            if b"verity" in line and b"corrupted" in line:
                self.count += 1
                if len(self.reports) < MAX_REPORTS:
                    self.reports.append(printable(line.decode("utf-8", "replace").strip())[:300])
                    kept = True
        return kept


@dataclass
class Stream:
    """One output socket of the VM, the log it is kept in and where ``kvmrkt run`` copies it (None: nowhere)."""

    socket_name: str
    log: str
    out: IO[bytes] | None
    console: bool = False
    clean: Callable[[bytes], bytes] | None = None  # applied to the copy for ``out``, never to the log
    sock: socket.socket | None = field(default=None, repr=False)
    bounded: BoundedLog | None = field(default=None, repr=False)


class OutputPump:
    """Reads every output socket of a pod's VM into its bounded log, from before the guest runs until it ends."""

    def __init__(self, pod_dir: Path, streams: list[Stream], *, limit: int,
                 on_integrity: Callable[[list[str], int], None]) -> None:
        self.pod_dir, self.streams, self.limit = pod_dir, streams, limit
        self.on_integrity = on_integrity
        self.scan = IntegrityScan()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._finished = False

    def connect(self) -> None:
        """Open the logs and connect to the sockets (QEMU's listening end exists; the guest has not run yet, so
        nothing it writes is missed), then start reading and following.

        Raises:
            VMLaunchError: a log or socket cannot be opened.
        """
        try:
            for s in self.streams:
                s.bounded = BoundedLog(self.pod_dir / s.log, self.limit)
                s.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                with socket_path(self.pod_dir, s.socket_name) as path:
                    s.sock.connect(path)
        except OSError as exc:
            raise VMLaunchError(f"cannot connect to the VM's output {s.socket_name}: {exc}") from exc
        self._threads = [threading.Thread(target=self._pump, name="kvmrkt-output", daemon=True)]
        self._threads += [threading.Thread(target=_follow, args=(s.bounded, s.out, s.clean), daemon=True)
                          for s in self.streams if s.out is not None]
        for t in self._threads:
            t.start()

    def _pump(self) -> None:
        try:
            with selectors.DefaultSelector() as sel:
                for s in self.streams:
                    assert s.sock is not None
                    sel.register(s.sock, selectors.EVENT_READ, s)
                while sel.get_map() and not self._stop.is_set():
                    for key, _ in sel.select(timeout=0.1):
                        self._read(sel, key.data)
            if self.scan.feed(b"\n"):  # a last line without its newline
                self.on_integrity(list(self.scan.reports), self.scan.count)
        finally:
            for s in self.streams:
                if s.bounded is not None:
                    s.bounded.end()

    def _read(self, sel: selectors.BaseSelector, s: Stream) -> None:
        assert s.sock is not None and s.bounded is not None
        try:
            data = s.sock.recv(CHUNK)
        except OSError:
            data = b""
        if not data:
            sel.unregister(s.sock)
            return
        s.bounded.write(data)
        if s.console and self.scan.feed(data):
            self.on_integrity(list(self.scan.reports), self.scan.count)

    def finish(self, timeout: float = 10.0) -> list[str]:
        """After the VM ended: read what is left (the sockets reach EOF once QEMU is gone), let the followers
        copy the rest, close everything, and return the log write errors (if any). Idempotent."""
        if self._finished:
            return []
        self._finished = True
        if self._threads:
            self._threads[0].join(timeout)
            self._stop.set()
            for t in self._threads:
                t.join()
        errors = []
        for s in self.streams:
            if s.sock is not None:
                s.sock.close()
            if s.bounded is not None:
                errors += [s.bounded.error] if s.bounded.error else []
                with contextlib.suppress(OSError):
                    os.close(s.bounded.fd)
        return errors

    @property
    def integrity_failures(self) -> tuple[str, ...]:
        """The dm-verity corruption reports seen on the console (the first few)."""
        return tuple(self.scan.reports)


def _follow(log: BoundedLog, out: IO[bytes], clean: Callable[[bytes], bytes] | None) -> None:
    """Copy a log to ``out`` (through ``clean``) as it grows, until the log is closed and copied (or ``out``
    went away)."""
    pos = 0
    while True:
        with log.cond:
            while pos >= log.total and not log.closed:
                log.cond.wait()
            pos, data = log.read(pos)
            if not data and log.closed:
                return
        try:
            out.write(clean(data) if clean else data)
            out.flush()
        except (BrokenPipeError, ValueError):
            return
