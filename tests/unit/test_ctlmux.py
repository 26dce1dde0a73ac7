"""The ctl multiplexer against a fake guest: framing, routing by session id, flow control, limits, hostile frames."""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmrkt.errors import AgentError
from kvmrkt.stage1 import EnterOptions
from stage1_kvm import agent
from stage1_kvm.ctlmux import IN_WINDOW, MAX_IN_FRAME, CtlMux

ENTER = b"ENTER app 1 true\n"


class Guest:
    """The VM's end of the ctl port, as the mux sees it through QEMU's socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(5)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, "the mux closed the ctl connection"
        self.buf += chunk

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def quiet(self, seconds: float = 0.2) -> bool:
        """Nothing more arrives for a while."""
        self.sock.settimeout(seconds)
        try:
            return not self.buf and not self.sock.recv(65536, socket.MSG_PEEK)
        except TimeoutError:
            return not self.buf
        finally:
            self.sock.settimeout(5)


@pytest.fixture
def pod_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pod"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def mux(pod_dir: Path, request: pytest.FixtureRequest) -> Iterator[tuple[CtlMux, Guest]]:
    qemu = agent.listen(pod_dir, "ctl.sock")  # what QEMU serves
    kwargs = getattr(request, "param", {})
    m = CtlMux(pod_dir, **kwargs).start()
    qemu.settimeout(5)
    conn, _ = qemu.accept()
    qemu.close()
    try:
        yield m, Guest(conn)
    finally:
        m.close()
        conn.close()


def client(pod_dir: Path, first: bytes = ENTER) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    with agent.socket_path(pod_dir, "enter.sock") as path:
        sock.connect(path)
    if first:
        sock.sendall(first)
    return sock


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_socket_is_root_only_and_gone_with_the_mux(pod_dir: Path) -> None:
    m = CtlMux(pod_dir).start()
    assert (pod_dir / "enter.sock").stat().st_mode & 0o777 == 0o600
    m.close()
    assert not (pod_dir / "enter.sock").exists()


def test_concurrent_sessions_are_routed_by_sid(pod_dir: Path, mux: tuple[CtlMux, Guest]) -> None:
    m, guest = mux
    a = client(pod_dir, b"ENTER app 2 sh x\n")
    assert guest.line() == b"1 ENTER app 2 sh x"
    b = client(pod_dir, b"ENTER app 1 true\n")
    assert guest.line() == b"2 ENTER app 1 true"
    guest.send(b"2 OUT 3\nabc2 ERR 2\nxy2 EXIT 0\n")
    assert read_all(b) == b"OUT 3\nabcERR 2\nxyEXIT 0\n"  # b ended while a still runs
    guest.send(b"1 OUT 2\nhi1 EXIT 5\n")
    assert read_all(a) == b"OUT 2\nhiEXIT 5\n"
    assert m.stats.dropped() == 0


def test_agent_enter_through_the_mux(pod_dir: Path, mux: tuple[CtlMux, Guest]) -> None:
    _m, guest = mux

    def fake_guest() -> None:
        assert guest.line() == b"1 ENTER app 2 echo hi stdin"
        assert guest.line() == b"1 IN 5"
        assert guest.exact(5) == b"hello"
        assert guest.line() == b"1 EOF"
        guest.send(b"1 ACK 5\n1 OUT 6\nhello\n1 ERR 1\n!1 EXIT 3\n")

    t = threading.Thread(target=fake_guest)
    t.start()
    r, w = os.pipe()
    os.write(w, b"hello")
    os.close(w)
    out, err = io.BytesIO(), io.BytesIO()
    try:
        code = agent.enter(pod_dir, "enter.sock", "app", ["echo", "hi"], stdout=out, stderr=err,
                           opts=EnterOptions(stdin=r))
    finally:
        os.close(r)
    t.join()
    assert code == 3 and out.getvalue() == b"hello\n" and err.getvalue() == b"!"


def test_hostile_guest_frames_are_dropped_and_counted(pod_dir: Path, mux: tuple[CtlMux, Guest]) -> None:
    m, guest = mux
    a = client(pod_dir)
    b = client(pod_dir)
    assert guest.line().startswith(b"1 ENTER") and guest.line().startswith(b"2 ENTER")
    forged = b"2 OUT 6\nforged"
    guest.send(
        b"99 OUT 3\nabc"  # a session that does not exist
        + b"1 OUT 999999\n" + forged + b"\0" * (999999 - len(forged))  # oversized: its bytes are skipped
        + b"x" * 5000 + b"\n"  # a header line over 4096 bytes
        + b"1 OUT -3\n1 OUT abc\nBOGUS\n1 SHOUT 3\n1 EXIT 1x\n-1 EXIT 0\n 1 EXIT 0\n"  # malformed headers
        + b"2 ACK 99\n"  # more input acknowledged than was sent
        + b"1 OUT 2\nok1 EXIT 0\n2 EXIT 7\n"
    )
    assert read_all(a) == b"OUT 2\nokEXIT 0\n"
    assert read_all(b) == b"EXIT 7\n"  # nothing forged reached it
    assert m.stats.unknown_sid == 1 and m.stats.oversized == 1 and m.stats.malformed == 8
    c = client(pod_dir)  # the mux still serves
    assert guest.line().startswith(b"3 ENTER")
    guest.send(b"3 EXIT 0\n3 OUT 1\nz")  # after its end: nothing more reaches the client
    assert read_all(c) == b"EXIT 0\n"


def test_input_waits_for_the_window(pod_dir: Path, mux: tuple[CtlMux, Guest]) -> None:
    _m, guest = mux
    a = client(pod_dir, ENTER + b"IN 600000\n" + b"x" * 600000 + b"EOF\nSIG 2\n")
    assert guest.line() == b"1 ENTER app 1 true"
    total, frames = 0, []
    while total < 600000:
        got = 0
        while not guest.quiet():  # everything the window allows, then nothing until the guest acknowledges
            head = guest.line()
            frames.append(head.split(b" ")[1])
            if head not in (b"1 SIG 2", b"1 EOF"):  # signals are not held behind input the command has not read
                assert head.startswith(b"1 IN ") and int(head.split(b" ")[2]) <= MAX_IN_FRAME
                got += len(guest.exact(int(head.split(b" ")[2])))
        assert IN_WINDOW - MAX_IN_FRAME < got <= IN_WINDOW or total + got == 600000
        total += got
        guest.send(b"1 ACK %d\n" % got)
    assert total == 600000 and frames.count(b"SIG") == 1
    assert frames[-1] == b"EOF" and frames.count(b"EOF") == 1  # after all the input
    guest.send(b"1 EXIT 0\n")
    assert read_all(a) == b"EXIT 0\n"


def test_client_hang_up_kills_the_session_quietly(pod_dir: Path, mux: tuple[CtlMux, Guest]) -> None:
    m, guest = mux
    a = client(pod_dir)
    assert guest.line() == b"1 ENTER app 1 true"
    a.close()
    assert guest.line() == b"1 HUP"
    guest.send(b"1 OUT 1\nz1 EXIT 137\n")  # what was on its way: not counted as hostile
    b = client(pod_dir)
    assert guest.line() == b"2 ENTER app 1 true"
    guest.send(b"2 EXIT 0\n")
    assert read_all(b) == b"EXIT 0\n"
    assert m.stats.dropped() == 0


@pytest.mark.parametrize("mux", [{"out_limit": 128 * 1024}], indirect=True)
def test_a_stalled_client_is_cut_off_and_others_go_on(pod_dir: Path, mux: tuple[CtlMux, Guest]) -> None:
    m, guest = mux
    stalled = client(pod_dir)
    assert guest.line() == b"1 ENTER app 1 true"
    other = client(pod_dir)
    assert guest.line() == b"2 ENTER app 1 true"
    chunk = b"y" * 16384
    for _ in range(64):  # 1 MiB the stalled client does not read
        guest.send(b"1 OUT %d\n" % len(chunk) + chunk)
    assert guest.line() == b"1 HUP"
    guest.send(b"2 OUT 2\nok2 EXIT 0\n")
    assert read_all(other) == b"OUT 2\nokEXIT 0\n"
    tail = read_all(stalled)
    assert tail.endswith(b"\n") and b"FAIL the%20session%20was%20cut%20off" in tail.rsplit(b"\n", 2)[-2]
    assert m.stats.cut_off == 1


@pytest.mark.parametrize("mux", [{"max_sessions": 2}], indirect=True)
def test_too_many_sessions(pod_dir: Path, mux: tuple[CtlMux, Guest]) -> None:
    _m, guest = mux
    socks = [client(pod_dir), client(pod_dir)]
    assert guest.line().startswith(b"1 ENTER") and guest.line().startswith(b"2 ENTER")
    assert read_all(client(pod_dir)) == b"FAIL too%20many%20enter%20sessions%20(at%20most%202)\n"
    guest.send(b"1 EXIT 0\n")
    assert read_all(socks[0]) == b"EXIT 0\n"
    third = client(pod_dir)  # a slot is free again
    assert guest.line().startswith(b"4 ENTER")
    guest.send(b"4 EXIT 0\n")
    assert read_all(third) == b"EXIT 0\n"


def test_bad_client_requests_fail_only_that_session(pod_dir: Path, mux: tuple[CtlMux, Guest]) -> None:
    _m, guest = mux
    assert read_all(client(pod_dir, b"HELLO\n")) == b"FAIL unknown%20request\n"
    a = client(pod_dir, ENTER + b"SIG x\n")
    assert guest.line() == b"2 ENTER app 1 true"
    assert guest.line() == b"2 HUP"
    assert read_all(a).startswith(b"FAIL malformed%20request")


def test_the_vm_ending_closes_sessions(pod_dir: Path, mux: tuple[CtlMux, Guest]) -> None:
    _m, guest = mux
    a = client(pod_dir)
    assert guest.line() == b"1 ENTER app 1 true"
    guest.send(b"1 OUT 4\nlast")
    guest.sock.close()  # QEMU exited
    assert read_all(a) == b"OUT 4\nlast"  # what was sent, then the end
    deadline = time.monotonic() + 5
    while (pod_dir / "enter.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(AgentError, match="cannot reach the guest agent"):
        agent.enter(pod_dir, "enter.sock", "app", ["true"], stdout=io.BytesIO(), stderr=io.BytesIO())


def test_container_session_through_the_mux(pod_dir: Path, mux: tuple[CtlMux, Guest]) -> None:
    m, guest = mux

    def fake_guest() -> None:
        assert guest.line() == b"1 CREATE c1 stdin"
        guest.send(b"1 HELD\n")
        assert guest.line() == b"1 WINSZ 30 100"  # allowed while held
        assert guest.line() == b"1 GO"
        guest.send(b"1 STARTED 42\n1 OUT 3\nhi\n1 ERR 1\n!1 EXIT 5\n")

    t = threading.Thread(target=fake_guest)
    t.start()
    s = agent.ContainerSession.create(pod_dir, "enter.sock", "c1", tty=False, stdin=True, timeout=5)
    s.winsize(30, 100)
    assert s.go() == 42
    out, err = io.BytesIO(), io.BytesIO()
    assert s.relay(out, err) == 5 and out.getvalue() == b"hi\n" and err.getvalue() == b"!"
    s.close()
    t.join()
    assert m.stats.dropped() == 0


def test_container_signal_while_held_reaches_relay(pod_dir: Path, mux: tuple[CtlMux, Guest]) -> None:
    _m, guest = mux
    t = threading.Thread(target=lambda: (guest.line(), guest.send(b"1 HELD\n"), guest.line(),
                                         guest.send(b"1 EXIT 143\n")))
    t.start()
    s = agent.ContainerSession.create(pod_dir, "enter.sock", "c1", tty=False, stdin=False, timeout=5)
    s.signal(15)
    with pytest.raises(AgentError, match=r"ended \(exit code 143\) before it was started"):
        s.go()
    assert s.relay(io.BytesIO(), io.BytesIO()) == 143
    s.close()
    t.join()


def test_container_failures_are_agent_errors(pod_dir: Path, mux: tuple[CtlMux, Guest]) -> None:
    _m, guest = mux
    with pytest.raises(AgentError, match="bad container name"):  # refused before the guest sees it
        agent.ContainerSession.create(pod_dir, "enter.sock", "../x", tty=False, stdin=False)
    t = threading.Thread(target=lambda: (guest.line(), guest.send(b"1 FAIL container%20c1:%20no%20rootdir\n")))
    t.start()
    with pytest.raises(AgentError, match="could not create container c1: container c1: no rootdir"):
        agent.ContainerSession.create(pod_dir, "enter.sock", "c1", tty=False, stdin=False, timeout=5)
    t.join()
    with pytest.raises(AgentError, match="did not answer in time"):  # the guest never says HELD
        agent.ContainerSession.create(pod_dir, "enter.sock", "c2", tty=False, stdin=False, timeout=0.5)
    assert guest.line() == b"2 CREATE c2"


def test_container_frames_are_checked(pod_dir: Path, mux: tuple[CtlMux, Guest]) -> None:
    m, guest = mux
    a = client(pod_dir)  # an enter session: no HELD or STARTED, no GO
    b = client(pod_dir, b"CREATE c1\n")
    assert guest.line() == b"1 ENTER app 1 true" and guest.line() == b"2 CREATE c1"
    a.sendall(b"GO\n")
    assert read_all(a).startswith(b"FAIL malformed")
    assert guest.line() == b"1 HUP"
    guest.send(b"1 EXIT 137\n"  # the hung-up session's end
               + b"2 HELD x\n2 STARTED 1234567890\n2 STARTED -1\n2 HELD\n")  # 3 malformed, then HELD
    b.sendall(b"GO\n")
    assert guest.line() == b"2 GO"
    guest.send(b"2 STARTED 7\n2 EXIT 0\n")
    assert read_all(b) == b"HELD\nSTARTED 7\nEXIT 0\n"
    assert m.stats.malformed == 3
    c = client(pod_dir)
    assert guest.line() == b"3 ENTER app 1 true"
    guest.send(b"3 HELD\n3 STARTED 5\n3 EXIT 0\n")  # not frames of an enter session
    assert read_all(c) == b"EXIT 0\n" and m.stats.malformed == 5
