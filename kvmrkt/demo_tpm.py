"""The demo's TPM (``examples/demo-tpm.sh CONFIG_DIR``, run by ``make run``): the host's ``/dev/tpmrm0`` when it
has one, else an EMULATED TPM (swtpm) on loopback, started once and left running (its PCRs must outlive the
demo), and ``[measure] tcti`` in ``CONFIG_DIR/config.toml`` pointed at it.

- A running emulated TPM is reused only when it is the demo's own: a live process whose executable is ``swtpm``
  and whose command line names the demo's state directory. The pid in ``STATE/pid`` is checked so (a pid file
  left from before a reboot may name any process: it is then ignored, and that process left alone); when it names
  none, the process table is searched with the same check (a lost pid file). Otherwise swtpm is started on the
  first pair of free loopback ports (TPM, control) from 2321/2322 on, and the port is recorded in ``STATE/port``.
- config.toml: a ``[measure]`` table the demo wrote (the comment line ``MARKER`` says so) gets the tcti of the TPM
  in use; a ``[measure]`` table anyone else wrote (a config-management system owns the file) is left as it is,
  and the TPM it names is printed. Nothing else in the file changes (checked by parsing the old and the new
  text), and the file is replaced atomically.

Role: a helper of the demo, not used by kvmrkt itself. Trust boundary: runs as root; believes no pid by itself,
never signals a process, and edits only what it wrote. ``KVMRKT_DEMO_TPM_STATE`` and ``KVMRKT_DEMO_TPM_PORT``
move the state directory and the first port tried (tests).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvmrkt.errors import ConfigError, KvmrktError, TpmUnavailableError
from kvmrkt.host.files import write_atomic
from kvmrkt.host.proc import pid_alive, pid_cmdline

DEFAULT_STATE = Path("/var/lib/kvmrkt/swtpm")
DEFAULT_PORT = 2321
HOST_TPM = Path("/dev/tpmrm0")
NEAR_TRIES = 32  # pairs tried from the first port up (2321, 2323, ...), before pairs the kernel picks
MARKER = "# written by kvmrkt's demo (examples/demo-tpm.sh), which keeps tcti on its TPM; delete this line to stop it"
# What the demo wrote before it marked its table: recognised as its own, and marked when next changed.
LEGACY = ('tcti = "swtpm:host=127.0.0.1,port=2321"', "pcr = 15")
_HEADER = re.compile(r"\s*\[")
_MEASURE = re.compile(r"\s*\[\s*measure\s*\]\s*(#.*)?")
_TCTI = re.compile(r"\s*tcti\s*=")


def say(message: str) -> None:
    for line in message.splitlines():
        print(f"kvmrkt demo: {line}", flush=True)


def swtpm_tcti(port: int) -> str:
    return f"swtpm:host=127.0.0.1,port={port}"


# --- pure: which process is the demo's swtpm, what config.toml becomes ----------------------------------------


def _option(argv: list[str], name: str) -> dict[str, str] | None:
    """swtpm's ``--name k=v,k=v`` option as a dict (None when absent)."""
    try:
        value = argv[argv.index(name) + 1]
    except (ValueError, IndexError):
        return None
    return {key: val for key, _, val in (part.partition("=") for part in value.split(","))}


def swtpm_port(exe: str, argv: list[str], state: Path) -> int | None:
    """The TPM port of a process if it is the demo's swtpm: its executable is swtpm, it runs ``swtpm socket`` with
    ``state`` as its state directory, and it serves the TPM and its control on loopback TCP (None: it is not)."""
    if Path(exe.removesuffix(" (deleted)")).name != "swtpm" or len(argv) < 2 or Path(argv[0]).name != "swtpm" \
            or argv[1] != "socket":
        return None
    tpmstate, server, ctrl = (_option(argv, name) for name in ("--tpmstate", "--server", "--ctrl"))
    if not tpmstate or not tpmstate.get("dir") or os.path.realpath(tpmstate["dir"]) != os.path.realpath(state):
        return None
    ports = []
    for chan in (server, ctrl):
        if not chan or chan.get("type", "tcp") != "tcp" or chan.get("bindaddr", "127.0.0.1") != "127.0.0.1" \
                or not chan.get("port", "").isdigit():
            return None
        ports.append(int(chan["port"]))
    return ports[0]


@dataclass(frozen=True, slots=True)
class ConfigPlan:
    """What to do with config.toml: ``text`` is its new content (None: leave it as it is)."""

    text: str | None
    message: str


def _measure_table(lines: list[str]) -> tuple[int, int] | None:
    """The line indexes of the ``[measure]`` header and of the line after its table (the next header or the end)."""
    for start, line in enumerate(lines):
        if _MEASURE.fullmatch(line.rstrip("\r\n")):
            end = next((i for i in range(start + 1, len(lines)) if _HEADER.match(lines[i])), len(lines))
            return start, end
    return None


def _ours(body: list[str]) -> bool:
    return any(line.strip() == MARKER for line in body) or tuple(s for ln in body if (s := ln.strip())) == LEGACY


def plan_config(old: str, tcti: str, where: str) -> ConfigPlan:
    """How config.toml (``old``: its text, "" when there is none) points kvmrkt at ``tcti``: a ``[measure]``
    table appended when it has none, the tcti of the demo's own table changed, anyone else's table left alone.

    Raises:
        ConfigError: the file is not TOML, or the edit would change anything but ``[measure] tcti`` (not done).
    """
    try:
        doc = tomllib.loads(old)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML ({exc}): the demo does not edit it",
                          hint="fix it (kvmrkt cannot read it either)") from exc
    line = f"tcti = {json.dumps(tcti)}\n"
    measure = doc.get("measure")
    lines = old.splitlines(keepends=True)
    table = _measure_table(lines)
    if measure is None:
        sep = "" if not old or old.endswith("\n\n") else "\n" if old.endswith("\n") else "\n\n"
        new = f"{old}{sep}[measure]\n{MARKER}\n{line}pcr = 15\n"
        plan = ConfigPlan(new, f"wrote [measure] tcti = {json.dumps(tcti)} to {where}")
    elif table is not None and _ours(lines[table[0] + 1:table[1]]):
        start, end = table
        body = lines[start + 1:end]
        marked = any(ln.strip() == MARKER for ln in body)
        if marked and measure.get("tcti") == tcti:
            return ConfigPlan(None, f"{where} already points kvmrkt at this TPM ([measure] tcti = {json.dumps(tcti)})")
        if not marked:
            body.insert(0, MARKER + "\n")
        at = next((i for i, ln in enumerate(body) if _TCTI.match(ln)), None)
        if at is None:
            body.insert(1 + next(i for i, ln in enumerate(body) if ln.strip() == MARKER), line)
        else:
            body[at] = line
        new = "".join(lines[:start + 1] + body + lines[end:])
        was = measure.get("tcti")
        plan = ConfigPlan(new, f"set [measure] tcti = {json.dumps(tcti)} in {where}, in the table the demo wrote "
                               f"(it was {json.dumps(was) if was is not None else 'unset'})" if was != tcti else
                               f"{where} already points kvmrkt at this TPM ([measure] tcti = {json.dumps(tcti)}): "
                               "marked its table as the demo's")
    else:
        named = measure.get("tcti") if isinstance(measure, dict) else None
        what = f"the TPM {json.dumps(named)}" if named else "no TPM (no tcti: kvmrkt uses /dev/tpmrm0 if there is one)"
        note = "" if named == tcti else (
            f"\nthe demo's TPM is {json.dumps(tcti)}: kvmrkt will NOT measure into it unless [measure] tcti names it")
        return ConfigPlan(None, f"{where} has a [measure] table that the demo did not write (no line {MARKER!r} "
                                f"in it): left unchanged\nthat table names {what}{note}")
    expected = copy.deepcopy(doc)
    expected.setdefault("measure", {"pcr": 15})["tcti"] = tcti
    try:
        ok = tomllib.loads(plan.text or "") == expected
    except tomllib.TOMLDecodeError:
        ok = False
    if not ok:
        raise ConfigError(f"the demo cannot set [measure] tcti in {where} without changing something else there "
                          "(an unusual layout of its [measure] table): the file is left as it is",
                          hint=f"set tcti = {json.dumps(tcti)} in its [measure] table by hand")
    return plan


# --- effects: processes, ports, files -------------------------------------------------------------------------


def _demo_swtpm(pid: int, state: Path) -> int | None:
    """The TPM port of ``pid`` if it is a live swtpm of the demo's state directory (else None)."""
    if pid <= 0 or pid == os.getpid() or not pid_alive(pid):
        return None
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return swtpm_port(exe, pid_cmdline(pid), state)


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _pair_free(port: int) -> bool:
    """Whether a TPM port and the control port after it can be bound on loopback (swtpm binds them so too)."""
    if not 0 < port < 65535:
        return False
    for p in (port, port + 1):
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def _candidates(first: int) -> Iterator[int]:
    """``first``, ``first + 2``, ... then pairs the kernel picks (its own choice of a free port, and the next)."""
    yield from range(first, min(first + 2 * NEAR_TRIES, 65534), 2)
    for _ in range(NEAR_TRIES):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        yield port


@dataclass(frozen=True, slots=True)
class Tpm:
    """The demo's emulated TPM: its swtpm's pid and TPM port (the control port is the next one)."""

    pid: int
    port: int


def running(state: Path) -> Tpm | None:
    """The demo's swtpm if one runs: the one its pid file names, checked; else one found in the process table
    (its pid file was lost); a pid file naming anything else is removed, and that process left alone."""
    pidfile = state / "pid"
    with contextlib.suppress(FileNotFoundError):
        text = pidfile.read_text().strip()
        pid = int(text) if text.isdigit() else 0
        port = _demo_swtpm(pid, state)
        if port is not None:
            return Tpm(pid, port)
        say(f"{pidfile} names pid {text or '(none)'}, which is "
            + ("not the demo's swtpm (a pid file from before a reboot, its pid now another process's?): ignoring "
               "it, and leaving that process alone" if pid > 0 and pid_alive(pid) else "not running"))
        pidfile.unlink()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (port := _demo_swtpm(int(entry.name), state)) is not None:
            say(f"found the demo's swtpm by its state directory (pid {entry.name}); its pid file was lost: "
                "writing it again")
            write_atomic(pidfile, f"{entry.name}\n".encode(), 0o644)
            return Tpm(int(entry.name), port)
    return None


def start(state: Path, first: int) -> Tpm:
    """Start swtpm (as a daemon) on the first free pair of loopback ports from ``first`` on.

    Raises:
        TpmUnavailableError: it did not start (its log says why), or no ports were free.
    """
    log, busy = state / "log", []
    for port in _candidates(first):
        if not _pair_free(port):
            busy.append(port)
            continue
        if busy:
            say(f"127.0.0.1 port(s) {', '.join(f'{p}/{p + 1}' for p in busy[:4])}{' ...' if len(busy) > 4 else ''} "
                "in use by other programs (not the demo's TPM): using another pair")
            busy = []
        argv = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}", "--server", f"type=tcp,port={port}",
                "--ctrl", f"type=tcp,port={port + 1}", "--flags", "not-need-init,startup-clear", "--daemon",
                "--pid", f"file={state / 'pid'}", "--log", f"file={log}"]
        print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)
        offset = log.stat().st_size if log.exists() else 0
        with tempfile.TemporaryFile() as err:
            # (a file, not a pipe: the daemon must hold nothing of ours open, or this would wait for it)
            rc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                check=False, timeout=60).returncode
            err.seek(0)
            why = err.read().decode(errors="replace")
        with contextlib.suppress(OSError), log.open("rb") as fh:
            fh.seek(offset)
            why += fh.read().decode(errors="replace")
        if rc != 0:
            if "Address already in use" in why:  # taken since it was checked: the next pair
                say(f"127.0.0.1:{port}/{port + 1} was taken meanwhile: trying the next pair")
                continue
            raise TpmUnavailableError(f"swtpm did not start (exit status {rc}): {why.strip()[-2000:] or 'no message'}",
                                      hint=f"its log: {log}")
        text = (state / "pid").read_text().strip() if (state / "pid").exists() else ""
        pid = int(text) if text.isdigit() else 0
        if _demo_swtpm(pid, state) != port:
            raise TpmUnavailableError(f"swtpm started but {state / 'pid'} does not name it ({text!r})",
                                      hint=f"its log: {log}")
        _wait_answers(pid, port)
        return Tpm(pid, port)
    raise TpmUnavailableError(f"no free pair of loopback ports for swtpm from {first} on",
                              hint="set KVMRKT_DEMO_TPM_PORT to a free port (the next one must be free too)")


def _wait_answers(pid: int, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not _answers(port):
        if time.monotonic() > deadline:
            raise TpmUnavailableError(f"the demo's EMULATED TPM (swtpm pid {pid}) does not answer on 127.0.0.1:{port}",
                                      hint=f"stop it (kill {pid}) and run the demo again")
        time.sleep(0.05)


def ensure_emulated(state: Path, first: int) -> Tpm:
    """The demo's emulated TPM: the running one, or a new one; its port is recorded in ``STATE/port``."""
    tpm = running(state)
    if tpm is not None:
        _wait_answers(tpm.pid, tpm.port)
        say(f"this host has no TPM; using the EMULATED TPM already running: swtpm pid {tpm.pid} on "
            f"127.0.0.1:{tpm.port} (state {state}) -- measurements are not hardware-backed")
    else:
        say("this host has no TPM; starting an EMULATED TPM (swtpm) -- measurements are not hardware-backed")
        tpm = start(state, first)
        say(f"started the EMULATED TPM: swtpm pid {tpm.pid} on 127.0.0.1:{tpm.port} (control {tpm.port + 1}, "
            f"state {state}, left running)")
    write_atomic(state / "port", f"{tpm.port}\n".encode(), 0o600)
    return tpm


def apply_config(path: Path, tcti: str) -> None:
    """Point config.toml's ``[measure]`` table at ``tcti`` when the demo owns it (``plan_config``); atomically,
    keeping the file's mode and owner (a symlink is followed: its target is the file that is replaced)."""
    path = path.resolve()
    try:
        old = path.read_text()
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        old, st = "", None
    plan = plan_config(old, tcti, str(path))
    if plan.text is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, plan.text.encode(), stat.S_IMODE(st.st_mode) if st else 0o644)
        if st and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
            os.chown(path, st.st_uid, st.st_gid)
    say(plan.message)


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    """One demo at a time per state directory (two would each start a swtpm); the directory is root's own."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    with open(state / "demo.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or args[:1] in (["-h"], ["--help"]):
        print("usage: examples/demo-tpm.sh [CONFIG_DIR]   (default /etc/kvmrkt)", file=sys.stderr)
        return 2
    config = Path(args[0] if args else "/etc/kvmrkt") / "config.toml"
    state = Path(os.environ.get("KVMRKT_DEMO_TPM_STATE") or DEFAULT_STATE).absolute()
    port = os.environ.get("KVMRKT_DEMO_TPM_PORT") or str(DEFAULT_PORT)
    if not port.isdigit() or not 0 < int(port) < 65535:
        print(f"kvmrkt demo: KVMRKT_DEMO_TPM_PORT={port!r} is not a port number (1-65534)", file=sys.stderr)
        return 2
    try:
        if HOST_TPM.exists():
            say(f"using the host's TPM ({HOST_TPM})")
            apply_config(config, f"device:{HOST_TPM}")
            return 0
        with _locked(state):
            tpm = ensure_emulated(state, int(port))
            apply_config(config, swtpm_tcti(tpm.port))
    except KvmrktError as exc:
        print(f"kvmrkt demo: {exc.diagnostics()}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
