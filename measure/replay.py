"""Pure replay of a kvmrkt event log: recompute each event's digest and the PCR value it leads to.

Role: the check a verifier runs on evidence from a machine it does not trust. Every record is checked
(contiguous record numbers, one PCR, digests that equal SHA-256 of the recorded event bytes, the ``kvmrkt:``
domain prefix, voids that point backwards at extended records), then ``PCR = SHA256(PCR || digest)`` is
folded from the log's recorded initial value. No I/O. Trust boundary: the log is attacker-controlled input.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from kvmrkt.errors import EventLogError
from measure.events import CONTENT_TYPE, DOMAIN, LOG_START, VOID


@dataclass
class Replay:
    """The outcome of a replay: the PCR after every extended record, and the events kept."""

    pcr: int
    initial: bytes
    boot_id: str
    values: list[bytes] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> bytes:
        """The PCR value after the last extended record."""
        return self.values[-1] if self.values else self.initial


def replay(records: list[dict[str, Any]]) -> Replay:
    """Check and replay a log.

    Raises:
        EventLogError: naming the first broken record.
    """
    if not records or records[0].get("content_type") != LOG_START or records[0].get("recnum") != 0:
        raise EventLogError("the log does not begin with its start record")
    start = records[0]["content"]
    try:
        pcr, initial = int(start["pcr"]), bytes.fromhex(start["initial"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EventLogError(f"malformed start record: {exc}") from exc
    if len(initial) != 32 or start.get("hashAlg") != "sha256":
        raise EventLogError("the start record must give a sha256 initial value")
    out = Replay(pcr, initial, str(start.get("boot_id", "")))
    value = initial
    extended: dict[int, int] = {}  # recnum -> index in events
    voided: set[int] = set()
    for expect, rec in enumerate(records):
        if rec.get("recnum") != expect:
            raise EventLogError(f"record {expect}: record number {rec.get('recnum')!r} (reordered, removed or "
                                "injected records)")
        if rec.get("pcr") != pcr:
            raise EventLogError(f"record {expect}: PCR {rec.get('pcr')!r}, the log is for PCR {pcr}")
        kind = rec.get("content_type")
        if expect == 0:
            continue
        if kind == VOID:
            target = rec.get("content", {}).get("voids")
            if target not in extended or target in voided or rec.get("digests"):
                raise EventLogError(f"record {expect}: invalid void record")
            voided.add(target)
            continue
        if kind != CONTENT_TYPE:
            raise EventLogError(f"record {expect}: unknown content type {kind!r}")
        content = rec.get("content") or {}
        event = content.get("event")
        digests = rec.get("digests") or []
        if not isinstance(event, str) or not event.startswith(f"{DOMAIN}:"):
            raise EventLogError(f"record {expect}: event is not in the {DOMAIN}: domain")
        if len(digests) != 1 or digests[0].get("hashAlg") != "sha256":
            raise EventLogError(f"record {expect}: expected exactly one sha256 digest")
        digest = hashlib.sha256(event.encode()).digest()
        if digests[0].get("digest") != digest.hex():
            raise EventLogError(f"record {expect}: recorded digest does not match the event bytes (edited log)")
        extended[expect] = len(out.events)
        out.events.append({"recnum": expect, "event": event, "digest": digest})
    for rec in out.events:
        if rec["recnum"] in voided:
            continue
        value = hashlib.sha256(value + rec["digest"]).digest()
        out.values.append(value)
    out.events = [e for e in out.events if e["recnum"] not in voided]
    return out


def matches(rep: Replay, quoted: bytes) -> bool:
    """True when the quoted PCR equals the replayed value after some prefix of the log (records after the
    quote may already be in the log: they are written before they are extended)."""
    return quoted == rep.initial or quoted in rep.values
