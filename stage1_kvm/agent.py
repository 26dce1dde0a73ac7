"""Host side of the guest agent channel (virtio-serial; this host class has no vsock).

Role: read the guest's status stream (a file QEMU writes: READY, START, EXIT, ERROR, DONE lines), and speak the
request/response protocol of the ``kvmrkt.sig`` (stop) port, a unix socket QEMU listens on in the pod directory, and
of enter and container sessions (``enter.sock``, served by the pod supervisor's ``stage1_kvm.ctlmux`` over the
``kvmrkt.ctl`` port: ``enter``, ``ContainerSession``). Trust boundary: everything read here comes from inside the
VM, where untrusted apps run: it is parsed defensively (bounded sizes, unknown lines ignored), only ever written to
the caller's stdout/stderr or compared, never executed or used as a path.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import struct
import termios
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from kvmrkt.errors import AgentError, ManifestError
from kvmrkt.host.wait import wait_until
from kvmrkt.stage1 import PLAIN_ENTER, EnterOptions, GuestState
from stage1_kvm.vmspec import check_container_name, escape

MAX_FRAME = 1 << 20


def unescape(text: str) -> str:
    """Undo the guest's %-escaping (``%XX`` bytes; a lone ``%`` is the empty string)."""
    if text == "%":
        return ""
    out = bytearray()
    i = 0
    raw = text.encode()
    while i < len(raw):
        if raw[i] == 0x25 and i + 2 < len(raw) and _ishex(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "replace")


def _ishex(b: bytes) -> bool:
    return len(b) == 2 and all(c in b"0123456789abcdefABCDEF" for c in b)


@dataclass
class GuestStatus(GuestState):
    """What the guest init reported so far: the interface's ``GuestState`` and the apps' ERROR lines."""

    errors: dict[str, list[str]] = field(default_factory=dict)


MAX_LINE = 4096


def printable(text: str, keep: str = "") -> str:
    """``text`` with every character that is not printable (control characters: ESC and so every terminal
    escape sequence, C1 controls, bidi overrides...) shown visibly as ``\\xNN``/``\\uNNNN``, except those in
    ``keep``. The one sanitizer for guest text that reaches an operator's terminal."""
    return "".join(c if c.isprintable() or c in keep else f"\\x{ord(c):02x}" if ord(c) < 0x100
                   else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}" for c in text)


def printable_stream(data: bytes) -> bytes:
    """``printable`` for a stream of guest lines (the console shown by ``--debug``): keeps line ends and tabs."""
    return printable(data.decode("utf-8", "replace").replace("\r\n", "\n"), keep="\n\t").encode()


def parse_status(text: str) -> GuestStatus:
    """Parse the status stream; a partial last line (still being written) is ignored. Only the guest init writes
    it, but the guest is not trusted: lines longer than ``MAX_LINE`` are ignored, each app's first START and EXIT
    count (a later one cannot rewrite an exit code), messages are made printable."""
    st = GuestStatus()
    lines = text.split("\n")
    for line in lines[:-1]:
        if len(line) > MAX_LINE:
            continue
        parts = line.split(" ", 2)
        kind = parts[0]
        if kind == "READY":
            st.ready = True
        elif kind == "HELD":
            st.held = True
        elif kind == "DONE":
            st.done = True
        elif kind == "FATAL":
            st.fatal = st.fatal or (printable(unescape(parts[1])) if len(parts) > 1 else "unknown")
        elif kind == "START" and len(parts) == 3 and parts[2].isdigit():
            st.pids.setdefault(printable(unescape(parts[1])), int(parts[2]))
        elif kind == "EXIT" and len(parts) == 3 and parts[2].lstrip("-").isdigit():
            st.exits.setdefault(printable(unescape(parts[1])), int(parts[2]))
        elif kind == "ERROR" and len(parts) == 3:
            st.errors.setdefault(printable(unescape(parts[1])), []).append(printable(unescape(parts[2])))
    return st


def read_status(path: Path) -> GuestStatus:
    """Parse the status file (missing = nothing reported yet); reads at most 1 MiB."""
    try:
        with path.open("rb") as fh:
            return parse_status(fh.read(MAX_FRAME).decode("utf-8", "replace"))
    except FileNotFoundError:
        return GuestStatus()


@contextlib.contextmanager
def socket_path(pod_dir: Path, socket_name: str) -> Iterator[str]:
    """A short path for a unix socket in the pod directory, valid inside the block: through /proc/self/fd, so
    sun_path stays under its 108-byte limit however deep the data directory is."""
    dfd = os.open(pod_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dfd}/{socket_name}"
    finally:
        os.close(dfd)


def listen(pod_dir: Path, socket_name: str) -> socket.socket:
    """A listening unix socket in the pod directory (a stale one from an earlier boot is replaced), for the VMM
    to serve: kvmrkt creates it as root in the root-only pod directory and passes the descriptor, so the jailed
    VMM needs no writable directory and cannot put anything else at that path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with socket_path(pod_dir, socket_name) as path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            sock.bind(path)
        sock.listen(8)
    except OSError:
        sock.close()
        raise
    return sock


def _connect(pod_dir: Path, socket_name: str, *, timeout: float) -> socket.socket:
    """A connection to a socket in the pod directory.

    Raises:
        AgentError: nothing listens there.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        with socket_path(pod_dir, socket_name) as path:  # the directory itself is gone once the pod exited
            sock.connect(path)
    except OSError as exc:
        sock.close()
        raise AgentError(f"cannot reach the guest agent ({socket_name}): {exc}") from exc
    return sock


@contextlib.contextmanager
def _channel(pod_dir: Path, socket_name: str, *, timeout: float, lock: bool) -> Iterator[socket.socket]:
    """Connect to a port socket in the pod directory, holding its lock (one client at a time) when asked."""
    lock_fd = -1
    try:
        if lock:
            lock_fd = os.open(pod_dir / f"{socket_name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        sock = _connect(pod_dir, socket_name, timeout=timeout)
        try:
            yield sock
        finally:
            sock.close()
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)


class _Sender:
    """Whole frames to a session's socket from any thread (signals, input, resizes); a closed socket drops them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        with self.lock, contextlib.suppress(OSError):
            self.sock.sendall(data)


class _Reader:
    """Buffered reads of lines and exact byte counts from a socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError as exc:
            raise AgentError("the guest agent did not answer in time") from exc
        except OSError as exc:
            raise AgentError(f"the channel to the guest agent failed: {exc}") from exc
        if not chunk:
            raise AgentError("the guest agent closed the channel (did the pod exit?)")
        self.buf += chunk

    def line(self) -> str:
        while b"\n" not in self.buf:
            if len(self.buf) > 4096:
                raise AgentError("malformed reply from the guest agent")
            self._fill()
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode("utf-8", "replace")

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


def enter(
    pod_dir: Path, sessions_socket: str, app: str, argv: list[str], *, stdout: IO[bytes], stderr: IO[bytes],
    timeout: float | None = None, opts: EnterOptions = PLAIN_ENTER,
) -> int:
    """Run argv in an app's root inside the VM; stream its output; return its exit code (see ``EnterOptions``;
    with ``tty`` the output arrives as stdout; signals are forwarded from the main thread only). One connection
    to the pod supervisor's ``sessions_socket`` (``stage1_kvm.ctlmux``) is one session; many can run at once.

    Raises:
        AgentError: the channel failed or the guest refused the request.
    """
    stdin = opts.stdin
    flags = (["tty"] if opts.tty else []) + (["stdin"] if stdin is not None else [])
    flags += [escape(f"env={e}") for e in opts.env or ()] if opts.env is not None else []
    flags += ["noenv"] if opts.env is not None and not opts.env else []
    flags += [escape(f"cwd={opts.cwd}")] if opts.cwd else []
    flags += [f"uid={opts.uid}"] if opts.uid is not None else []
    flags += [f"gid={opts.gid}"] if opts.gid is not None else []
    request = " ".join(["ENTER", escape(app), str(len(argv)), *(escape(a) for a in argv), *flags]) + "\n"
    with _channel(pod_dir, sessions_socket, timeout=10.0, lock=False) as sock:
        send = _Sender(sock)
        sock.sendall(request.encode())
        sock.settimeout(timeout)
        if stdin is not None:
            threading.Thread(target=_pump_input, args=(stdin, send), daemon=True).start()
        old = {s: signal.signal(s, lambda signum, _f: send(f"SIG {signum}\n".encode()))
               for s in opts.forward_signals}
        if opts.tty and stdin is not None and os.isatty(stdin):  # the guest terminal follows ours
            def winsize(*_a: object) -> None:
                rows, cols = terminal_size(stdin)
                send(f"WINSZ {rows} {cols}\n".encode())

            winsize()
            old[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, winsize)
        try:
            return _session_output(_Reader(sock), stdout, stderr, "enter")
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)


def terminal_size(fd: int) -> tuple[int, int]:
    """Rows and columns of the terminal on ``fd``."""
    rows, cols = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))[:2]
    return int(rows), int(cols)


def _pump_input(fd: int, send: Callable[[bytes], None]) -> None:
    try:
        while data := os.read(fd, 65536):
            send(b"IN %d\n" % len(data) + data)
    except OSError:
        pass
    send(b"EOF\n")


def _session_output(reader: _Reader, stdout: IO[bytes], stderr: IO[bytes], what: str) -> int:
    while True:
        head = reader.line().split(" ", 1)
        if head[0] in ("OUT", "ERR") and len(head) == 2 and head[1].isdigit() and int(head[1]) <= MAX_FRAME:
            data = reader.exact(int(head[1]))
            out = stdout if head[0] == "OUT" else stderr
            out.write(data)
            out.flush()
        elif head[0] == "EXIT" and len(head) == 2 and head[1].isdigit():
            return int(head[1])
        elif head[0] == "FAIL":
            raise AgentError(f"the guest refused to {what}: {_reason(head)}")
        else:
            raise AgentError(f"malformed reply from the guest agent: {head[0][:40]!r}")


def _reason(head: list[str]) -> str:
    """The printable reason of a ``FAIL <escaped reason>`` line split in two."""
    return printable(unescape(head[1])) if len(head) > 1 else ""


class ContainerSession:
    """A container created inside a running pod VM (``guest/containers.c``): one connection to the pod
    supervisor's sessions socket, ``CREATE <name> [tty] [stdin]``; the guest sets the container up from its config
    in the export (``vmspec.guest_container_config``) and holds it (``HELD``) until ``go`` (``GO``, ``STARTED
    <pid>``); then its output until ``EXIT``. Closing the session before the end kills the container."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock = sock
        self._reader = _Reader(sock)
        self._send = _Sender(sock)
        self._name = name
        self._exit: int | None = None  # an EXIT read while waiting for STARTED (a SIG while held)

    @classmethod
    def create(cls, pod_dir: Path, sessions_socket: str, name: str, *, tty: bool, stdin: bool,
               timeout: float = 60) -> ContainerSession:
        """Create container ``name``; returns once the guest holds it (set up, not started).

        Raises:
            AgentError: a bad name, the channel failed, the guest refused (its reason) or did not answer in time.
        """
        try:
            check_container_name(name)
        except ManifestError as exc:
            raise AgentError(exc.message, hint=exc.hint) from None
        sock = _connect(pod_dir, sessions_socket, timeout=timeout)
        session = cls(sock, name)
        try:
            sock.sendall(f"CREATE {name}{' tty' if tty else ''}{' stdin' if stdin else ''}\n".encode())
            session._expect("HELD", "create")
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return session

    def _expect(self, kind: str, what: str) -> str:
        """The reply ``kind`` (its argument); an EXIT or FAIL instead is an AgentError."""
        head = self._reader.line().split(" ", 1)
        if head[0] == kind and (len(head) == 1 or head[1].isdigit()):
            return head[1] if len(head) > 1 else ""
        if head[0] == "FAIL":
            raise AgentError(f"the guest could not {what} container {self._name}: {_reason(head)}")
        if head[0] == "EXIT" and len(head) == 2 and head[1].isdigit():
            self._exit = int(head[1])
            raise AgentError(f"container {self._name} ended (exit code {self._exit}) before it was started")
        raise AgentError(f"malformed reply from the guest agent: {head[0][:40]!r}")

    def go(self, timeout: float = 60) -> int:
        """Start the held container; returns its ns-init's pid in the guest.

        Raises:
            AgentError: it ended instead (a signal while held; ``relay`` returns its exit code), or failed to start.
        """
        if self._exit is not None:
            raise AgentError(f"container {self._name} ended (exit code {self._exit}) before it was started")
        self._send(b"GO\n")
        self._sock.settimeout(timeout)
        try:
            return int(self._expect("STARTED", "start"))
        finally:
            self._sock.settimeout(None)

    def signal(self, signum: int) -> None:
        """Send a signal to the container (its ns-init forwards it; SIGKILL ends it); while held, it ends the
        container with 128+signal. Thread-safe."""
        self._send(f"SIG {int(signum)}\n".encode())

    def winsize(self, rows: int, cols: int) -> None:
        """Set the size of the container's terminal (``tty``)."""
        self._send(f"WINSZ {int(rows)} {int(cols)}\n".encode())

    def pump_input(self, fd: int) -> None:
        """Copy ``fd`` to the container's stdin (``stdin``) in a thread, then close its stdin."""
        threading.Thread(target=_pump_input, args=(fd, self._send), daemon=True).start()

    def relay(self, stdout: IO[bytes], stderr: IO[bytes]) -> int:
        """Copy the container's output until it exits; returns its exit code (status, or 128+signal).

        Raises:
            AgentError: the channel failed or the guest failed the session.
        """
        if self._exit is not None:
            return self._exit
        self._exit = _session_output(self._reader, stdout, stderr, f"run container {self._name}")
        return self._exit

    def close(self) -> None:
        """End the session (a container still running is killed)."""
        self._sock.close()


def _sig_request(pod_dir: Path, sig_socket: str, line: str, what: str) -> None:
    with _channel(pod_dir, sig_socket, timeout=10.0, lock=True) as sock:
        sock.sendall(line.encode() + b"\n")
        reply = _Reader(sock).line()
        if reply != "OK":
            raise AgentError(f"the guest refused to {what}: {reply[:80]!r}")


def request_stop(pod_dir: Path, sig_socket: str, *, grace: float) -> None:
    """Ask the guest to SIGTERM every app now and SIGKILL them after ``grace`` seconds.

    Raises:
        AgentError: the channel failed or the guest refused.
    """
    _sig_request(pod_dir, sig_socket, f"STOP {max(0, int(grace))}", "stop")


def request_go(pod_dir: Path, sig_socket: str) -> None:
    """Start the apps of a pod booted with ``hold`` (they are set up and waiting).

    Raises:
        AgentError: the channel failed or the guest refused (the apps were already started).
    """
    _sig_request(pod_dir, sig_socket, "GO", "start the apps")


def request_winsize(pod_dir: Path, sig_socket: str, rows: int, cols: int) -> None:
    """Set the size of the first app's terminal in the guest (the app gets SIGWINCH).

    Raises:
        AgentError: the channel failed or the guest refused.
    """
    _sig_request(pod_dir, sig_socket, f"WINSZ {int(rows)} {int(cols)}", "resize the terminal")


def request_kill(pod_dir: Path, sig_socket: str, signum: int, *, every_process: bool = False) -> None:
    """Send a signal to every app (``every_process``: to every process in the guest); before ``request_go``,
    the pod ends with 128+signal.

    Raises:
        AgentError: the channel failed or the guest refused.
    """
    _sig_request(pod_dir, sig_socket, f"KILL {signum}" + (" all" if every_process else ""), "deliver the signal")


def wait_for_socket(pod_dir: Path, name: str, timeout: float) -> None:
    """Wait until QEMU has created a socket in the pod directory."""
    if not wait_until((pod_dir / name).exists, timeout=timeout, interval=0.005):
        raise AgentError(f"{name} did not appear within {timeout:.0f}s")
