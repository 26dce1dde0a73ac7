"""This host's measurement evidence: the event log checked against the TPM, and quotes for a verifier.

Role: the operator's and the security team's local view (``kvmrkt attest log|init|quote``). ``event_log``
replays a log and says whether it *proves* the PCR's history (it starts from the reset value and holds no
pcr-mismatch record) and whether the TPM's PCR and reset cycle still match it. ``quote`` first reconciles the
log with the TPM under the log lock (a PCR moved by someone else is recorded as tamper evidence right then, so
the evidence handed out says so), then quotes. Trust boundary: the log and the TPM are this host's; what comes
out is evidence that a remote verifier (``measure.attest.verify``) checks without trusting this host.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from kvmrkt.config import RuntimeConfig
from kvmrkt.errors import ConfigError, EventLogError, TpmUnavailableError
from measure.events import EventLog, boot_id, parse_log
from measure.replay import replay
from measure.tpm import Measurer, pcr_read, read_clock


def _tcti(config: RuntimeConfig) -> str:
    if not config.measure.tcti:
        raise TpmUnavailableError("no TPM is configured", hint="set [measure] tcti in config.toml")
    return config.measure.tcti


def log_path(config: RuntimeConfig) -> Path:
    """This boot's measurement log."""
    return EventLog(config.measure.log_dir).path


def event_log(config: RuntimeConfig, path: Path | None) -> dict[str, Any]:
    """Check and replay an event log (default: this boot's) and compare it with the TPM.

    Raises:
        EventLogError: the log does not check (naming the first broken record).
    """
    path = path or log_path(config)
    try:
        records = parse_log(path.read_bytes())
    except FileNotFoundError as exc:
        raise EventLogError(f"no event log at {path} (nothing was measured this boot)") from exc
    rep = replay(records)
    info: dict[str, Any] = {
        "path": str(path), "boot_id": rep.boot_id, "pcr": rep.pcr, "initial": rep.initial.hex(),
        "cycle": list(rep.cycle) if rep.cycle else None, "replayed": rep.final.hex(), "proven": rep.proven,
        "mismatches": [{k: m.get(k) for k in ("recnum", "expected", "found", "detected", "after_events")}
                       for m in rep.mismatches],
        "events": [{"recnum": e["recnum"], "digest": e["digest"].hex(), "event": e["event"]} for e in rep.events],
    }  # fmt: skip
    if config.measure.tcti and rep.boot_id == boot_id() and rep.tpm == config.measure.tcti:
        with contextlib.suppress(TpmUnavailableError):
            value, clock = pcr_read(config.measure.tcti, rep.pcr), read_clock(config.measure.tcti)
            info["tpm"] = value.hex()
            info["tpm_cycle"] = list(clock.cycle)
            info["matches"] = value == rep.final and clock.cycle == rep.cycle
    return info


def attest_init(config: RuntimeConfig, out_dir: Path) -> tuple[Path, Path]:
    """Write ak.pem and ek.pem."""
    from measure import attest

    return attest.init(_tcti(config), out_dir)


def attest_quote(config: RuntimeConfig, nonce_hex: str, tpm2_tools_dir: Path | None) -> dict[str, Any]:
    """Evidence over the measurement PCR for a verifier's nonce (the log reconciled with the TPM first)."""
    from measure import attest

    try:
        nonce = bytes.fromhex(nonce_hex)
    except ValueError as exc:
        raise ConfigError("--nonce must be hex") from exc
    measurer = Measurer(_tcti(config), config.measure.pcr, config.measure.log_dir)
    measurer.check()
    evidence = attest.quote(measurer.tcti, measurer.pcr, nonce, measurer.log.path)
    if tpm2_tools_dir:
        attest.write_tpm2_tools(evidence, tpm2_tools_dir)
    return evidence
