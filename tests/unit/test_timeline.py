"""kvmrkt.host.timeline: stamps reach only the descriptor the profiler passed, and nothing else happens without it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(code: str, env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[bytes]:
    base = {k: v for k, v in os.environ.items() if k != "KVMRKT_TIMELINE_FD"}
    return subprocess.run([sys.executable, "-c", code], env={**base, "PYTHONPATH": str(REPO), **env},
                          pass_fds=pass_fds, capture_output=True, check=False)


def test_stamps_go_to_the_named_descriptor_in_order() -> None:
    rfd, wfd = os.pipe()
    try:
        proc = _run("from kvmrkt.host.timeline import stamp\nstamp('one')\nstamp('two')",
                    {"KVMRKT_TIMELINE_FD": str(wfd)}, pass_fds=(wfd,))
        os.close(wfd)
        assert proc.returncode == 0, proc.stderr
        lines = os.read(rfd, 4096).decode().splitlines()
    finally:
        os.close(rfd)
    assert [line.split(" ")[2] for line in lines] == ["one", "two"]
    (first, cpu1), (second, cpu2) = ((int(x) for x in line.split(" ")[:2]) for line in lines)
    assert 0 < first <= second and 0 < cpu1 <= cpu2


def test_unset_bad_or_closed_descriptors_are_ignored() -> None:
    """Without the variable nothing is written anywhere; a value that is no descriptor number, or a descriptor
    that is not open, turns stamping off instead of failing the command (or writing to fd 0-2)."""
    code = "from kvmrkt.host.timeline import stamp\nstamp('x')\nstamp('y')\nprint('ok')"
    for value in (None, "", "-1", "1e3", "3 ", "99999999", "57"):
        proc = _run(code, {} if value is None else {"KVMRKT_TIMELINE_FD": value})
        assert proc.returncode == 0 and proc.stdout == b"ok\n" and proc.stderr == b"", (value, proc)


def test_the_cli_stamps_its_start_and_imports() -> None:
    rfd, wfd = os.pipe()
    try:
        proc = subprocess.run([sys.executable, "-m", "kvmrkt", "version"], pass_fds=(wfd,), capture_output=True,
                              env={**os.environ, "PYTHONPATH": str(REPO), "KVMRKT_TIMELINE_FD": str(wfd)},
                              check=False)
        os.close(wfd)
        stages = [line.split(" ")[2] for line in os.read(rfd, 4096).decode().splitlines()]
    finally:
        os.close(rfd)
    assert proc.returncode == 0, proc.stderr
    assert stages == ["cli-start", "imports-done"]
