"""stage1_kvm.monitor against a hostile QEMU (one that runs a guest's code: TCG is no boundary): a real Unix
socket whose peer sends what it likes. Each refusal is a ``Stage1Error``, never a hang or a traceback."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmrkt.errors import Stage1Error
from stage1_kvm import monitor
from stage1_kvm.vmspec import QMP_SOCKET

GREETING = b'{"QMP": {"version": {}, "capabilities": []}}\n'
OK = b'{"return": {}}\n'


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[tuple[Path, list[bytes | None]]]:
    """A fake monitor on ``tmp_path/qmp.sock``: after the greeting and the capabilities answer, each command it
    receives gets the next scripted reply (appended by the test; None: no answer for 3 s)."""
    script: list[bytes | None] = []
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp_path / QMP_SOCKET))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(GREETING)
            conn.recv(65536)
            conn.sendall(OK)
            for reply in script:
                if not conn.recv(65536):
                    return
                if reply is None:
                    time.sleep(3)
                    return
                conn.sendall(reply)
            time.sleep(0.5)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield tmp_path, script
    srv.close()


def test_a_well_behaved_reply_and_events_skipped(qemu: tuple[Path, list[bytes | None]]) -> None:
    pod_dir, script = qemu
    script += [b'{"event": "STOP"}\n{"return": {"status": "paused"}}\n']
    with monitor.connect(pod_dir, time.monotonic() + 5) as q:
        assert q.query("query-status") == {"status": "paused"}


@pytest.mark.parametrize(("reply", "message"), [
    (b'{"return": ["not", "an", "object"]}\n', "query-status: the reply is not an object"),
    (b"not json\n", "not JSON"),
    (b"[1, 2]\n" + b"x" * (monitor.MAX_REPLY + 70000), "a line over"),  # never ends its line
    (b"", "monitor (closed|failed)"),  # hangs up (a reset, if our command is still unread)
])
def test_hostile_replies_are_refused(qemu: tuple[Path, list[bytes | None]], reply: bytes, message: str) -> None:
    pod_dir, script = qemu
    script += [reply] if reply else []
    with pytest.raises(Stage1Error, match=message), monitor.connect(pod_dir, time.monotonic() + 5) as q:
        q.query("query-status")


def test_error_text_is_made_printable(qemu: tuple[Path, list[bytes | None]]) -> None:
    pod_dir, script = qemu
    script += [json.dumps({"error": {"class": "GenericError", "desc": "\x1b[2J\x1b]0;owned\x07"}}).encode() + b"\n"]
    with pytest.raises(Stage1Error) as info, monitor.connect(pod_dir, time.monotonic() + 5) as q:
        q.cmd("cont")
    assert "\x1b" not in info.value.message and "\\x1b[2J" in info.value.message


def test_a_silent_monitor_times_out(qemu: tuple[Path, list[bytes | None]]) -> None:
    pod_dir, script = qemu
    script.append(None)
    began = time.monotonic()
    with pytest.raises(Stage1Error, match="timed out"), monitor.connect(pod_dir, time.monotonic() + 1) as q:
        q.cmd("cont")
    assert time.monotonic() - began < 2.5


def test_connecting_stops_once_qemu_is_gone(tmp_path: Path) -> None:
    """QEMU that exits before its monitor is up (a bad option) ends the wait at once, not at the deadline."""
    began = time.monotonic()
    with pytest.raises(Stage1Error, match="QEMU exited"), monitor.connect(tmp_path, time.monotonic() + 30,
                                                                          alive=lambda: False):
        pass
    assert time.monotonic() - began < 5
    with pytest.raises(Stage1Error, match="did not answer"), monitor.connect(tmp_path, time.monotonic() + 0.1,
                                                                             alive=lambda: True):
        pass
