"""Measurement events and the append-only event log (TCG Canonical Event Log, JSON encoding, as JSON-SEQ).

Role: define what kvmrkt measures and how it is written down. Every event is ``kvmrkt:<kind>:`` followed by
canonical JSON (sorted keys, no whitespace, UTF-8: RFC 8785 for the values kvmrkt emits); its SHA-256 is what
the PCR is extended with, and the exact bytes are in the log so anyone can recompute the digest. One log per
TPM reset cycle (``[measure] log_dir/<boot_id>.cel``, one directory for every data directory on the host: the PCR
is the host's). Its first record (not extended) names the boot, the PCR, the TPM's reset and restart counters
and the PCR's *reset value* (zero): a log proves the PCR's whole history since the TPM was reset, never a
history that starts where someone chose. Records are appended and fsynced under an exclusive lock *before* the
PCR is extended; a record whose extend failed is followed by a ``void`` record (not extended) so later replays
still match. A PCR found holding anything other than what the log says is written down as a ``pcr-mismatch``
record (tamper evidence, not extended: the chain continues from the value found, and no verifier accepts a log
holding one); a TPM resumed with its PCRs kept gets a ``tpm-restart`` record with the new counters; a TPM
reset (the counters say so) ends the log (renamed ``<boot_id>.cel.<time>.ended``, kept) and starts a new one.

Trust boundary: the log file is evidence for a remote verifier, who trusts nothing in it until it replays to a
quoted PCR value; locally it is written only by kvmrkt (0600, root).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmrkt import jsondoc
from kvmrkt.errors import EventLogError

DOMAIN = "kvmrkt"
RS = b"\x1e"
CONTENT_TYPE = "kvmrkt"
LOG_START = "kvmrkt-log-start"
VOID = "kvmrkt-void"
MISMATCH = "kvmrkt-pcr-mismatch"
RESTART = "kvmrkt-tpm-restart"
RESET_VALUE = bytes(32)  # PCRs 0-15 after TPM2_Startup(CLEAR), the only ones kvmrkt measures into


@dataclass(frozen=True, slots=True)
class TpmClock:
    """The TPM's own clock and counters (TPMS_CLOCK_INFO): ``reset_count`` grows at every TPM reset (host boot,
    emulator restart), ``restart_count`` at every restart or resume since; PCRs 0-15 start from zero at each."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool

    @property
    def cycle(self) -> tuple[int, int]:
        """The reset cycle: (resetCount, restartCount)."""
        return self.reset_count, self.restart_count

    def to_dict(self) -> dict[str, Any]:
        return {"clock": self.clock, "resetCount": self.reset_count, "restartCount": self.restart_count,
                "safe": self.safe}


def canonical(value: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no insignificant whitespace, UTF-8)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class Event:
    """One measured fact: ``kind`` (stage1, app, pod-manifest, trust, insecure) and its data."""

    kind: str
    data: dict[str, Any]

    def encode(self) -> bytes:
        """The exact bytes that are hashed: ``kvmrkt:<kind>:<canonical json>``."""
        return f"{DOMAIN}:{self.kind}:".encode() + canonical(self.data)

    def digest(self) -> bytes:
        """SHA-256 of ``encode()``: what the PCR is extended with."""
        return hashlib.sha256(self.encode()).digest()


def boot_id() -> str:
    """This host boot's id (the log is per boot: PCRs start from scratch at each boot)."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def encode_record(recnum: int, pcr: int, content_type: str, content: dict[str, Any], digest: bytes | None) -> bytes:
    rec: dict[str, Any] = {"recnum": recnum, "pcr": pcr, "content_type": content_type, "content": content,
                           "digests": [{"hashAlg": "sha256", "digest": digest.hex()}] if digest else []}
    return RS + canonical(rec) + b"\n"


def parse_log(data: bytes) -> list[dict[str, Any]]:
    """Split a JSON-SEQ log into records. A torn record (no final newline: a crash in the middle of writing it,
    before its extend, which only follows a complete, fsynced record) is not part of the history and is skipped,
    wherever later appends left it; hiding a complete record that way cannot help anyone, since its extend is in
    the PCR and the replay would no longer match.

    Raises:
        EventLogError: a record that is not a JSON object.
    """
    records = []
    chunks = data.split(RS)
    if chunks and chunks[0].strip():
        raise EventLogError("event log does not start with a record separator (not JSON-SEQ)")
    for i, chunk in enumerate(chunks[1:]):
        if not chunk.endswith(b"\n"):
            continue
        try:
            rec = jsondoc.loads(chunk)
        except ValueError as exc:
            raise EventLogError(f"event log record {i} is not valid JSON: {exc}") from exc
        if not isinstance(rec, dict):
            raise EventLogError(f"event log record {i} is not an object")
        records.append(rec)
    return records


class EventLog:
    """The append-only log of one host boot."""

    def __init__(self, directory: Path, boot: str | None = None) -> None:
        self.path = directory / f"{boot or boot_id()}.cel"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the log's lock: appends and the matching extends happen inside one such block."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def records(self) -> list[dict[str, Any]]:
        """All complete records (empty when the log does not exist yet)."""
        try:
            return parse_log(self.path.read_bytes())
        except FileNotFoundError:
            return []

    def _append(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def start(self, pcr: int, tpm: str, clock: TpmClock, *, previous: str | None = None, why: str = "") -> None:
        """Write the first record of a new log (call with the lock held): the PCR from its reset value, in the
        TPM's current reset cycle. ``previous`` names the log this one follows, ``why`` says why it ended."""
        content = {"boot_id": self.path.stem, "pcr": pcr, "hashAlg": "sha256", "initial": RESET_VALUE.hex(),
                   "tpm": tpm, **clock.to_dict(), "started": time.time(),
                   "format": "TCG CEL JSON, JSON-SEQ (RFC 7464)",
                   **({"previous_log": previous, "previous_ended": why} if previous else {})}
        self._append(encode_record(0, pcr, LOG_START, content, None))

    def end(self) -> Path:
        """Rename the log of an ended reset cycle out of the way (call with the lock held); it is kept."""
        target = self.path.with_name(f"{self.path.name}.{time.strftime('%Y%m%dT%H%M%S')}.ended")
        os.rename(self.path, target)
        return target

    def mismatch(self, pcr: int, expected: bytes, found: bytes, clock: TpmClock) -> None:
        """Record that the PCR holds ``found`` where the log leads to ``expected`` (tamper evidence; later
        records chain from ``found``)."""
        content = {"expected": expected.hex(), "found": found.hex(), **clock.to_dict(), "detected": time.time(),
                   "meaning": "the PCR was extended outside kvmrkt (or this log was edited): its history is no "
                              "longer proven by this log"}
        self._append(encode_record(self._next_recnum(), pcr, MISMATCH, content, None))

    def restart(self, pcr: int, clock: TpmClock) -> None:
        """Record a TPM restart or resume that kept the PCR (its new counters)."""
        self._append(encode_record(self._next_recnum(), pcr, RESTART, {**clock.to_dict(), "noted": time.time()},
                                   None))

    def _next_recnum(self) -> int:
        """The next record number, from the last complete record (read from the end: the log only grows)."""
        try:
            with self.path.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(0, size - (1 << 20)))
                tail = fh.read()
        except FileNotFoundError:
            tail = b""
        # Only the last complete record is parsed (a torn one after it, from a crash mid-write, is skipped as
        # parse_log skips it): re-parsing the whole tail made each append cost up to 1 MiB of JSON parsing.
        start = tail.rfind(RS)
        if start >= 0 and not tail.endswith(b"\n"):
            start = tail.rfind(RS, 0, start)
        records = parse_log(tail[start:]) if start >= 0 else []
        if not records:
            raise EventLogError(f"{self.path}: the log has no start record")
        return int(records[-1]["recnum"]) + 1

    def append(self, pcr: int, event: Event) -> int:
        """Append one event (call with the lock held, before extending); returns its record number."""
        recnum = self._next_recnum()
        content = {"event": event.encode().decode(), "kind": event.kind}
        self._append(encode_record(recnum, pcr, CONTENT_TYPE, content, event.digest()))
        return recnum

    def void(self, pcr: int, recnum: int, reason: str) -> None:
        """Mark a record whose extend failed (not extended itself)."""
        nxt = self._next_recnum()
        self._append(encode_record(nxt, pcr, VOID, {"voids": recnum, "reason": reason}, None))


def launch_events(
    *, pod: str, manifest: bytes, apps: list[dict[str, Any]], trust: dict[str, Any], stage1: dict[str, Any],
    insecure: list[str], dependencies: list[dict[str, Any]] | None = None, when: float | None = None,
) -> list[Event]:
    """The events of one pod launch, in measurement order: the VM (stage1 assets, kernel command line), each
    image an app's files are built from besides its own (appc dependencies: digest, the name it was judged as,
    its signers), each app (its image's digest, judged name and signers, the digest of the root filesystem
    image the VM reads), the pod manifest (digest of its canonical JSON), the trust decisions, and any insecure
    options in effect."""
    events = [
        Event("stage1", {"pod": pod, "time": int(when if when is not None else time.time()),
                         **{k: stage1[k] for k in sorted(stage1)},
                         "cmdline_digest": "sha256:" + hashlib.sha256(str(stage1.get("cmdline", "")).encode())
                         .hexdigest()}),
        *(Event("dependency", {"pod": pod, **dep}) for dep in dependencies or ()),
        *(Event("app", {"pod": pod, **app}) for app in apps),
        Event("pod-manifest", {"pod": pod, "digest": "sha256:" + hashlib.sha256(manifest).hexdigest()}),
        Event("trust", {"pod": pod, **trust}),
    ]
    if insecure:
        events.append(Event("insecure", {"pod": pod, "options": sorted(insecure)}))
    return events
