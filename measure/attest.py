"""Attestation: an attestation key, TPM quotes over the measurement PCR, and the offline verifier.

Role: ``init`` derives the attestation key (AK: a restricted ECDSA P-256 signing key, a primary object of the
endorsement hierarchy, so the same TPM always re-derives the same key) and the EK, and exports both public
keys. ``quote`` gathers evidence: the quote and its signature (TPM wire format), the PCR value, the event log,
the AK public key and the boot id. ``verify`` is what a security team runs on evidence from a machine it does
not trust, with the AK public key it enrolled and the nonce it chose; checks run in Keylime's order and the
first failure is reported: signature (ECDSA with SHA-256 only: no downgrade), quote magic and type, nonce, PCR
selection and digest against the PCR value, the TPM's clock and counters against the previous evidence when
given (they never go back; within one reset cycle the clock moves on), event log replay against the PCR, the
history (the log starts from the PCR's reset value in the quote's own reset cycle, with no pcr-mismatch
record: otherwise launches could be hidden), then the reference policy, image by image.

Trust boundary: evidence is attacker-controlled; only the AK public key, the nonce and the reference policy
given by the verifier are trusted. The AK is bound to this TPM by enrolment (``ak.pem`` next to ``ek.pem``);
credential activation is not done here.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from kvmrkt import jsondoc
from kvmrkt.errors import AttestationError, EventLogError, MeasurementError
from kvmrkt.host.files import write_atomic
from measure.events import RESET_VALUE, TpmClock, boot_id, parse_log
from measure.replay import Replay, replay
from measure.tpm import _pytss, esapi
from policy.trust import NOT_JUDGED_SCOPE

TPM_GENERATED = 0xFF544347
ST_ATTEST_QUOTE = 0x8018
EVIDENCE_VERSION = 2


def new_nonce() -> str:
    """A fresh 32-byte nonce, hex."""
    return secrets.token_hex(32)


def _ak_template() -> Any:
    t = _pytss()
    pub = t.TPM2B_PUBLIC.parse(
        "ecc256:ecdsa-sha256:null",
        objectAttributes=(t.TPMA_OBJECT.RESTRICTED | t.TPMA_OBJECT.SIGN_ENCRYPT | t.TPMA_OBJECT.FIXEDTPM
                          | t.TPMA_OBJECT.FIXEDPARENT | t.TPMA_OBJECT.SENSITIVEDATAORIGIN
                          | t.TPMA_OBJECT.USERWITHAUTH),
    )
    return pub


def _pem(public: Any) -> bytes:
    return bytes(public.publicArea.to_pem())


@contextlib.contextmanager
def _primary(ctx: Any, template: Any) -> Iterator[tuple[Any, Any]]:
    """A primary key of the endorsement hierarchy, flushed afterwards whatever happens (without a resource
    manager, transient objects outlive the connection)."""
    t = _pytss()
    handle, public, *_ = ctx.create_primary(t.TPM2B_SENSITIVE_CREATE(), template, t.ESYS_TR.ENDORSEMENT)
    try:
        yield handle, public
    finally:
        ctx.flush_context(handle)


def init(tcti: str, out_dir: Path) -> tuple[Path, Path]:
    """Derive the AK and EK and write ``ak.pem`` and ``ek.pem`` (same keys every time on the same TPM)."""
    t = _pytss()
    out_dir.mkdir(parents=True, exist_ok=True)
    with esapi(tcti) as ctx:
        from tpm2_pytss.utils import NoSuchIndex, create_ek_template

        def nv_read(index: int) -> bytes:
            try:
                handle = ctx.tr_from_tpmpublic(index)
                pub, _name = ctx.nv_read_public(handle)
                return bytes(ctx.nv_read(handle, pub.nvPublic.dataSize, 0, auth_handle=handle))
            except t.TSS2_Exception as exc:
                raise NoSuchIndex(index) from exc

        _cert, ek_template = create_ek_template("EK-ECC256", nv_read)
        with _primary(ctx, _ak_template()) as (_ak_handle, ak_pub), _primary(ctx, ek_template) as (_ek, ek_pub):
            pass
    _out_dir(out_dir)
    write_atomic(out_dir / "ak.pem", _pem(ak_pub), mode=0o644)
    write_atomic(out_dir / "ek.pem", _pem(ek_pub), mode=0o644)
    return out_dir / "ak.pem", out_dir / "ek.pem"


def quote(tcti: str, pcr: int, nonce: bytes, log_path: Path) -> dict[str, Any]:
    """Quote the measurement PCR with the AK and bundle the evidence.

    Raises:
        AttestationError: a nonce shorter than 16 bytes; TpmUnavailableError: the TPM failed.
    """
    if len(nonce) < 16 or len(nonce) > 64:
        raise AttestationError("the nonce must be 16 to 64 bytes", check="nonce")
    t = _pytss()
    with esapi(tcti) as ctx, _primary(ctx, _ak_template()) as (ak, ak_pub):
        scheme = t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.ECDSA)
        scheme.details.any.hashAlg = t.TPM2_ALG.SHA256
        quoted, signature = ctx.quote(ak, f"sha256:{pcr}", nonce, scheme)
        _upd, _sel, values = ctx.pcr_read(t.TPML_PCR_SELECTION.parse(f"sha256:{pcr}"))
    try:
        log = log_path.read_bytes().decode()
    except FileNotFoundError:
        log = ""
    return {
        "version": EVIDENCE_VERSION,
        "quote": bytes(quoted).hex(),
        "signature": signature.marshal().hex(),
        "pcr": pcr,
        "pcr_value": bytes(values[0]).hex(),
        "ak_pub": _pem(ak_pub).decode(),
        "boot_id": boot_id(),
        "nonce": nonce.hex(),
        "log": log,
        "created": time.time(),
    }


def write_tpm2_tools(evidence: dict[str, Any], out: Path) -> None:
    """quote.msg (TPMS_ATTEST), quote.sig (TPMT_SIGNATURE), quote.pcrs (the PCR value: use
    ``tpm2_checkquote -l sha256:PCR``) and ak.pem."""
    _out_dir(out)
    for name, data in (("quote.msg", bytes.fromhex(evidence["quote"])),
                       ("quote.sig", bytes.fromhex(evidence["signature"])),
                       ("quote.pcrs", bytes.fromhex(evidence["pcr_value"])), ("ak.pem", evidence["ak_pub"].encode())):
        write_atomic(out / name, data, mode=0o644)


def _out_dir(path: Path) -> None:
    """Create a user-given output directory; refuse one that is a symlink (planted by another user, it would
    redirect root's files anywhere).

    Raises:
        MeasurementError: ``path`` is a symlink or not a directory.
    """
    try:
        if not path.is_symlink():
            path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MeasurementError(f"cannot create {path}: {exc.strerror}") from exc
    if path.is_symlink() or not path.is_dir():
        raise MeasurementError(f"{path}: not a directory (a symlink is refused)", hint="give a real directory")


# --- verification ---------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One pod launch reconstructed from the log."""

    pod: str
    time: float | None = None
    apps: list[dict[str, Any]] = field(default_factory=list)
    dependencies: list[dict[str, Any]] = field(default_factory=list)
    stage1: dict[str, Any] = field(default_factory=dict)
    trust: dict[str, Any] = field(default_factory=dict)
    insecure: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        return "ok" if not self.problems else "REJECTED"

    def to_dict(self) -> dict[str, Any]:
        return {"pod": self.pod, "time": self.time, "apps": [a.get("app") for a in self.apps],
                "images": [a.get("manifest") for a in self.apps],
                "dependencies": [{"image": d.get("image"), "digest": d.get("manifest"), "apps": d.get("apps")}
                                 for d in self.dependencies],
                "insecure": self.insecure, "verdict": self.verdict, "problems": self.problems}


def _fail(check: str, message: str) -> AttestationError:
    return AttestationError(f"{check}: {message}", check=check)


def _check_quote(evidence: dict[str, Any], ak_pem: bytes, nonce: bytes | None) -> Any:
    """Signature, quote structure, nonce (unless None: a previous quote), PCR selection and digest; returns the
    parsed TPMS_ATTEST."""
    t = _pytss()
    try:
        key = serialization.load_pem_public_key(ak_pem)
    except ValueError as exc:
        raise _fail("ak", "the AK public key is not a PEM public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise _fail("ak", "the AK must be an ECDSA P-256 key")
    try:
        msg = bytes.fromhex(evidence["quote"])
        sig, _ = t.TPMT_SIGNATURE.unmarshal(bytes.fromhex(evidence["signature"]))
    except (KeyError, ValueError, TypeError, Exception) as exc:  # malformed wire data
        raise _fail("signature", f"malformed quote or signature: {exc}") from exc
    if sig.sigAlg != t.TPM2_ALG.ECDSA or sig.signature.ecdsa.hash != t.TPM2_ALG.SHA256:
        raise _fail("signature", "the quote must be signed with ECDSA over SHA-256 (no other scheme or hash)")
    der = encode_dss_signature(int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big"),
                               int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big"))
    try:
        key.verify(der, msg, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise _fail("signature", "the quote signature does not verify with the enrolled AK") from exc
    try:
        attest, rest = t.TPMS_ATTEST.unmarshal(msg)
    except Exception as exc:
        raise _fail("quote", f"the quote does not parse: {exc}") from exc
    if rest != len(msg):
        raise _fail("quote", "trailing bytes after the quote")
    if attest.magic != TPM_GENERATED or attest.type != ST_ATTEST_QUOTE:
        raise _fail("quote", "wrong magic or type: not a TPM-generated quote")
    if nonce is not None and bytes(attest.extraData) != nonce:
        raise _fail("nonce", "the quote is not over the given nonce (replayed or for another challenge)")
    sel = attest.attested.quote.pcrSelect
    pcr = int(evidence["pcr"])
    want = bytearray(3)
    want[pcr // 8] |= 1 << (pcr % 8)
    if sel.count != 1 or sel.pcrSelections[0].hash != t.TPM2_ALG.SHA256 or \
            bytes(sel.pcrSelections[0].pcrSelect)[: sel.pcrSelections[0].sizeofSelect] != bytes(want):
        raise _fail("pcr-selection", f"the quote does not select exactly sha256 PCR {pcr}")
    value = bytes.fromhex(evidence["pcr_value"])
    if hashlib.sha256(value).digest() != bytes(attest.attested.quote.pcrDigest):
        raise _fail("pcr-digest", "the PCR value in the evidence is not the one the TPM quoted")
    return attest


def launches(events: list[dict[str, Any]]) -> list[Launch]:
    """Group replayed events into pod launches."""
    out: dict[str, Launch] = {}
    for ev in events:
        _domain, kind, body = [*ev["event"].split(":", 2), "", ""][:3]
        try:
            data = jsondoc.loads(body)
        except ValueError as exc:
            raise _fail("log", f"record {ev['recnum']}: the event is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise _fail("log", f"record {ev['recnum']}: the event is not a JSON object")
        launch = out.setdefault(str(data.get("pod")), Launch(str(data.get("pod"))))
        if kind == "stage1":
            launch.stage1 = data
            launch.time = data.get("time")
        elif kind == "app":
            launch.apps.append(data)
        elif kind == "dependency":
            launch.dependencies.append(data)
        elif kind == "trust":
            launch.trust = data
        elif kind == "insecure":
            launch.insecure = list(data.get("options", []))
    return list(out.values())


def _allowed(image: dict[str, Any], allowed: list[dict[str, Any]]) -> bool:
    """An image (an app's or a dependency's event) is allowed by its own digest, or by the name it was judged
    as together with one of its own signers: never by another image's signature or a manifest's name."""
    signers = image.get("signers")
    signers = set(signers) if isinstance(signers, list) else set()
    return any(isinstance(r, dict) and (
        (r.get("digest") is not None and r.get("digest") == image.get("manifest")) or
        (r.get("name") is not None and r.get("name") == image.get("image") and r.get("signer") in signers))
        for r in allowed)


def evaluate(launch: Launch, reference: dict[str, Any]) -> None:
    """Apply a reference policy to one launch (fills ``launch.problems``).

    Reference keys: ``images``: list of ``{"digest": D}`` or ``{"name": N, "signer": FPR}``, matched against
    every app's image and every dependency image separately (its digest; or the name it was judged as and
    its own signers); ``stage1``: ``{"kernel": [D...], "initrd": [D...], "vmm_guard": [D...], "template": [D...]}``
    (``template``: the VM templates a pod may be restored from, by state digest; ``[]`` refuses every restored pod;
    without it, restored pods are accepted, and reported);
    ``allow_insecure``: list of options tolerated (default none); ``allow_unjudged_bundles``: true to accept
    ``kvmrkt-oci`` apps, whose bundle rootfs no trust policy judged (default false: no ``images`` rule matches
    them, whatever name their annotations give).
    """
    allowed = reference.get("images")
    if allowed is not None:
        for app in launch.apps:
            if app.get("scope") == NOT_JUDGED_SCOPE:  # an OCI bundle's rootfs: no image rule can vouch for it
                if reference.get("allow_unjudged_bundles") is not True:
                    launch.problems.append(f"app {app.get('app')}: OCI bundle {app.get('bundle')} (image name "
                                           f"{app.get('image')!r} from its annotations) was not judged by any trust "
                                           "policy, and the reference does not set allow_unjudged_bundles")
            elif not _allowed(app, allowed):
                launch.problems.append(f"app {app.get('app')}: image {app.get('image')} ({app.get('manifest')}) "
                                       f"signed by {app.get('signers') or 'nobody'} is not allowed")
        for dep in launch.dependencies:
            if not _allowed(dep, allowed):
                launch.problems.append(f"dependency {dep.get('image')} ({dep.get('manifest')}) of "
                                       f"{', '.join(map(str, dep.get('apps') or []))}, signed by "
                                       f"{dep.get('signers') or 'nobody'}, is not allowed")
    s1 = reference.get("stage1") or {}
    for part in ("kernel", "initrd", "vmm_guard"):
        if part in s1 and launch.stage1.get(part) not in s1[part]:
            launch.problems.append(f"stage1 {part} {launch.stage1.get(part)} is not an allowed digest")
    restored = launch.stage1.get("template")
    if "template" in s1 and restored is not None:
        state = restored.get("state") if isinstance(restored, dict) else None
        if state not in s1["template"]:
            launch.problems.append(f"the pod VM was restored from VM template {state}, which is not an allowed "
                                   "template digest")
    tolerated = set(reference.get("allow_insecure", []))
    bad = sorted(set(launch.insecure) - tolerated)
    if bad:
        launch.problems.append(f"launched with --insecure-options={','.join(bad)}")


def _clock_info(attest: Any) -> TpmClock:
    info = attest.clockInfo
    return TpmClock(int(info.clock), int(info.resetCount), int(info.restartCount), bool(info.safe))


def _check_format(evidence: Any, what: str) -> None:
    if not isinstance(evidence, dict) or evidence.get("version") != EVIDENCE_VERSION:
        got = evidence.get("version") if isinstance(evidence, dict) else None
        raise _fail("format", f"{what}: unsupported evidence version {got!r} (this verifier reads "
                              f"{EVIDENCE_VERSION})")
    pcr = evidence.get("pcr")
    if not isinstance(pcr, int) or isinstance(pcr, bool) or not 0 <= pcr <= 23:
        raise _fail("format", f"{what}: pcr must be a PCR number")
    for key in ("quote", "signature", "pcr_value", "log"):
        if not isinstance(evidence.get(key), str):
            raise _fail("format", f"{what}: {key} must be a string")
    try:
        bytes.fromhex(evidence["pcr_value"])
    except ValueError as exc:
        raise _fail("format", f"{what}: pcr_value is not hex") from exc


def _check_timing(now: TpmClock, before: TpmClock) -> dict[str, Any]:
    """Keylime's check_quote_timing: the counters never go back, and within one reset cycle the clock moves on
    (an old quote replayed). Returns what changed."""
    if now.cycle < before.cycle:
        raise _fail("timing", f"the TPM's reset/restart counters went back ({before.cycle} -> {now.cycle}): "
                              "another TPM, a cleared TPM, or replayed evidence")
    if now.cycle == before.cycle and now.clock <= before.clock:
        raise _fail("timing", "the TPM clock did not advance since the previous evidence (a replayed quote)")
    return {"reset_since_previous": now.reset_count != before.reset_count,
            "restart_since_previous": now.cycle != before.cycle and now.reset_count == before.reset_count}


def _check_history(rep: Replay, clock: TpmClock, pcr: int) -> None:
    """The log must account for every extend of the PCR since the TPM's last reset."""
    if rep.pcr != pcr:
        raise _fail("log", f"the log is for PCR {rep.pcr}, the quote for PCR {pcr}")
    if rep.initial != RESET_VALUE:
        raise _fail("history", "the log does not start from the PCR's reset value, so it cannot show everything "
                               "measured since the TPM was reset")
    if rep.cycle != clock.cycle:
        raise _fail("history", f"the log is for another TPM reset cycle (resetCount, restartCount {rep.cycle}; "
                               f"the quote's: {clock.cycle}): it does not describe this PCR")


def verify(
    evidence: dict[str, Any], *, ak_pem: bytes, nonce: bytes, reference: dict[str, Any] | None,
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Verify evidence end to end. Returns the report (launches with verdicts). ``previous``: earlier evidence
    from the same machine (already verified), for the clock and counter checks.

    Raises:
        AttestationError: naming the first failed check (format, ak, signature, quote, nonce, pcr-selection,
        pcr-digest, timing, log, history, reference); history and reference failures carry the report.
    """
    _check_format(evidence, "evidence")
    attest = _check_quote(evidence, ak_pem, nonce)
    clock = _clock_info(attest)
    timing: dict[str, Any] = {}
    if previous is not None:
        _check_format(previous, "previous evidence")
        timing = _check_timing(clock, _clock_info(_check_quote(previous, ak_pem, None)))
    try:
        rep = replay(parse_log(str(evidence.get("log", "")).encode()))
    except EventLogError as exc:
        raise _fail("log", exc.message) from exc
    pcr = int(evidence["pcr"])
    _check_history(rep, clock, pcr)
    attested = rep.attested(bytes.fromhex(evidence["pcr_value"]))
    if attested is None:
        raise _fail("log", "the event log does not replay to the quoted PCR value (edited, truncated, reordered "
                           "or injected events, or extends the log does not show)")
    found = launches(rep.events[:attested])
    for launch in found:
        evaluate(launch, reference or {})
    report: dict[str, Any] = {
        "ok": all(not launch.problems for launch in found) and not rep.mismatches,
        "boot_id": rep.boot_id, "pcr": rep.pcr, "attested_events": attested,
        "unattested_events": len(rep.events) - attested,
        "tpm": {**clock.to_dict(), **timing},
        "tampered": [{k: m.get(k) for k in ("recnum", "expected", "found", "detected", "after_events")}
                     for m in rep.mismatches],
        "launches": [x.to_dict() for x in found],
    }  # fmt: skip
    if rep.mismatches:
        m = rep.mismatches[0]
        raise AttestationError(
            f"history: PCR {pcr} was extended outside kvmrkt (record {m.get('recnum')}: the TPM held "
            f"{str(m.get('found'))[:16]}... where the log led to {str(m.get('expected'))[:16]}...): the log no "
            "longer proves which pods ran on this machine since the TPM was reset", check="history", report=report)
    if not report["ok"]:
        first = next(x for x in found if x.problems)
        raise AttestationError(f"reference: pod {first.pod}: {first.problems[0]}", check="reference", report=report)
    return report
