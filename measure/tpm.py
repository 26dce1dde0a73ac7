"""The host TPM, through tpm2-pytss (ESAPI), and the measurer that extends it in step with the event log.

Role: the only module that talks to the TPM. ``Measurer.measure(events)`` takes the log lock, writes the log's
start record on first use (with the PCR value found then; a log whose replay no longer equals the PCR, after a
TPM reset or a foreign extend, is set aside and a new one started, naming it), and for each event appends +
fsyncs the record, then extends the PCR with the event's SHA-256. Any TPM error is a ``TpmUnavailableError``
and the launch stops (fail closed); an event whose extend failed is voided in the log. Trust boundary: the TPM
is trusted hardware (or swtpm, clearly labelled as emulated); the TCTI string comes from root-owned config.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvmrkt.errors import ConfigError, TpmUnavailableError
from measure.events import Event, EventLog
from measure.replay import replay

FORBIDDEN_PCRS = range(16, 23)


def check_pcr(pcr: int) -> int:
    """Validate the configured PCR.

    Raises:
        ConfigError: 16 (debug, resettable by anyone at locality 0) and 17-22 (DRTM, locality 4 only).
    """
    if not 0 <= pcr <= 23:
        raise ConfigError(f"measure.pcr {pcr} is not a PCR (0-23)")
    if pcr in FORBIDDEN_PCRS:
        why = "resettable at locality 0 by anyone with TPM access" if pcr == 16 else "reserved for DRTM (locality 4)"
        raise ConfigError(f"measure.pcr {pcr} cannot be used: PCR {pcr} is {why}",
                          hint="use 15 (the default, rkt's choice) or 23 (application PCR, also resettable)")
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


class Measurer:
    """Extends one PCR with events, logging each first."""

    def __init__(self, tcti: str, pcr: int, log_dir: Path) -> None:
        self.tcti = tcti
        self.pcr = check_pcr(pcr)
        self.log = EventLog(log_dir)
        self.set_aside: Path | None = None

    def measure(self, events: list[Event]) -> list[int]:
        """Log and extend every event, in order; returns their record numbers.

        Raises:
            TpmUnavailableError: the TPM failed (records not extended are voided).
        """
        pytss = _pytss()
        handle = getattr(pytss.ESYS_TR, f"PCR{self.pcr}")
        recnums: list[int] = []
        with self.log.locked(), esapi(self.tcti) as ctx:
            current = _read(ctx, self.pcr)
            if self.log.path.exists() and self.log.path.stat().st_size:
                rep = replay(self.log.records())
                if rep.pcr != self.pcr or rep.final != current:
                    # The TPM was reset (an emulator restarted within this host boot) or something else
                    # extended the PCR: this log no longer describes it. Keep it, start one that does.
                    self.set_aside = self.log.set_aside()
            self.log.start(self.pcr, current, previous=self.set_aside.name if self.set_aside else None)
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
