"""Pure replay of a kvmrkt event log: recompute each event's digest and the PCR value it leads to.

Role: the check a verifier runs on evidence from a machine it does not trust. Every record is checked
(contiguous record numbers, one PCR, digests that equal SHA-256 of the recorded event bytes, the ``kvmrkt:``
domain prefix, voids that point backwards at extended records), then ``PCR = SHA256(PCR || digest)`` is
folded from the log's start. A log is *proven* only when it starts from the PCR's reset value and holds no
``pcr-mismatch`` record: only then does a quoted value that the replay reaches show every extend of the PCR
since the TPM was reset. No I/O. Trust boundary: the log is attacker-controlled input.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from kvmrkt.errors import EventLogError
from measure.events import CONTENT_TYPE, DOMAIN, LOG_START, MISMATCH, RESET_VALUE, RESTART, VOID


@dataclass
class Replay:
    """The outcome of a replay.

    ``steps``: the PCR value after each extended record or mismatch, with the number of events before it
    (the first step is the start); ``mismatches``: the pcr-mismatch records (tamper evidence); ``cycle``: the
    TPM (resetCount, restartCount) the log was last written in.
    """

    pcr: int
    initial: bytes
    boot_id: str
    cycle: tuple[int, int] | None = None
    tpm: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    steps: list[tuple[bytes, int]] = field(default_factory=list)
    mismatches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> bytes:
        """The PCR value the whole log leads to."""
        return self.steps[-1][0] if self.steps else self.initial

    @property
    def values(self) -> list[bytes]:
        return [v for v, _n in self.steps]

    @property
    def proven(self) -> bool:
        """The log starts at the PCR's reset value and nothing outside it touched the PCR."""
        return self.initial == RESET_VALUE and not self.mismatches

    def attested(self, quoted: bytes) -> int | None:
        """How many events a quoted PCR value covers (None: the log never reaches it). Records after the quote
        may already be in the log: they are written before they are extended."""
        for value, count in self.steps:
            if value == quoted:
                return count
        return None


def _counters(content: dict[str, Any], where: str) -> tuple[int, int] | None:
    reset, restart = content.get("resetCount"), content.get("restartCount")
    if reset is None and restart is None:
        return None
    if not isinstance(reset, int) or not isinstance(restart, int) or isinstance(reset, bool) \
            or isinstance(restart, bool):
        raise EventLogError(f"{where}: malformed TPM counters")
    return reset, restart


def _hex32(value: Any, where: str) -> bytes:
    try:
        out = bytes.fromhex(value)
    except (TypeError, ValueError) as exc:
        raise EventLogError(f"{where}: not a hex SHA-256 value") from exc
    if len(out) != 32:
        raise EventLogError(f"{where}: not a SHA-256 value")
    return out


def replay(records: list[dict[str, Any]]) -> Replay:
    """Check and replay a log.

    Raises:
        EventLogError: naming the first broken record.
    """
    if not records or records[0].get("content_type") != LOG_START or records[0].get("recnum") != 0:
        raise EventLogError("the log does not begin with its start record")
    start = records[0].get("content")
    if not isinstance(start, dict):
        raise EventLogError("malformed start record")
    try:
        pcr = int(start["pcr"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EventLogError(f"malformed start record: {exc}") from exc
    initial = _hex32(start.get("initial"), "start record")
    if start.get("hashAlg") != "sha256":
        raise EventLogError("the start record must give a sha256 initial value")
    out = Replay(pcr, initial, str(start.get("boot_id", "")), _counters(start, "start record"),
                 str(start.get("tpm", "")))
    # First pass: check every record; collect what voids point at (they point backwards).
    checked: list[tuple[str, int, Any]] = []
    extended: set[int] = set()
    voided: set[int] = set()
    for expect, rec in enumerate(records):
        if rec.get("recnum") != expect:
            raise EventLogError(f"record {expect}: record number {rec.get('recnum')!r} (reordered, removed or "
                                "injected records)")
        if rec.get("pcr") != pcr:
            raise EventLogError(f"record {expect}: PCR {rec.get('pcr')!r}, the log is for PCR {pcr}")
        if expect == 0:
            continue
        kind = rec.get("content_type")
        content = rec.get("content")
        if not isinstance(content, dict):
            raise EventLogError(f"record {expect}: malformed content")
        if kind != CONTENT_TYPE and rec.get("digests"):
            raise EventLogError(f"record {expect}: a {kind} record is never extended")
        if kind == VOID:
            target = content.get("voids")
            if target not in extended or target in voided:
                raise EventLogError(f"record {expect}: invalid void record")
            voided.add(target)
        elif kind == MISMATCH:
            found = _hex32(content.get("found"), f"record {expect}")
            checked.append((MISMATCH, expect, {**content, "recnum": expect, "found_value": found}))
        elif kind == RESTART:
            cycle = _counters(content, f"record {expect}")
            if cycle is None:
                raise EventLogError(f"record {expect}: a restart record without counters")
            checked.append((RESTART, expect, cycle))
        elif kind == CONTENT_TYPE:
            event = content.get("event")
            digests = rec.get("digests") or []
            if not isinstance(event, str) or not event.startswith(f"{DOMAIN}:"):
                raise EventLogError(f"record {expect}: event is not in the {DOMAIN}: domain")
            if len(digests) != 1 or not isinstance(digests[0], dict) or digests[0].get("hashAlg") != "sha256":
                raise EventLogError(f"record {expect}: expected exactly one sha256 digest")
            digest = hashlib.sha256(event.encode()).digest()
            if digests[0].get("digest") != digest.hex():
                raise EventLogError(f"record {expect}: recorded digest does not match the event bytes (edited log)")
            extended.add(expect)
            checked.append((CONTENT_TYPE, expect, {"recnum": expect, "event": event, "digest": digest}))
        else:
            raise EventLogError(f"record {expect}: unknown content type {kind!r}")
    # Second pass: fold the PCR in record order.
    value = initial
    out.steps.append((value, 0))
    for kind, recnum, item in checked:
        if kind == CONTENT_TYPE:
            if recnum in voided:
                continue
            value = hashlib.sha256(value + item["digest"]).digest()
            out.events.append(item)
        elif kind == MISMATCH:
            value = item.pop("found_value")
            out.mismatches.append({**item, "after_events": len(out.events)})
        else:
            out.cycle = item
            continue
        out.steps.append((value, len(out.events)))
    return out


def matches(rep: Replay, quoted: bytes) -> bool:
    """True when the quoted PCR equals the replayed value after some prefix of the log."""
    return rep.attested(quoted) is not None
