"""examples/demo-tpm.sh (kvmrkt/demo_tpm.py, run by `make run`) with real swtpm processes, in a state and a config
directory of the test's own: when another program holds the preferred port it starts its EMULATED TPM on the next
free pair and points its own [measure] table at it; the next run reuses that swtpm (and only a process verifiably
its own); after the TPM is gone (a reboot) it starts a new one, ignoring a pid file that names another process; it
leaves anyone else's [measure] table alone. Every swtpm it started is stopped by pid after each test."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from measure.tpm import pcr_read

from .conftest import REPO

DEMO = REPO / "examples" / "demo-tpm.sh"


# On a host with a TPM the demo uses it and starts no emulated one: nothing here applies there.
pytestmark = pytest.mark.skipif(Path("/dev/tpmrm0").exists(), reason="this host has a TPM (the demo uses it)")


def _swtpms(state: Path) -> list[int]:
    """The swtpm processes whose state directory is ``state`` (the test's own directory: only its processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if argv and argv[0].endswith(b"swtpm") and f"dir={state}".encode() in argv:
            pids.append(int(entry.name))
    return pids


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline += 10
        time.sleep(0.05)


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(config dir, state dir); the swtpm processes the demo started there are stopped after the test."""
    config, state = tmp_path / "etc", tmp_path / "swtpm"
    config.mkdir()
    yield config, state
    for pid in _swtpms(state):
        _stop(pid)
    assert not _swtpms(state)


@pytest.fixture
def busy() -> Iterator[int]:
    """A loopback port that a listening socket of the test holds: the port the demo is told to try first."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def demo(config: Path, state: Path, first: int) -> str:
    env = {**os.environ, "KVMRKT_DEMO_TPM_STATE": str(state), "KVMRKT_DEMO_TPM_PORT": str(first)}
    proc = subprocess.run([DEMO, config], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"demo-tpm.sh failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def running(state: Path) -> tuple[int, int]:
    """The demo's swtpm (pid, port), as its state directory records them; it is the only swtpm there."""
    pid, port = int((state / "pid").read_text()), int((state / "port").read_text())
    assert _swtpms(state) == [pid]
    return pid, port


def test_busy_port_another_pair_then_reused(dirs: tuple[Path, Path], busy: int) -> None:
    config, state = dirs
    kept = '# written by hand\n[stage1]\naccel = "auto"  # stays\n'
    (config / "config.toml").write_text(kept)
    out = demo(config, state, busy)
    pid, port = running(state)
    assert busy not in (port, port + 1), "the demo started its TPM on a port another program holds"
    assert "starting an EMULATED TPM" in out and f"swtpm pid {pid} on 127.0.0.1:{port}" in out
    assert f"{busy}/{busy + 1} in use by other programs" in out
    tcti = f"swtpm:host=127.0.0.1,port={port}"
    text = (config / "config.toml").read_text()
    assert text.startswith(kept) and tomllib.loads(text)["measure"] == {"tcti": tcti, "pcr": 15}
    assert len(pcr_read(tcti, 15)) == 32  # it is a TPM, and the config names it
    assert stat.S_IMODE(state.stat().st_mode) == 0o700 and stat.S_IMODE((state / "port").stat().st_mode) == 0o600

    again = demo(config, state, busy)
    assert running(state) == (pid, port)
    assert f"using the EMULATED TPM already running: swtpm pid {pid} on 127.0.0.1:{port}" in again
    assert (config / "config.toml").read_text() == text


def test_after_a_reboot_a_new_tpm_and_a_stale_pid_file_is_ignored(dirs: tuple[Path, Path], busy: int) -> None:
    config, state = dirs
    demo(config, state, busy)
    pid, port = running(state)
    _stop(pid)  # the TPM is gone, as after a reboot; its pid file names another process, its port is taken
    other = subprocess.Popen(["sleep", "300"])
    holder = socket.socket()
    try:
        (state / "pid").write_text(f"{other.pid}\n")
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        out = demo(config, state, port)
        assert f"names pid {other.pid}, which is not the demo's swtpm" in out
        assert other.poll() is None, "the demo harmed the process a stale pid file named"
        new_pid, new_port = running(state)
        assert new_pid not in (pid, other.pid) and port not in (new_port, new_port + 1)
        measure = tomllib.loads((config / "config.toml").read_text())["measure"]
        assert measure["tcti"] == f"swtpm:host=127.0.0.1,port={new_port}"
        assert f'(it was "swtpm:host=127.0.0.1,port={port}")' in out
        assert len(pcr_read(measure["tcti"], 15)) == 32
    finally:
        holder.close()
        other.kill()
        other.wait()


def test_anyone_elses_measure_table_is_left_alone(dirs: tuple[Path, Path], busy: int) -> None:
    config, state = dirs
    owned = '[measure]\ntcti = "swtpm:host=127.0.0.1,port=1"  # config management\npcr = 14\n'
    (config / "config.toml").write_text(owned)
    out = demo(config, state, busy)
    _pid, port = running(state)
    assert (config / "config.toml").read_text() == owned
    assert "a [measure] table that the demo did not write" in out and "left unchanged" in out
    assert 'names the TPM "swtpm:host=127.0.0.1,port=1"' in out
    assert f'the demo\'s TPM is "swtpm:host=127.0.0.1,port={port}": kvmrkt will NOT measure into it' in out
