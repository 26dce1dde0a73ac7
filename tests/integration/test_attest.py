"""Attestation against a real swtpm: evidence from kvmrkt is accepted by `kvmrkt attest verify` and by
tpm2_checkquote (tpm2-tools); each tampering is rejected, naming the check that failed."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from measure import attest
from measure.events import RS
from measure.tpm import _pytss, esapi

from .conftest import Kvmrkt, start_swtpm, stop_swtpm


@pytest.fixture
def launched(kvmrkt: Kvmrkt, tmp_path: Path) -> dict[str, Any]:
    kvmrkt.ok("run", "busybox", "--exec", "/bin/true")
    kvmrkt.ok("attest", "init", "--out-dir", str(tmp_path / "keys"))
    nonce = secrets.token_hex(32)
    kvmrkt.ok("attest", "quote", "--nonce", nonce, "-o", str(tmp_path / "evidence.json"),
              "--tpm2-tools-dir", str(tmp_path / "t2"))
    return {"nonce": nonce, "ak": tmp_path / "keys" / "ak.pem", "evidence": tmp_path / "evidence.json",
            "t2": tmp_path / "t2"}


def verify(k: Kvmrkt, ev: dict[str, Any], path: Path | None = None, *extra: str, nonce: str | None = None) -> Any:
    return k("attest", "verify", str(path or ev["evidence"]), "--ak-pub", str(ev["ak"]), "--nonce",
             nonce or ev["nonce"], "--format", "json", *extra)


def test_evidence_verifies_here_and_with_tpm2_tools(kvmrkt: Kvmrkt, launched: dict[str, Any]) -> None:
    res = verify(kvmrkt, launched)
    assert res.rc == 0, res.out + res.err
    report = json.loads(res.out)
    assert report["ok"] and len(report["launches"]) == 1 and report["launches"][0]["verdict"] == "ok"
    text = kvmrkt("attest", "verify", str(launched["evidence"]), "--ak-pub", str(launched["ak"]), "--nonce",
                  launched["nonce"])
    assert text.rc == 0 and "evidence verified" in text.out
    t2 = launched["t2"]
    proc = subprocess.run(["tpm2_checkquote", "-u", t2 / "ak.pem", "-m", t2 / "quote.msg", "-s", t2 / "quote.sig",
                           "-f", t2 / "quote.pcrs", "-l", "sha256:15", "-g", "sha256", "-q", launched["nonce"]],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (t2 / "ak.pem").read_text() == launched["ak"].read_text()


def _tamper(ev: dict[str, Any], change: Callable[[dict[str, Any]], None], tmp_path: Path) -> Path:
    doc = json.loads(ev["evidence"].read_text())
    change(doc)
    out = tmp_path / "tampered.json"
    out.write_text(json.dumps(doc))
    return out


def _flip_quote(doc: dict[str, Any]) -> None:
    q = bytearray.fromhex(doc["quote"])
    q[-5] ^= 1
    doc["quote"] = q.hex()


def _log_records(doc: dict[str, Any]) -> list[str]:
    return [c for c in doc["log"].split(RS.decode()) if c]


def _set_log(doc: dict[str, Any], chunks: list[str]) -> None:
    doc["log"] = "".join(RS.decode() + c for c in chunks)


def _truncate(doc: dict[str, Any]) -> None:
    _set_log(doc, _log_records(doc)[:-2])


def _reorder(doc: dict[str, Any]) -> None:
    c = _log_records(doc)
    c[1], c[2] = c[2], c[1]
    _set_log(doc, c)


def _edit(doc: dict[str, Any]) -> None:
    c = _log_records(doc)
    c[2] = c[2].replace("busybox", "evilbox")
    _set_log(doc, c)


def _inject(doc: dict[str, Any]) -> None:
    c = _log_records(doc)
    rec = json.loads(c[-1])
    rec["recnum"] += 1
    _set_log(doc, [*c[:-1], json.dumps(rec) + "\n", c[-1]])


def _start_at_quoted_value(doc: dict[str, Any]) -> None:
    """Review finding: the log cut down to its start record, whose initial value is set to the quoted PCR: it
    used to verify, with every launch gone from the report."""
    start = json.loads(_log_records(doc)[0])
    start["content"]["initial"] = doc["pcr_value"]
    _set_log(doc, [json.dumps(start) + "\n"])


def _start_at_zero_with_nothing(doc: dict[str, Any]) -> None:
    _set_log(doc, _log_records(doc)[:1])


def _declared_mismatch(doc: dict[str, Any]) -> None:
    """A log that admits a mismatch to reach the quoted value: it replays, but proves nothing."""
    start = _log_records(doc)[0]
    mismatch = {"recnum": 1, "pcr": 15, "content_type": "kvmrkt-pcr-mismatch", "digests": [],
                "content": {"expected": "00" * 32, "found": doc["pcr_value"]}}
    _set_log(doc, [start, json.dumps(mismatch) + "\n"])


def _other_cycle(doc: dict[str, Any]) -> None:
    c = _log_records(doc)
    start = json.loads(c[0])
    start["content"]["resetCount"] += 1
    _set_log(doc, [json.dumps(start) + "\n", *c[1:]])


TAMPERS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "log restarted at the quoted value": (_start_at_quoted_value, "history"),
    "log emptied": (_start_at_zero_with_nothing, "log"),
    "log declaring a mismatch": (_declared_mismatch, "history"),
    "log of another reset cycle": (_other_cycle, "history"),
    "flipped quote byte": (_flip_quote, "signature"),
    "log truncated": (_truncate, "log"),
    "log reordered": (_reorder, "log"),
    "log edited": (_edit, "log"),
    "log with an injected event": (_inject, "log"),
    "other PCR value": (lambda d: d.update(pcr_value="00" * 32), "pcr-digest"),
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_tampered_evidence(kvmrkt: Kvmrkt, launched: dict[str, Any], tmp_path: Path, case: str) -> None:
    change, check = TAMPERS[case]
    res = verify(kvmrkt, launched, _tamper(launched, change, tmp_path))
    assert res.rc == 5
    assert json.loads(res.out)["failed_check"] == check, res.out


def test_wrong_nonce(kvmrkt: Kvmrkt, launched: dict[str, Any]) -> None:
    res = verify(kvmrkt, launched, nonce=secrets.token_hex(32))
    assert res.rc == 5 and json.loads(res.out)["failed_check"] == "nonce"


@pytest.fixture
def other_tpm(tmp_path: Path) -> Iterator[str]:
    state = tmp_path / "other-tpm"
    state.mkdir()
    tpm = start_swtpm(state)
    yield tpm.tcti
    stop_swtpm(tpm)


def test_quote_from_another_tpm(kvmrkt: Kvmrkt, launched: dict[str, Any], other_tpm: str, tmp_path: Path) -> None:
    foreign = attest.quote(other_tpm, 15, bytes.fromhex(launched["nonce"]), tmp_path / "none")
    doc = json.loads(launched["evidence"].read_text())
    doc.update(quote=foreign["quote"], signature=foreign["signature"])
    out = tmp_path / "foreign.json"
    out.write_text(json.dumps(doc))
    res = verify(kvmrkt, launched, out)
    assert res.rc == 5 and json.loads(res.out)["failed_check"] == "signature"


def _quote_with(tcti: str, nonce: bytes, selection: str, hash_alg: str, ak_out: Path) -> tuple[str, str]:
    """A quote by an AK of its own (for SHA-1: an AK whose scheme is ECDSA-SHA1)."""
    t = _pytss()
    template = attest._ak_template()
    if hash_alg != "SHA256":
        template = t.TPM2B_PUBLIC.parse("ecc256:ecdsa-sha1:null", objectAttributes=template.publicArea.objectAttributes)
    with esapi(tcti) as ctx, attest._primary(ctx, template) as (ak, pub):
        scheme = t.TPMT_SIG_SCHEME(scheme=t.TPM2_ALG.ECDSA)
        scheme.details.any.hashAlg = getattr(t.TPM2_ALG, hash_alg)
        quoted, sig = ctx.quote(ak, selection, nonce, scheme)
    ak_out.write_bytes(attest._pem(pub))
    return bytes(quoted).hex(), sig.marshal().hex()


@pytest.mark.parametrize(("selection", "hash_alg", "check"), [
    ("sha256:15", "SHA1", "signature"),
    ("sha256:14", "SHA256", "pcr-selection"),
    ("sha1:15", "SHA256", "pcr-selection"),
])  # fmt: skip
def test_downgrades_and_other_selections(kvmrkt: Kvmrkt, launched: dict[str, Any], tmp_path: Path, selection: str,
                                         hash_alg: str, check: str) -> None:
    ak = tmp_path / "this-ak.pem"
    quote, sig = _quote_with(kvmrkt.tcti, bytes.fromhex(launched["nonce"]), selection, hash_alg, ak)
    out = _tamper(launched, lambda d: d.update(quote=quote, signature=sig), tmp_path)
    res = verify(kvmrkt, {**launched, "ak": ak}, out)
    assert res.rc == 5 and json.loads(res.out)["failed_check"] == check, res.out


def test_reference_policy(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    image = json.loads(kvmrkt.ok("image", "inspect", "busybox").out)
    kvmrkt.ok("run", "busybox", "--exec", "/bin/true")
    kvmrkt.ok("--insecure-options=image", "run", "busybox", "--exec", "/bin/true")
    kvmrkt.ok("attest", "init", "--out-dir", str(tmp_path))
    nonce = secrets.token_hex(16)
    kvmrkt.ok("attest", "quote", "--nonce", nonce, "-o", str(tmp_path / "ev.json"))
    assets = json.loads(Path("/var/lib/kvmrkt/stage1/minimal/assets.json").read_text())
    reference = {"images": [{"digest": image["id"]}], "stage1": {"kernel": [assets["kernel"]["digest"]]}}
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(reference))
    args = ["attest", "verify", str(tmp_path / "ev.json"), "--ak-pub", str(tmp_path / "ak.pem"), "--nonce", nonce,
            "--reference", str(ref)]
    res = kvmrkt(*args, "--format", "json")
    assert res.rc == 5
    doc = json.loads(res.out)
    assert doc["failed_check"] == "reference" and "insecure-options=image" in doc["message"]
    assert [x["verdict"] for x in doc["report"]["launches"]] == ["ok", "REJECTED"]
    text = kvmrkt(*args)
    assert "REJECTED" in text.out and "insecure" in text.out
    reference["allow_insecure"] = ["image"]
    reference["images"] = [{"digest": "sha256:" + "0" * 64}]
    ref.write_text(json.dumps(reference))
    res = kvmrkt(*args, "--format", "json")
    assert res.rc == 5 and "is not allowed" in json.loads(res.out)["message"]
    reference["images"] = [{"digest": image["id"]}]
    ref.write_text(json.dumps(reference))
    assert kvmrkt(*args).rc == 0
