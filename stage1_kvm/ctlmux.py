"""The host end of the multiplexed ctl port: many concurrent enter sessions over one virtio-serial port.

Role: QEMU's ``ctl.sock`` chardev accepts one client, so the VM's supervisor process (``VmStage1.run``, which serves
``kvmrkt run``, ``run-prepared`` and kvmrkt-oci's supervisor alike) holds that one connection for the VM's life and
serves ``enter.sock`` in the pod directory (root only, 0600): each client connection is one session and speaks the
unprefixed per-session protocol (``agent.enter``: ``ENTER ...`` then ``IN``/``EOF``/``SIG``/``WINSZ`` frames;
``OUT``/``ERR`` frames then ``EXIT`` or ``FAIL`` back; or ``agent.ContainerSession``: ``CREATE <name> [tty]
[stdin]``, ``HELD`` back, then ``GO``, ``STARTED <pid>`` back, then as an enter session). Towards the guest every
frame carries the session id the mux picked (never reused while the VM runs; protocol: ``guest/agent.c``'s header
comment and docs/guest-protocol.md). Input is flow-controlled: at most ``IN_WINDOW`` bytes of a session's input are
unacknowledged by the guest (``ACK``), and the mux stops reading a client that has more than ``CLIENT_IN_LIMIT``
bytes waiting for the window, so a command that does not read its stdin stalls only its own client. Output a client
does not read waits in a per-session buffer of at most ``CLIENT_OUT_LIMIT`` bytes; beyond that the session is cut
off (the guest kills the command, the client gets a ``FAIL`` saying why), so one stalled client never stalls the
other sessions. The mux ends with the VM: its clients' connections close (``agent.enter`` reports the channel
closed) and ``enter.sock`` is removed.

Trust boundary: the guest is hostile. Every frame it sends is parsed with bounds (a header line of at most
``MAX_LINE`` bytes, payloads of at most ``MAX_GUEST_FRAME`` bytes, known kinds and numeric fields only); anything
else, and any frame for a session id that is not live, is dropped and counted (``MuxStats``), never delivered to
another session, and never ends the mux. Payloads are copied to the session's client unparsed. Clients are root on
the host (the socket is 0600 in the root-only pod directory) and are trusted, but a malformed client request still
only fails that client's session.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kvmrkt.errors import Stage1Error
from stage1_kvm import agent
from stage1_kvm.vmspec import CTL_SOCKET, escape

SESSIONS_SOCKET = "enter.sock"
MAX_SESSIONS = 64  # as the guest's MAX_SESSIONS
IN_WINDOW = 262144  # unacknowledged input per session (the guest buffers this much)
MAX_IN_FRAME = 16384  # payload of one IN frame to the guest
MAX_GUEST_FRAME = 32768  # an OUT/ERR payload from the guest (virtio_console writes at most 32 KiB at once)
MAX_LINE = 4096  # a guest header line
MAX_REQUEST = 65536  # a client's ENTER line (the guest's limit)
CLIENT_IN_LIMIT = 256 * 1024  # a client's input read ahead of the window
CLIENT_OUT_LIMIT = 1 << 20  # output waiting for a client that does not read
FLUSH_TIMEOUT = 2.0  # at the end, how long clients get to read what is left

_EOF = None  # the EOF marker in a session's pending input


@dataclass
class MuxStats:
    """What the mux dropped from the guest, by cause (a working guest causes none)."""

    malformed: int = 0  # a header that is not a known frame, or too long
    oversized: int = 0  # a payload over MAX_GUEST_FRAME (its declared bytes are skipped)
    unknown_sid: int = 0  # a frame for a session that is not live
    cut_off: int = 0  # sessions cut off because their client did not read its output

    def dropped(self) -> int:
        return self.malformed + self.oversized + self.unknown_sid


class _Session:
    """One client connection = one session."""

    def __init__(self, sid: int, sock: socket.socket) -> None:
        self.sid = sid
        self.sock = sock
        self.inbuf = bytearray()  # client bytes not parsed yet
        self.in_left = 0  # payload bytes of the client's current IN frame still to come
        self.pending: deque[bytes | None] = deque()  # input waiting for the window (_EOF: the client's EOF)
        self.pending_bytes = 0
        self.unacked = 0
        self.entered = False  # ENTER (or CREATE) went to the guest
        self.create = False  # a CREATE session: GO from the client, HELD and STARTED from the guest
        self.done = False  # EXIT/FAIL/cut off: close once `out` is flushed, ignore the client's input
        self.out = bytearray()  # to the client


class GuestParser:
    """Splits the guest's byte stream into frames ``(sid, kind, arg, payload)``; bounded, never raises."""

    def __init__(self, stats: MuxStats) -> None:
        self.stats = stats
        self.buf = bytearray()
        self.skip_line = False  # inside an over-long header line: drop up to its end
        self.skip_bytes = 0  # the payload of an oversized frame: dropped as it arrives

    def feed(self, data: bytes) -> Iterator[tuple[int, str, str, bytes]]:
        self.buf += data
        while self.buf:
            if self.skip_bytes:
                n = min(self.skip_bytes, len(self.buf))
                del self.buf[:n]
                self.skip_bytes -= n
                if self.skip_bytes:
                    return
            nl = self.buf.find(b"\n", 0, MAX_LINE + 1)
            if nl < 0 and (self.skip_line or len(self.buf) > MAX_LINE):  # inside a line too long for a header
                self.stats.malformed += not self.skip_line
                end = self.buf.find(b"\n")
                self.skip_line = end < 0
                del self.buf[: len(self.buf) if end < 0 else end + 1]
                continue
            if self.skip_line:
                del self.buf[: nl + 1]
                self.skip_line = False
                continue
            if nl < 0:
                return
            head = self.buf[:nl].decode("ascii", "replace").split(" ", 2)
            if len(head) == 2 and head[1] == "HELD":
                head.append("")
            if len(head) != 3 or not head[0].isdigit() or len(head[0]) > 19:
                self.stats.malformed += 1
                del self.buf[: nl + 1]
                continue
            sid, kind, arg = int(head[0]), head[1], head[2]
            if kind in ("OUT", "ERR"):
                if not arg.isdigit() or len(arg) > 9:
                    self.stats.malformed += 1
                    del self.buf[: nl + 1]
                    continue
                n = int(arg)
                if n > MAX_GUEST_FRAME:
                    self.stats.oversized += 1
                    del self.buf[: nl + 1]
                    self.skip_bytes = n
                    continue
                if len(self.buf) < nl + 1 + n:
                    return  # the payload is not all here yet
                payload = bytes(self.buf[nl + 1 : nl + 1 + n])
                del self.buf[: nl + 1 + n]
                yield sid, kind, arg, payload
                continue
            del self.buf[: nl + 1]
            if (kind in ("ACK", "STARTED") and arg.isdigit() and len(arg) <= 9) or kind == "FAIL" or (
                kind == "EXIT" and arg.isdigit() and len(arg) <= 3
            ) or (kind == "HELD" and not arg):
                yield sid, kind, arg, b""
            else:
                self.stats.malformed += 1


def _numbers(text: str, count: int) -> bool:
    """``text`` is ``count`` (> 0) small decimal numbers separated by single spaces."""
    parts = text.split(" ")
    return count > 0 and len(parts) == count and all(p.isdigit() and len(p) <= 9 for p in parts)


class CtlMux:
    """Serves ``SESSIONS_SOCKET`` in ``pod_dir`` over the one connection to the VM's ctl port (a thread)."""

    def __init__(self, pod_dir: Path, *, ctl_socket: str = CTL_SOCKET, sessions_socket: str = SESSIONS_SOCKET,
                 max_sessions: int = MAX_SESSIONS, out_limit: int = CLIENT_OUT_LIMIT, held: bool = False) -> None:
        self.pod_dir = pod_dir
        self.ctl_socket = ctl_socket
        self.sessions_socket = sessions_socket
        self.max_sessions = max_sessions
        self.out_limit = out_limit
        self.stats = MuxStats()
        self._sids = itertools.count(1)
        self._sessions: dict[int, _Session] = {}  # live (and closing) sessions by sid
        self._to_guest = bytearray()
        self._guest: socket.socket | None = None
        self._parser = GuestParser(self.stats)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._gone: set[int] = set()  # sessions hung up on the host side whose EXIT the guest has not sent yet
        self._stop = False
        self._shut = False
        # Held: no connection to the guest until handoff() (a template clone reads its pod first on this port).
        self._held = held
        self._preface: bytes | None = None
        self._listener = agent.listen(pod_dir, sessions_socket)
        with agent.socket_path(pod_dir, sessions_socket) as path:
            os.chmod(path, 0o600)
        self._listener.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="ctlmux", daemon=True)

    def start(self) -> CtlMux:
        self._thread.start()
        return self

    def handoff(self, frame: bytes) -> None:
        """Send ``frame`` to the guest before any session's frames, and connect to it (a held mux)."""
        self._preface = frame
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        """End the mux (the VM is gone or going): flush what clients can take, close them, remove the socket."""
        self._stop = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join()
        else:
            self._shutdown()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- the loop ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._sel.register(self._wake_r, selectors.EVENT_READ)
            self._sel.register(self._listener, selectors.EVENT_READ)
            next_connect = 0.0
            while not self._stop:
                if self._preface is not None:
                    self._to_guest[:0], self._preface, self._held = self._preface, None, False
                if self._guest is None and not self._held and time.monotonic() >= next_connect:
                    self._connect_guest()
                    next_connect = time.monotonic() + 0.02
                    self._update_interest()  # what was queued before the connection (a handoff) goes out now
                timeout = 0.02 if self._guest is None else None
                for key, events in self._sel.select(timeout):
                    if key.fileobj == self._wake_r:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 64)
                    elif key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._guest:
                        if events & selectors.EVENT_READ and not self._read_guest():
                            self._stop = True  # the VM ended
                            break
                        if events & selectors.EVENT_WRITE:
                            self._write_guest()
                    else:
                        sess = key.data
                        if events & selectors.EVENT_READ:
                            self._read_client(sess)
                        if events & selectors.EVENT_WRITE and sess.sid in self._sessions:
                            self._write_client(sess)
                self._update_interest()
        finally:
            self._shutdown()

    def _connect_guest(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            with agent.socket_path(self.pod_dir, self.ctl_socket) as path:
                sock.connect(path)
        except OSError:
            sock.close()
            return  # QEMU (or libvirt) has not made it yet
        sock.setblocking(False)
        self._guest = sock
        self._sel.register(sock, selectors.EVENT_READ)

    def _update_interest(self) -> None:
        if self._guest is not None:
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._to_guest else 0)
            if self._sel.get_key(self._guest).events != want:
                self._sel.modify(self._guest, want)
        for sess in self._sessions.values():
            want = (selectors.EVENT_READ if sess.done or sess.pending_bytes < CLIENT_IN_LIMIT else 0) | (
                selectors.EVENT_WRITE if sess.out else 0)
            key = self._sel.get_map().get(sess.sock)
            if key is None and want:
                self._sel.register(sess.sock, want, sess)
            elif key is not None and not want:
                self._sel.unregister(sess.sock)
            elif key is not None and key.events != want:
                self._sel.modify(sess.sock, want, sess)

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        live = sum(1 for s in self._sessions.values() if not s.done)
        sess = _Session(next(self._sids), conn)
        self._sessions[sess.sid] = sess
        if live >= self.max_sessions:
            self._finish(sess, f"FAIL {escape(f'too many enter sessions (at most {self.max_sessions})')}\n")

    # --- guest side -------------------------------------------------------------------------------------

    def _read_guest(self) -> bool:
        assert self._guest is not None
        try:
            data = self._guest.recv(262144)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            return False
        for sid, kind, arg, payload in self._parser.feed(data):
            self._from_guest(sid, kind, arg, payload)
        return True

    def _from_guest(self, sid: int, kind: str, arg: str, payload: bytes) -> None:
        if sid in self._gone:  # what the command wrote before the guest saw the hang-up
            if kind in ("EXIT", "FAIL"):
                self._gone.discard(sid)
            return
        sess = self._sessions.get(sid)
        if sess is None or sess.done or not sess.entered:
            self.stats.unknown_sid += 1
            return
        if kind == "ACK":
            sess.unacked = max(0, sess.unacked - int(arg))
            self._pump_input(sess)
        elif kind in ("HELD", "STARTED"):
            if not sess.create:  # not a frame an enter session has
                self.stats.malformed += 1
                return
            sess.out += f"{kind} {arg}\n".encode() if arg else b"HELD\n"
        elif kind in ("OUT", "ERR"):
            sess.out += f"{kind} {len(payload)}\n".encode() + payload
            if len(sess.out) > self.out_limit:
                self.stats.cut_off += 1
                self._hang_up(sess)
                sess.out.clear()
                self._finish(sess, "FAIL " + escape(
                    f"the session was cut off: its output was not read (more than {self.out_limit} bytes waited)"
                ) + "\n")
        else:  # EXIT or FAIL: the session's last frame
            self._finish(sess, f"{kind} {arg}\n")

    def _write_guest(self) -> None:
        assert self._guest is not None
        try:
            n = self._guest.send(self._to_guest)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = len(self._to_guest)  # the VM is going; its end is seen on the read side
        del self._to_guest[:n]

    # --- client side ------------------------------------------------------------------------------------

    def _read_client(self, sess: _Session) -> None:
        try:
            data = sess.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away: so does its command
            self._hang_up(sess)
            self._drop(sess)
            return
        if not sess.done:  # once done, input is read and dropped until the client closes (no reset for it)
            sess.inbuf += data
            self._parse_client(sess)

    def _parse_client(self, sess: _Session) -> None:
        buf = sess.inbuf
        while buf and not sess.done:
            if sess.in_left:
                chunk = bytes(buf[: sess.in_left])
                del buf[: len(chunk)]
                sess.in_left -= len(chunk)
                for i in range(0, len(chunk), MAX_IN_FRAME):
                    sess.pending.append(chunk[i : i + MAX_IN_FRAME])
                    sess.pending_bytes += len(chunk[i : i + MAX_IN_FRAME])
                continue
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_REQUEST:
                    self._finish(sess, f"FAIL {escape('request too long')}\n")
                return
            line = bytes(buf[:nl]).decode("utf-8", "replace")
            del buf[: nl + 1]
            word, _, rest = line.partition(" ")
            if not sess.entered:
                if word not in ("ENTER", "CREATE"):
                    self._finish(sess, f"FAIL {escape('unknown request')}\n")
                    return
                sess.entered, sess.create = True, word == "CREATE"
                self._to_guest += f"{sess.sid} {line}\n".encode()
            elif word == "GO" and not rest and sess.create:
                self._to_guest += f"{sess.sid} GO\n".encode()
            elif word == "IN" and rest.isdigit() and int(rest) <= agent.MAX_FRAME:
                sess.in_left = int(rest)
            elif word == "EOF" and not rest:
                sess.pending.append(_EOF)
            elif _numbers(rest, {"SIG": 1, "WINSZ": 2}.get(word, 0)):
                self._to_guest += f"{sess.sid} {line}\n".encode()  # not held behind input the command does not read
            else:
                self._hang_up(sess)
                self._finish(sess, f"FAIL {escape(f'malformed request {word[:20]!r}')}\n")
                return
        self._pump_input(sess)

    def _pump_input(self, sess: _Session) -> None:
        """Send the session's pending input that fits its window (EOF in its place after the input)."""
        while sess.pending and not sess.done:
            item = sess.pending[0]
            if item is _EOF:
                self._to_guest += f"{sess.sid} EOF\n".encode()
            elif sess.unacked + len(item) <= IN_WINDOW:
                self._to_guest += f"{sess.sid} IN {len(item)}\n".encode() + item
                sess.unacked += len(item)
                sess.pending_bytes -= len(item)
            else:
                return
            sess.pending.popleft()

    def _write_client(self, sess: _Session) -> None:
        try:
            n = sess.sock.send(sess.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._hang_up(sess)
            self._drop(sess)
            return
        del sess.out[:n]
        if sess.done and not sess.out:
            with contextlib.suppress(OSError):
                sess.sock.shutdown(socket.SHUT_WR)  # the end, for the client; dropped when it closes

    def _hang_up(self, sess: _Session) -> None:
        """The session ends on the host side: the guest kills its command."""
        if sess.entered and not sess.done:
            self._to_guest += f"{sess.sid} HUP\n".encode()
            self._gone.add(sess.sid)

    def _finish(self, sess: _Session, last: str) -> None:
        """The session's last frame: the client gets it after what is buffered, then the connection closes."""
        sess.done = True
        sess.pending.clear()
        sess.out += last.encode()

    def _drop(self, sess: _Session) -> None:
        self._sessions.pop(sess.sid, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sess.sock)
        sess.sock.close()

    def _shutdown(self) -> None:
        """No new sessions; live ones get what was already read for them (FLUSH_TIMEOUT at most), then close."""
        if self._shut:
            return
        self._shut = True
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._listener)
        self._listener.close()
        with agent.socket_path(self.pod_dir, self.sessions_socket) as path, contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        deadline = time.monotonic() + FLUSH_TIMEOUT
        for sess in list(self._sessions.values()):
            with contextlib.suppress(OSError):
                sess.sock.setblocking(True)
                sess.sock.settimeout(max(0.0, deadline - time.monotonic()))
                sess.sock.sendall(sess.out)
            self._drop(sess)
        if self._guest is not None:
            self._guest.close()
            self._guest = None
        self._sel.close()


@contextlib.contextmanager
def serve(pod_dir: Path, warn: IO[bytes], *, held: bool = False) -> Iterator[CtlMux]:
    """Run a ``CtlMux`` for the VM started inside the block (``held``: see ``CtlMux.handoff``); what it dropped
    from the guest is a warning."""
    try:
        mux = CtlMux(pod_dir, held=held).start()
    except OSError as exc:
        raise Stage1Error(f"cannot serve {SESSIONS_SOCKET} in the pod directory: {exc}") from exc
    try:
        yield mux
    finally:
        mux.close()
        if mux.stats.dropped():
            warn.write(f"kvmrkt: warning: the guest sent {mux.stats.dropped()} malformed or stray frames on the "
                       "ctl channel (dropped)\n".encode())
