"""``kvmrkt attest init|quote|verify|log`` and ``kvmrkt stage1 build``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from kvmrkt import jsondoc
from kvmrkt.cli._base import FORMATS, CliContext, _dump, _progress, _when, cli, pass_ctx
from kvmrkt.errors import EventLogError
from kvmrkt.host.files import write_atomic


@cli.group()
def attest() -> None:
    """Measured launch evidence (the TPM event log)."""


@attest.command("init")
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("."), show_default=True)
@pass_ctx
def attest_init(c: CliContext, out_dir: Path) -> None:
    """Derive the attestation key (restricted ECDSA P-256 signing key in the endorsement hierarchy; the same
    key every time on this TPM) and write ak.pem and ek.pem for enrolment by the security team."""
    from kvmrkt import evidence

    ak, ek = evidence.attest_init(c.config(), out_dir)
    click.echo(f"wrote {ak} and {ek}")


@attest.command("quote")
@click.option("--nonce", required=True, help="The verifier's challenge, hex (16-64 bytes).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Evidence file (JSON).")
@click.option("--tpm2-tools-dir", type=click.Path(path_type=Path),
              help="Also write quote.msg, quote.sig, quote.pcrs and ak.pem for tpm2_checkquote "
                   "(-l sha256:PCR -g sha256 -q NONCE).")
@pass_ctx
def attest_quote(c: CliContext, nonce: str, output: Path, tpm2_tools_dir: Path | None) -> None:
    """Quote the measurement PCR with the AK and write the evidence (quote, PCR value, event log, AK, boot id).

    The log is first reconciled with the TPM: a PCR extended by something else is recorded in the log as tamper
    evidence, which every verifier then reports."""
    from kvmrkt import evidence as local

    evidence = local.attest_quote(c.config(), nonce, tpm2_tools_dir)
    write_atomic(output, (json.dumps(evidence, indent=2) + "\n").encode(), mode=0o644)
    click.echo(f"wrote {output}")


@attest.command("verify")
@click.option("--ak-pub", type=click.Path(path_type=Path, exists=True), required=True, help="The enrolled AK.")
@click.option("--nonce", required=True, help="The nonce the quote must be over (hex).")
@click.option("--reference", type=click.Path(path_type=Path, exists=True), help="Reference policy (JSON).")
@click.option("--previous", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Evidence verified earlier from the same machine: the TPM's counters must not go back and, "
                   "within one reset cycle, its clock must move on.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.argument("evidence", type=click.Path(path_type=Path, exists=True))
@pass_ctx
def attest_verify(c: CliContext, evidence: Path, ak_pub: Path, nonce: str, reference: Path | None,
                  previous: Path | None, fmt: str) -> None:
    """Verify evidence offline: signature, quote, nonce, PCR digest, TPM clock and counters (with --previous),
    log replay, the PCR's whole history since the TPM was reset (a log that starts elsewhere, belongs to another
    reset cycle or records an extend from outside kvmrkt is refused), then the reference policy, image by image
    (dependencies included).

    \b
    Reference policy (all keys optional):
      {"images": [{"digest": "sha256:..."}, {"name": "example.com/app:1", "signer": "FPR"}],
       "stage1": {"kernel": ["sha256:..."], "initrd": ["sha256:..."], "vmm_guard": ["sha256:..."],
                  "template": ["sha256:..."]},
       "allow_insecure": []}
      stage1.template: the VM templates (state digests, `kvmrkt stage1 template list`) a pod may be restored
      from; [] refuses every restored pod; left out, restored pods pass and are reported.
    """
    from kvmrkt.errors import AttestationError
    from measure import attest as attestation

    try:
        report = attestation.verify(_load_json_file(evidence), ak_pem=ak_pub.read_bytes(), nonce=_hex(nonce),
                                    reference=_load_json_file(reference) if reference else None,
                                    previous=_load_json_file(previous) if previous else None)
    except AttestationError as exc:
        if fmt == "json":
            _dump({"ok": False, "failed_check": exc.check, "message": exc.message, "report": exc.report})
        elif exc.report:
            _print_tampered(exc.report)
            _print_launches(exc.report)
        raise
    if fmt == "json":
        _dump(report)
        return
    click.echo(f"evidence verified: boot {report['boot_id']}, PCR {report['pcr']}, "
               f"{report['attested_events']} attested event(s), {report['unattested_events']} not yet in the quote")
    _print_launches(report)


def _print_tampered(report: dict[str, Any]) -> None:
    for m in report.get("tampered", []):
        click.echo(f"TAMPERED: record {m['recnum']}, after {m['after_events']} event(s): the TPM held "
                   f"{m['found'][:16]}... where the log led to {m['expected'][:16]}...")


def _print_launches(report: dict[str, Any]) -> None:
    click.echo(f"{'TIME':<20}{'POD':<38}{'VERDICT':<10}APPS / IMAGES")
    for x in report["launches"]:
        when = _when(x["time"]) if x["time"] else "-"
        images = ", ".join(f"{a}={i[:19]}" for a, i in zip(x["apps"], x["images"], strict=False))
        click.echo(f"{when:<20}{x['pod']:<38}{x['verdict']:<10}{images}")
        for d in x.get("dependencies", []):
            click.echo(f"{'':<20}  dependency {d['image']} ({str(d['digest'])[:19]}) of {', '.join(d['apps'] or [])}")
        for p in x["problems"]:
            click.echo(f"{'':<20}  - {p}")


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise click.BadParameter(f"{text[:20]!r} is not hex") from exc


def _load_json_file(path: Path) -> Any:
    try:
        return jsondoc.load(path)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{path}: {exc}") from exc


@attest.command("log")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.argument("log_file", required=False, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@pass_ctx
def attest_log(c: CliContext, log_file: Path | None, fmt: str) -> None:
    """Check and print an event log (default: this boot's), and compare its replay with the TPM's PCR and reset
    cycle. Exits 5 when the log does not prove the PCR's history (it records an extend from outside kvmrkt) or
    no longer matches the TPM."""
    from kvmrkt import evidence

    info = evidence.event_log(c.config(), log_file)
    if fmt == "json":
        _dump(info)
        return
    cycle = "/".join(map(str, info["cycle"])) if info["cycle"] else "?"
    click.echo(f"log {info['path']} (boot {info['boot_id']}, TPM reset cycle {cycle}), PCR {info['pcr']}, "
               f"initial {info['initial'][:16]}...")
    for ev in info["events"]:
        click.echo(f"{ev['recnum']:>6}  {ev['digest'][:16]}  {ev['event'][:150]}")
    for m in info["mismatches"]:
        click.echo(f"TAMPERED: record {m['recnum']}, after {m['after_events']} event(s): the PCR held "
                   f"{m['found'][:16]}... where the log led to {m['expected'][:16]}... (extended outside kvmrkt)")
    click.echo(f"replayed PCR {info['pcr']}: {info['replayed']}")
    if info.get("tpm") is not None:
        click.echo(f"TPM      PCR {info['pcr']}: {info['tpm']} ({'matches' if info['matches'] else 'DOES NOT MATCH'})")
    click.echo("history: " + ("proven since the TPM was reset" if info["proven"] else
                              "NOT PROVEN (a verifier will refuse this log)"))
    if info.get("matches") is False or not info["proven"]:
        what = "does not match the TPM" if info.get("matches") is False else "does not prove the PCR's history"
        raise EventLogError(f"the event log {what}", hint="a verifier will refuse evidence from this log")


@cli.group()
def stage1() -> None:
    """Manage the guest assets (kernel, initramfs)."""


@stage1.command("build")
@click.option("--kernel", type=click.Choice(["minimal", "debian-cloud"]), default=None,
              help="minimal: built from linux-source-6.1 (default); debian-cloud: Debian's packaged cloud kernel.")
@click.option("--force", is_flag=True, help="Rebuild even when the cache is up to date.")
@pass_ctx
def stage1_build(c: CliContext, kernel: str | None, force: bool) -> None:
    """Build (or reuse) the guest kernel and initramfs, and record their digests."""
    from stage1_kvm.assets import build_assets

    cfg = c.config().stage1
    assets = build_assets(cfg, kernel or cfg.kernel, force=force, progress=_progress)
    click.echo(f"kernel {assets.kernel} {assets.kernel_digest}")
    click.echo(f"initrd {assets.initrd} {assets.initrd_digest}")
    click.echo(f"guard {assets.guard} {assets.guard_digest}")


