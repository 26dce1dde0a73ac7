"""QMP, the QEMU monitor, as kvmrkt speaks it: one small synchronous client on the pod's ``qmp.sock``.

Role: ``connect(pod_dir, deadline)`` opens the monitor (QEMU may still be starting: it retries until the
deadline, or until ``alive`` says QEMU is gone), negotiates capabilities, and yields a ``Monitor`` whose ``cmd``
runs one command (optionally passing a descriptor with it, for ``getfd``) and whose ``until`` polls a condition.
Used to resume a VM that was started paused, to restore and build VM templates, and to quit a VM. Trust
boundary: QEMU runs the untrusted guest, so its replies are bounded JSON lines read only as data, a result is
checked for its type (``query``), error text is made printable; asynchronous events are skipped.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kvmrkt.errors import Stage1Error
from stage1_kvm import agent
from stage1_kvm.vmspec import QMP_SOCKET

MAX_REPLY = 1 << 20  # no answer kvmrkt asks for is near this


class Monitor:
    """A QMP connection, past its greeting and capabilities negotiation."""

    def __init__(self, path: str, deadline: float, alive: Callable[[], bool] | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        while True:
            try:
                self.sock.connect(path)
                break
            except OSError as exc:
                gone = alive is not None and not alive()
                if gone or time.monotonic() > deadline:
                    self.sock.close()
                    why = "QEMU exited" if gone else "QEMU's monitor did not answer"
                    raise Stage1Error(f"{why}: {exc}") from exc
                time.sleep(0.002)
        self.sock.settimeout(max(1.0, deadline - time.monotonic()))
        self.buf = b""
        self._reply()  # the greeting
        self.cmd("qmp_capabilities")

    def _reply(self) -> dict[str, Any]:
        while True:
            while b"\n" not in self.buf:
                if len(self.buf) > MAX_REPLY:
                    raise Stage1Error(f"QEMU's monitor sent a line over {MAX_REPLY} bytes")
                try:
                    chunk = self.sock.recv(65536)
                except OSError as exc:
                    raise Stage1Error(f"QEMU's monitor failed: {exc}") from exc
                if not chunk:
                    raise Stage1Error("QEMU closed its monitor (see qemu.log)")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError as exc:
                raise Stage1Error(f"QEMU's monitor sent something that is not JSON: {exc}") from exc
            if isinstance(msg, dict) and "event" not in msg:
                return msg

    def cmd(self, name: str, args: dict[str, Any] | None = None, *, fd: int | None = None) -> Any:
        """Run ``name`` and return its result (raises ``Stage1Error`` if QEMU refused it)."""
        data = json.dumps({"execute": name, **({"arguments": args} if args else {})}).encode()
        try:
            if fd is None:
                self.sock.sendall(data)
            else:
                socket.send_fds(self.sock, [data], [fd])
        except OSError as exc:
            raise Stage1Error(f"QMP {name}: {exc}") from exc
        reply = self._reply()
        if "error" in reply:
            error = reply["error"]
            desc = str(error.get("desc", error) if isinstance(error, dict) else error)[:500]
            raise Stage1Error(f"QMP {name}: {agent.printable(desc)}")  # shown on a terminal
        return reply.get("return")

    def query(self, name: str) -> dict[str, Any]:
        """Run a ``query-*`` command whose result is an object (raises ``Stage1Error`` for anything else)."""
        result = self.cmd(name)
        if not isinstance(result, dict):
            raise Stage1Error(f"QMP {name}: the reply is not an object")
        return result

    def until(self, done: Callable[[], bool], deadline: float, what: str) -> None:
        """Poll ``done`` (which asks this monitor) every 2 ms until it holds; raises ``Stage1Error`` at the
        deadline."""
        while not done():
            if time.monotonic() > deadline:
                raise Stage1Error(f"timed out {what}")
            time.sleep(0.002)

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def connect(pod_dir: Path, deadline: float, alive: Callable[[], bool] | None = None) -> Iterator[Monitor]:
    """The monitor of the QEMU serving ``pod_dir/qmp.sock`` (raises ``Stage1Error`` if it does not answer by
    ``deadline``, a ``time.monotonic()`` value, or, while it cannot be reached, ``alive`` says QEMU exited)."""
    with agent.socket_path(pod_dir, QMP_SOCKET) as path:
        q = Monitor(path, deadline, alive)
    try:
        yield q
    finally:
        q.close()
