"""The host TPM, through tpm2-pytss (ESAPI), and the measurer that extends it in step with the event log.

Role: the only module that talks to the TPM. ``Measurer.measure(events)`` takes the log lock and first
reconciles the log with the TPM (``sync``): a new log starts from the PCR's reset value in the TPM's current
reset cycle (its resetCount/restartCount); a TPM reset (the counters moved, the PCR was not kept) ends the
old log and starts a new one naming it; a resume that kept the PCR is noted; and a PCR that holds anything
else than the log leads to is recorded as a ``pcr-mismatch`` (tamper evidence: never a silent fresh start).
Then for each event it appends + fsyncs the record, then extends the PCR with the event's SHA-256. Any TPM
error is a ``TpmUnavailableError`` and the launch stops (fail closed); an event whose extend failed is voided
in the log. Trust boundary: the TPM is trusted hardware (or swtpm, clearly labelled as emulated); the TCTI
string comes from root-owned config.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvmrkt.errors import ConfigError, EventLogError, TpmUnavailableError
from measure.events import RESET_VALUE, Event, EventLog, TpmClock
from measure.replay import replay


def check_pcr(pcr: int) -> int:
    """Validate the configured PCR: only 0-15 are reset by nothing but a TPM reset, so only they can prove
    their whole history.

    Raises:
        ConfigError: 16 and 23 (resettable at locality 0 by anyone with TPM access: a reset erases history
        without the TPM's counters noticing) and 17-22 (DRTM, locality 4 only).
    """
    if not 0 <= pcr <= 23:
        raise ConfigError(f"measure.pcr {pcr} is not a PCR (0-23)")
    if pcr >= 16:
        why = "reserved for DRTM (locality 4)" if 17 <= pcr <= 22 else \
            "resettable at locality 0 by anyone with TPM access, so it cannot prove its history"
        raise ConfigError(f"measure.pcr {pcr} cannot be used: PCR {pcr} is {why}",
                          hint="use 15 (the default, rkt's choice), or another of 8-15 that nothing else on the "
                               "host extends")
    return pcr


def _pytss() -> Any:
    """tpm2_pytss, imported lazily (and quietly: it imports cryptography names that are deprecated)."""
    os.environ.setdefault("TSS2_LOG", "all+NONE")  # the TSS logs expected misses (absent NV indices) on stderr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import tpm2_pytss
    return tpm2_pytss


@contextlib.contextmanager
def esapi(tcti: str) -> Iterator[Any]:
    """An ESAPI context for one operation.

    Raises:
        TpmUnavailableError: the TCTI cannot be opened.
    """
    pytss = _pytss()
    ESAPI, TSS2_Exception = pytss.ESAPI, pytss.TSS2_Exception
    try:
        ctx = ESAPI(tcti)
    except (TSS2_Exception, OSError, RuntimeError) as exc:
        raise TpmUnavailableError(f"cannot open the TPM ({tcti}): {exc}",
                                  hint="check [measure] tcti in config.toml, or run with --insecure-options=tpm "
                                       "(the pod then runs unmeasured)") from exc
    try:
        yield ctx
    except TSS2_Exception as exc:
        raise TpmUnavailableError(f"the TPM ({tcti}) failed: {exc}") from exc
    finally:
        ctx.close()


def _read(ctx: Any, pcr: int) -> bytes:
    _upd, _sel, values = ctx.pcr_read(_pytss().TPML_PCR_SELECTION.parse(f"sha256:{pcr}"))
    if len(values) != 1:
        raise TpmUnavailableError(f"the TPM has no sha256 bank for PCR {pcr}")
    return bytes(values[0])


def pcr_read(tcti: str, pcr: int) -> bytes:
    """The current SHA-256 value of one PCR."""
    with esapi(tcti) as ctx:
        return _read(ctx, pcr)


def _clock(ctx: Any) -> TpmClock:
    info = ctx.read_clock().clockInfo
    return TpmClock(int(info.clock), int(info.resetCount), int(info.restartCount), bool(info.safe))


def read_clock(tcti: str) -> TpmClock:
    """The TPM's clock and reset/restart counters (TPM2_ReadClock)."""
    with esapi(tcti) as ctx:
        return _clock(ctx)


class Measurer:
    """Extends one PCR with events, logging each first."""

    def __init__(self, tcti: str, pcr: int, log_dir: Path) -> None:
        self.tcti = tcti
        self.pcr = check_pcr(pcr)
        self.log = EventLog(log_dir)
        self.ended: tuple[Path, str] | None = None  # a log this call ended, and why
        self.mismatch: tuple[bytes, bytes] | None = None  # (expected, found) recorded by this call

    def sync(self, ctx: Any) -> None:
        """Bring the log in step with the TPM (call with the log lock held and an open ESAPI context)."""
        current, clock = _read(ctx, self.pcr), _clock(ctx)
        try:
            rep = replay(self.log.records()) if self.log.path.exists() and self.log.path.stat().st_size else None
        except EventLogError as exc:
            raise EventLogError(
                f"the measurement log {self.log.path} is damaged ({exc.message}): kvmrkt does not measure into a "
                "log it cannot replay",
                hint="keep it as evidence (move it aside); the next launch starts a new log, which records the "
                     "PCR's unexplained value as tamper evidence") from exc
        why = ""
        if rep is not None:
            if rep.pcr != self.pcr or rep.tpm != self.tcti:
                why = f"the measurement TPM or PCR changed (was {rep.tpm or '?'} PCR {rep.pcr})"
            elif rep.cycle != clock.cycle:
                if rep.cycle is not None and clock.reset_count == rep.cycle[0] and current == rep.final:
                    self.log.restart(self.pcr, clock)  # resumed with its PCRs kept: same history
                else:
                    why = f"the TPM was reset (resetCount, restartCount {rep.cycle} -> {clock.cycle})"
            if why:
                self.ended = (self.log.end(), why)
                rep = None
        if rep is None:
            self.log.start(self.pcr, self.tcti, clock, previous=self.ended[0].name if self.ended else None,
                           why=why)
        expected = rep.final if rep is not None else RESET_VALUE
        if current != expected:
            self.log.mismatch(self.pcr, expected, current, clock)
            self.mismatch = (expected, current)

    def check(self) -> None:
        """Reconcile the log with the TPM without measuring anything (before a quote)."""
        with self.log.locked(), esapi(self.tcti) as ctx:
            self.sync(ctx)

    def measure(self, events: list[Event]) -> list[int]:
        """Log and extend every event, in order; returns their record numbers.

        Raises:
            TpmUnavailableError: the TPM failed (records not extended are voided).
        """
        pytss = _pytss()
        handle = getattr(pytss.ESYS_TR, f"PCR{self.pcr}")
        recnums: list[int] = []
        with self.log.locked(), esapi(self.tcti) as ctx:
            self.sync(ctx)
            for event in events:
                recnum = self.log.append(self.pcr, event)
                ha = pytss.TPMT_HA(hashAlg=pytss.TPM2_ALG.SHA256)
                ha.digest.sha256 = event.digest()
                try:
                    ctx.pcr_extend(handle, pytss.TPML_DIGEST_VALUES([ha]))
                except Exception as exc:
                    self.log.void(self.pcr, recnum, f"extend failed: {exc}")
                    raise TpmUnavailableError(f"extending PCR {self.pcr} failed: {exc}") from exc
                recnums.append(recnum)
        return recnums
