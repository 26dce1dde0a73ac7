"""The host side of the guest's output: bounded logs, the terminal copy, the dm-verity report scan."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest

from kvmrkt.config import MIN_LOG_BYTES
from kvmrkt.errors import VMLaunchError
from stage1_kvm.output import CHUNK, BoundedLog, IntegrityScan, OutputPump, Stream

LIMIT = MIN_LOG_BYTES
VERITY = b"[    2.30] device-mapper: verity: 254:0: data block 490 is corrupted\r\n"


def _feed(log: BoundedLog, data: bytes) -> None:
    for i in range(0, len(data), CHUNK):
        log.write(data[i:i + CHUNK])


def test_a_log_never_exceeds_its_limit_and_keeps_the_latest_output_under_a_marker(tmp_path: Path) -> None:
    log = BoundedLog(tmp_path / "out", LIMIT)
    stream = b"".join(b"line %07d\n" % i for i in range(200_000))  # 2.4 MB, ~9x the limit
    for i in range(0, len(stream), 777):  # odd chunk sizes
        log.write(stream[i:i + 777])
        assert (tmp_path / "out").stat().st_size <= LIMIT
    data = (tmp_path / "out").read_bytes()
    head, kept = data.split(b"\n", 1)
    assert head.startswith(b"[kvmrkt: %d earlier bytes of this log were dropped" % log.dropped)
    assert stream.endswith(kept) and log.dropped + len(kept) == len(stream)
    assert kept.startswith(b"line ")  # cut at a line boundary
    assert len(kept) > LIMIT // 4


def test_a_reader_that_fell_behind_is_told_what_it_skipped(tmp_path: Path) -> None:
    log = BoundedLog(tmp_path / "out", LIMIT)
    _feed(log, b"a" * 100)
    with log.cond:
        assert log.read(0) == (100, b"a" * 100)
    _feed(log, b"b" * (3 * LIMIT))
    with log.cond:
        pos, note = log.read(100)
        assert pos == log.dropped and note.startswith(b"\n[kvmrkt: ") and b"bytes of output skipped" in note
        pos, data = log.read(pos)
    assert data and set(data) == {ord("b")}


def test_a_failing_disk_loses_the_log_not_the_stream(tmp_path: Path) -> None:
    log = BoundedLog(tmp_path / "out", LIMIT)
    log.fd, fd = -1, log.fd  # writes fail with EBADF
    log.write(b"x" * 10)
    log.write(b"y" * 10)
    assert log.error and log.total == 20
    log.fd = fd


def test_integrity_reports_are_found_across_chunks() -> None:
    scan = IntegrityScan()
    text = b"boot\n" + VERITY + b"noise\n" + VERITY.replace(b"490", b"491")
    assert not any(scan.feed(text[i:i + 7]) for i in range(0, 20, 7))
    for i in range(21, len(text), 7):
        scan.feed(text[i:i + 7])
    assert scan.count == 2 and "data block 490 is corrupted" in scan.reports[0]
    assert all("\r" not in r for r in scan.reports)


def test_a_console_flood_after_a_report_cannot_hide_it(tmp_path: Path) -> None:
    """The old check read the console file's last MiB: a guest printing more after the report hid it."""
    listeners = {}
    for name in ("console.sock", "out.sock"):  # QEMU's end
        listeners[name] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listeners[name].bind(str(tmp_path / name))
        listeners[name].listen(1)
    seen: list[tuple[list[str], int]] = []
    terminal = io.BytesIO()
    streams = [Stream("console.sock", "console.log", None, console=True), Stream("out.sock", "out", terminal)]
    pump = OutputPump(tmp_path, streams, limit=LIMIT, on_integrity=lambda r, n: seen.append((r, n)))
    pump.connect()
    console, out = (listeners[name].accept()[0] for name in ("console.sock", "out.sock"))
    console.sendall(VERITY + b"x" * (4 * LIMIT) + b"\n")
    out.sendall(b"hello\n")
    for sock in (console, out, *listeners.values()):
        sock.close()
    assert pump.finish() == []
    assert (tmp_path / "console.log").stat().st_size <= LIMIT
    assert b"corrupted" not in (tmp_path / "console.log").read_bytes()  # gone from the file...
    assert pump.integrity_failures and seen and seen[0][1] == 1  # ...but seen, and recorded at once
    assert terminal.getvalue() == b"hello\n"


def test_an_unreachable_output_socket_is_a_launch_error(tmp_path: Path) -> None:
    pump = OutputPump(tmp_path, [Stream("missing.sock", "log", None)], limit=LIMIT, on_integrity=lambda r, n: None)
    with pytest.raises(VMLaunchError, match=r"missing\.sock"):
        pump.connect()
    assert pump.finish() == []


def test_max_log_bytes_is_validated(tmp_path: Path) -> None:
    from kvmrkt.config import load_config
    from kvmrkt.errors import ConfigError

    assert load_config(config_dir=tmp_path).pods.max_log_bytes == 64 << 20
    for value in ("0", "-1", str(MIN_LOG_BYTES - 1), '"64M"', "true", "1.5e9"):
        (tmp_path / "config.toml").write_text(f"[pods]\nmax_log_bytes = {value}\n")
        with pytest.raises(ConfigError, match="max_log_bytes"):
            load_config(config_dir=tmp_path)
    (tmp_path / "config.toml").write_text(f"[pods]\nmax_log_bytes = {MIN_LOG_BYTES}\n")
    assert load_config(config_dir=tmp_path).pods.max_log_bytes == MIN_LOG_BYTES


def test_the_debug_console_copy_is_rendered_visibly_and_the_log_kept_verbatim(tmp_path: Path) -> None:
    from stage1_kvm.agent import printable_stream

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "console.sock"))
    listener.listen(1)
    terminal = io.BytesIO()
    pump = OutputPump(tmp_path, [Stream("console.sock", "console.log", terminal, console=True,
                                        clean=printable_stream)], limit=LIMIT, on_integrity=lambda r, n: None)
    pump.connect()
    guest = listener.accept()[0]
    guest.sendall(b"hi\x1b[2J\x9b\r\n")
    guest.close()
    listener.close()
    pump.finish()
    assert b"\x1b" not in terminal.getvalue() and b"\\x1b[2J" in terminal.getvalue()
    assert (tmp_path / "console.log").read_bytes() == b"hi\x1b[2J\x9b\r\n"
