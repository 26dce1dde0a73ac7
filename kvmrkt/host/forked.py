"""One step of a command run in a forked child while the command goes on; its outcome collected later.

Role: ``start(step)`` forks; the child runs ``step`` and sends back success or its ``KvmrktError`` over a pipe,
then exits without running any of this process's cleanup; ``Pending.wait()`` blocks until the child is done and
raises its error here. Measured launch uses it: the TPM work (loading tpm2-pytss and cryptography, the TPM's round
trips) overlaps the VMM's start, which stays paused until ``wait`` returns, and the process that then supervises
the pod for its whole life never loads those libraries. A process that runs other threads runs the step inline
instead (a fork could copy a lock one of them holds). Trust boundary: the child is this process's own code; the
pipe is private to the two, so what comes back on it (a pickled error) is trusted as this process's own.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import threading
import traceback
from collections.abc import Callable

from kvmrkt.errors import KvmrktError


class Pending:
    """A step started by ``start``: ``wait`` for its outcome (raises its error), or ``reap`` it quietly."""

    def __init__(self, what: str, pid: int = 0, rfd: int = -1, error: KvmrktError | None = None) -> None:
        self.what = what
        self._pid, self._rfd = pid, rfd
        self._error = error

    def wait(self) -> None:
        """Block until the step is done; raise its error (every call, once it failed).

        Raises:
            KvmrktError: the step's own error, or one saying the child died without an outcome.
        """
        if self._pid:
            with os.fdopen(self._rfd, "rb") as pipe:
                data = pipe.read()
            _, status = os.waitpid(self._pid, 0)
            self._pid = 0
            if data != b"ok":
                self._error = _unpickle(data) if data else KvmrktError(
                    f"the {self.what} ended without an outcome ({_how(os.waitstatus_to_exitcode(status))})")
        if self._error is not None:
            raise self._error

    def reap(self) -> None:
        """Wait for the step (so no child outlives its use), ignoring its outcome: for paths already failing."""
        with contextlib.suppress(KvmrktError):
            self.wait()


def done() -> Pending:
    """A step that needs no waiting."""
    return Pending("step")


def start(what: str, step: Callable[[], None]) -> Pending:
    """Run ``step`` in a forked child (inline, and already done, where this process runs other threads);
    ``what`` names it in the error when the child dies without an outcome."""
    if threading.active_count() > 1:
        try:
            step()
        except KvmrktError as exc:
            return Pending(what, error=exc)
        return Pending(what)
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's lines run in the fork (the tests run them through a real launch)
        code = 1
        try:
            os.close(rfd)
            _child(step, wfd)
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    return Pending(what, pid, rfd)


def _child(step: Callable[[], None], wfd: int) -> None:
    try:
        step()
        out = b"ok"
    except KvmrktError as exc:
        out = pickle.dumps(exc)
    except BaseException as exc:  # a bug (or Ctrl-C): the step failed; the traceback is for a bug report
        traceback.print_exc()
        out = pickle.dumps(KvmrktError(f"{type(exc).__name__}: {exc}"))
    sys.stdout.flush()
    sys.stderr.flush()
    with os.fdopen(wfd, "wb") as pipe:
        pipe.write(out)


def _unpickle(data: bytes) -> KvmrktError:
    err = pickle.loads(data)  # noqa: S301 - from our own forked child over a private pipe (see the docstring)
    return err if isinstance(err, KvmrktError) else KvmrktError(f"unexpected outcome {err!r}")


def _how(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"
