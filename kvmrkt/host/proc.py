"""The only place kvmrkt starts host programs.

Role: run or spawn argv lists (never a shell), with explicit timeouts, captured output and errors that carry
the argv and the tail of stderr. Trust boundary: argv elements may contain untrusted strings (paths, image
names); they are passed as separate arguments, never interpolated into a shell command line.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from kvmrkt.errors import CommandError, ConfigError

_PR_SET_PDEATHSIG = 1
_CLONE_NEWNET = 0x40000000


def which(program: str, *, hint: str | None = None) -> str:
    """Resolve a program on PATH (or an absolute path) or raise ConfigError naming it."""
    found = shutil.which(program)
    if not found:
        raise ConfigError(f"required program {program!r} not found", hint=hint or "run `make setup` as root")
    return found


def tail(text: str | bytes, lines: int = 15) -> str:
    """The last ``lines`` lines of a text, decoded leniently."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 600.0,
    input_bytes: bytes | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    what: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run a program to completion, capturing stdout and stderr.

    Raises:
        ConfigError: the program does not exist.
        CommandError: it timed out, or (with ``check``) exited non-zero.
    """
    args = [os.fspath(a) for a in argv]
    label = what or Path(args[0]).name
    try:
        proc = subprocess.run(
            args,
            input=input_bytes,
            capture_output=True,
            timeout=timeout,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"required program {args[0]!r} not found", hint="run `make setup` as root") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(
            f"{label} timed out after {timeout:.0f}s", argv=args, returncode=None, stderr_tail=tail(exc.stderr or b"")
        ) from exc
    if check and proc.returncode != 0:
        raise CommandError(
            f"{label} failed with exit code {proc.returncode}",
            argv=args,
            returncode=proc.returncode,
            stderr_tail=tail(proc.stderr),
        )
    return proc


def _die_with(parent: int, exec_label: str | None = None, netns: str | None = None,
              setup: Callable[[], None] | None = None) -> Callable[[], None]:
    """A pre-exec hook: the child gets SIGKILL when ``parent`` dies (no orphaned VMs), including when the
    parent died before the hook ran; with ``exec_label`` the program is executed in that SELinux context;
    with ``netns`` it runs in that network namespace (a path), or in a new empty one (""); ``setup`` runs last
    (a jail that changes the child's root and credentials; the parent-death signal, which a change of
    credentials clears, is set again after it)."""

    def hook() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
        if netns == "":
            if libc.unshare(_CLONE_NEWNET) != 0:
                os._exit(126)
        elif netns is not None:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                os._exit(126)
            os.close(fd)
        if exec_label:
            with open("/proc/self/attr/exec", "w") as fh:  # fails (and so does the spawn) if it cannot be set
                fh.write(exec_label)
        if setup is not None:
            setup()
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(1)

    return hook


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    stdout: int | IO[bytes] | None = subprocess.DEVNULL,
    stderr: int | IO[bytes] | None = subprocess.DEVNULL,
    pass_fds: Sequence[int] = (),
    die_with_parent: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    exec_label: str | None = None,
    netns: str | None = None,
    setup: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a long-lived program and return its Popen handle (``netns``, ``setup``: see ``_die_with``).

    Raises:
        ConfigError: the program does not exist.
    """
    args = [os.fspath(a) for a in argv]
    try:
        return subprocess.Popen(
            args,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            pass_fds=tuple(pass_fds),
            close_fds=True,
            preexec_fn=_die_with(os.getpid(), exec_label, netns, setup) if die_with_parent else None,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"required program {args[0]!r} not found", hint="run `make setup` as root") from exc


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (and is not a zombie we could reap)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def pid_cmdline(pid: int) -> list[str]:
    """The argv of a live process, or [] when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode("utf-8", "replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []
