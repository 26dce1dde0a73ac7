"""kvmrkt.host.forked: a step run in a real forked child, its outcome (or its death) reported to the parent."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from kvmrkt.errors import CommandError, KvmrktError, TpmUnavailableError
from kvmrkt.host import forked


def test_the_step_runs_in_another_process(tmp_path: Path) -> None:
    out = tmp_path / "pid"
    pending = forked.start("step", lambda: out.write_text(str(os.getpid())))
    pending.wait()
    assert int(out.read_text()) != os.getpid()
    pending.wait()  # a second wait is a no-op


def test_the_childs_error_is_raised_in_the_parent_with_everything_it_carries() -> None:
    def fail() -> None:
        raise CommandError("plugin failed", argv=["ptp", "ADD"], returncode=3, stderr_tail="boom")

    pending = forked.start("step", fail)
    with pytest.raises(CommandError) as info:
        pending.wait()
    err = info.value
    assert (err.message, err.hint, err.argv, err.returncode, err.exit_code) == (
        "plugin failed\nboom", "command: ptp ADD", ["ptp", "ADD"], 3, CommandError.exit_code)
    with pytest.raises(CommandError):  # every wait, once it failed
        pending.wait()
    pending.reap()  # quiet


def test_a_bug_in_the_step_is_an_error_not_a_hang(capfd: pytest.CaptureFixture[str]) -> None:
    def bug() -> None:
        raise ZeroDivisionError("division by zero")

    with pytest.raises(KvmrktError, match="ZeroDivisionError: division by zero"):
        forked.start("step", bug).wait()
    assert "Traceback" in capfd.readouterr().err


def test_a_child_killed_without_an_outcome_is_an_error() -> None:
    pending = forked.start("measured launch", lambda: os.kill(os.getpid(), signal.SIGKILL))
    with pytest.raises(KvmrktError, match=r"the measured launch ended without an outcome \(killed by signal 9\)"):
        pending.wait()


def test_with_other_threads_the_step_runs_inline() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        pids: list[int] = []
        forked.start("step", lambda: pids.append(os.getpid())).wait()
        assert pids == [os.getpid()]

        def fail() -> None:
            raise TpmUnavailableError("no TPM")

        pending = forked.start("step", fail)  # the error is kept for wait, as from a child
        with pytest.raises(TpmUnavailableError, match="no TPM"):
            pending.wait()
    finally:
        stop.set()
        thread.join()
