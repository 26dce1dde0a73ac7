"""Event encoding and log replay (pure): golden vectors and every way of tampering with a log."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kvmrkt.errors import EventLogError
from measure.events import RESET_VALUE, RS, Event, EventLog, TpmClock, canonical, launch_events, parse_log
from measure.replay import matches, replay

CLOCK = TpmClock(clock=1000, reset_count=3, restart_count=0, safe=True)


def test_event_bytes_are_domain_separated_and_canonical() -> None:
    ev = Event("app", {"z": 1, "a": "é", "n": [True, None]})
    assert ev.encode() == 'kvmrkt:app:{"a":"é","n":[true,null],"z":1}'.encode()
    assert ev.digest() == hashlib.sha256(ev.encode()).digest()
    assert canonical({"b": 1, "a": 2}) == b'{"a":2,"b":1}'


def _log(tmp_path: Path, n: int = 3) -> tuple[EventLog, list[Event]]:
    log = EventLog(tmp_path, boot="test-boot")
    events = [Event("app", {"i": i}) for i in range(n)]
    with log.locked():
        log.start(15, "test-tpm", CLOCK)
        for ev in events:
            log.append(15, ev)
    return log, events


def test_replay_matches_the_pcr_math(tmp_path: Path) -> None:
    log, events = _log(tmp_path)
    value = RESET_VALUE
    for ev in events:
        value = hashlib.sha256(value + ev.digest()).digest()
    rep = replay(log.records())
    assert rep.final == value and matches(rep, value) and rep.boot_id == "test-boot"
    assert rep.proven and rep.cycle == (3, 0) and rep.tpm == "test-tpm"
    assert rep.attested(value) == 3 and rep.attested(RESET_VALUE) == 0 and rep.attested(b"x" * 32) is None


def test_a_pcr_mismatch_is_kept_as_tamper_evidence(tmp_path: Path) -> None:
    """The chain goes on from the value found, but the log no longer proves the PCR's history."""
    log, _ = _log(tmp_path, 2)
    before = replay(log.records()).final
    found = hashlib.sha256(before + b"\x00" * 31 + b"\x01").digest()
    later = Event("app", {"i": 9})
    with log.locked():
        log.mismatch(15, before, found, CLOCK)
        log.append(15, later)
    rep = replay(log.records())
    assert not rep.proven and rep.mismatches[0]["after_events"] == 2 and rep.mismatches[0]["recnum"] == 3
    assert rep.final == hashlib.sha256(found + later.digest()).digest() and rep.attested(found) == 2


def test_a_restart_that_kept_the_pcr_moves_the_cycle_on(tmp_path: Path) -> None:
    log, _ = _log(tmp_path, 1)
    with log.locked():
        log.restart(15, TpmClock(clock=2000, reset_count=3, restart_count=1, safe=True))
    rep = replay(log.records())
    assert rep.cycle == (3, 1) and rep.proven and len(rep.steps) == 2


def test_a_log_that_does_not_start_at_the_reset_value_is_not_proven(tmp_path: Path) -> None:
    log, _ = _log(tmp_path, 1)
    chunks = _raw(log)
    chunks[0] = chunks[0].replace(RESET_VALUE.hex().encode(), b"11" * 32)
    rep = replay(_write(log, chunks))
    assert not rep.proven and rep.initial == b"\x11" * 32


def test_void_records_are_skipped(tmp_path: Path) -> None:
    log, events = _log(tmp_path, 2)
    with log.locked():
        log.void(15, 2, "extend failed")
    rep = replay(log.records())
    assert rep.final == hashlib.sha256(RESET_VALUE + events[0].digest()).digest()


def _raw(log: EventLog) -> list[bytes]:
    return [c for c in log.path.read_bytes().split(RS) if c]


def _write(log: EventLog, chunks: list[bytes]) -> list[dict[str, object]]:
    return parse_log(b"".join(RS + c for c in chunks))


@pytest.mark.parametrize("tamper", ["truncate-start", "reorder", "edit", "inject", "other-pcr", "bad-digest",
                                    "foreign-domain", "void-of-start", "extended-mismatch", "bad-counters"])
def test_tampered_logs_are_rejected(tmp_path: Path, tamper: str) -> None:
    log, _ = _log(tmp_path)
    chunks = _raw(log)
    if tamper == "truncate-start":
        chunks = chunks[1:]
    elif tamper == "reorder":
        chunks[1], chunks[2] = chunks[2], chunks[1]
    elif tamper == "edit":
        chunks[2] = chunks[2].replace(b'{\\"i\\":1}', b'{\\"i\\":7}')
    elif tamper == "inject":
        extra = json.loads(chunks[2])
        extra["content"]["event"] = 'kvmrkt:app:{"i":99}'
        chunks.insert(3, json.dumps(extra).encode() + b"\n")
    elif tamper == "other-pcr":
        chunks[1] = chunks[1].replace(b'"pcr":15', b'"pcr":14')
    elif tamper == "bad-digest":
        rec = json.loads(chunks[1])
        rec["digests"][0]["digest"] = "00" * 32
        chunks[1] = json.dumps(rec).encode() + b"\n"
    elif tamper == "foreign-domain":
        rec = json.loads(chunks[1])
        rec["content"]["event"] = "other:app:{}"
        rec["digests"][0]["digest"] = hashlib.sha256(b"other:app:{}").hexdigest()
        chunks[1] = json.dumps(rec).encode() + b"\n"
    elif tamper == "void-of-start":
        chunks.append(json.dumps({"recnum": 4, "pcr": 15, "content_type": "kvmrkt-void",
                                  "content": {"voids": 0}, "digests": []}).encode() + b"\n")
    elif tamper == "extended-mismatch":  # a mismatch record that claims to be extended
        chunks.append(json.dumps({"recnum": 4, "pcr": 15, "content_type": "kvmrkt-pcr-mismatch",
                                  "content": {"found": "00" * 32},
                                  "digests": [{"hashAlg": "sha256", "digest": "00" * 32}]}).encode() + b"\n")
    elif tamper == "bad-counters":
        chunks[0] = chunks[0].replace(b'"resetCount":3', b'"resetCount":"3"')
    with pytest.raises(EventLogError):
        replay(_write(log, chunks))


def test_a_torn_last_record_is_ignored(tmp_path: Path) -> None:
    log, _ = _log(tmp_path)
    data = log.path.read_bytes()
    assert len(replay(parse_log(data[:-10])).events) == 2


def test_launch_events_order_and_insecure() -> None:
    evs = launch_events(pod="p", manifest=b"{}", apps=[{"app": "a"}], trust={"policy": None}, stage1={"cmdline": "x"},
                        insecure=["tpm"])
    assert [e.kind for e in evs] == ["stage1", "app", "pod-manifest", "trust", "insecure"]
    assert evs[0].data["cmdline_digest"] == "sha256:" + hashlib.sha256(b"x").hexdigest()
    evs = launch_events(pod="p", manifest=b"{}", apps=[{"app": "a"}], dependencies=[{"image": "base"}],
                        trust={}, stage1={}, insecure=[])
    assert [e.kind for e in evs] == ["stage1", "dependency", "app", "pod-manifest", "trust"]


def test_reference_policy_pins_the_vmm_guard() -> None:
    from measure.attest import Launch, evaluate

    launch = Launch("p")
    launch.stage1 = {"kernel": "sha256:k", "initrd": "sha256:i", "vmm_guard": "sha256:g"}
    evaluate(launch, {"stage1": {"vmm_guard": ["sha256:g"]}})
    assert launch.problems == []
    evaluate(launch, {"stage1": {"vmm_guard": ["sha256:other"]}})
    assert launch.problems == ["stage1 vmm_guard sha256:g is not an allowed digest"]


def test_reference_policy_pins_the_vm_templates_a_pod_may_be_restored_from() -> None:
    from measure.attest import Launch, evaluate

    booted, restored = Launch("b"), Launch("r")
    booted.stage1 = {"kernel": "sha256:k"}
    restored.stage1 = {"kernel": "sha256:k", "template": {"key": "k1", "state": "sha256:t", "initrd": "sha256:i"}}
    for launch in (booted, restored):
        evaluate(launch, {"stage1": {"template": ["sha256:t"]}})
        evaluate(launch, {"stage1": {}})  # no "template" key: restored pods are accepted (and reported)
    assert booted.problems == [] and restored.problems == []
    for launch in (booted, restored):
        evaluate(launch, {"stage1": {"template": []}})  # no restored pod at all
    assert booted.problems == []
    assert restored.problems == ["the pod VM was restored from VM template sha256:t, which is not an allowed "
                                 "template digest"]


def test_reference_policy_judges_each_image_by_its_own_signers() -> None:
    """An unsigned app renamed to a trusted name does not borrow another app's signer; a dependency is judged
    on its own."""
    from measure.attest import Launch, evaluate

    ref = {"images": [{"name": "demo/app:1", "signer": "FPR"}]}
    launch = Launch("p")
    launch.apps = [{"app": "good", "image": "demo/app:1", "manifest": "sha256:a", "signers": ["FPR"]},
                   {"app": "evil", "image": "demo/app:1", "manifest": "sha256:e", "signers": []}]
    launch.trust = {"decisions": {"good": {"signers": ["FPR"]}, "evil": {"signers": []}}}
    evaluate(launch, ref)
    assert len(launch.problems) == 1 and launch.problems[0].startswith("app evil: image demo/app:1 (sha256:e)")
    launch = Launch("p")
    launch.apps = [{"app": "good", "image": "demo/app:1", "manifest": "sha256:a", "signers": ["FPR"]}]
    launch.dependencies = [{"image": "example.com/base:1", "manifest": "sha256:b", "signers": [], "apps": ["good"]}]
    evaluate(launch, ref)
    assert launch.problems == ["dependency example.com/base:1 (sha256:b) of good, signed by nobody, is not allowed"]
    launch.problems = []
    evaluate(launch, {"images": [*ref["images"], {"digest": "sha256:b"}]})
    assert launch.problems == []


def test_reference_policy_refuses_unjudged_oci_bundles() -> None:
    """A kvmrkt-oci app names itself (a bundle annotation) as a trusted image: no images rule vouches for it,
    even one matching its name and a signer; only ``allow_unjudged_bundles`` accepts it."""
    from kvmrkt.trust.admission import bundle_verdict
    from measure.attest import Launch, evaluate

    verdict = bundle_verdict("oci-bundle:sha256:c", "demo/app:1")
    app = {"app": "app", "image": "demo/app:1", "bundle": "/b", "config": "sha256:c", **verdict, "signers": ["FPR"]}
    ref: dict[str, object] = {"images": [{"name": "demo/app:1", "signer": "FPR"}, {"digest": "oci-bundle:sha256:c"}]}
    launch = Launch("p")
    launch.apps = [app]
    evaluate(launch, ref)
    assert len(launch.problems) == 1 and "OCI bundle /b" in launch.problems[0]
    launch.problems = []
    evaluate(launch, {**ref, "allow_unjudged_bundles": "yes"})  # only true itself
    assert len(launch.problems) == 1
    launch.problems = []
    evaluate(launch, {**ref, "allow_unjudged_bundles": True})
    assert launch.problems == []


@pytest.mark.parametrize("change", [
    {"version": 1}, {"pcr": 99}, {"pcr": "15"}, {"pcr": True}, {"quote": None}, {"log": 7}, {"pcr_value": "zz"},
])
def test_malformed_evidence_is_a_format_failure(change: dict[str, object]) -> None:
    """Evidence is attacker-controlled: wrong types or ranges fail the format check, never a traceback."""
    from kvmrkt.errors import AttestationError
    from measure.attest import EVIDENCE_VERSION, verify

    evidence = {"version": EVIDENCE_VERSION, "pcr": 15, "quote": "", "signature": "", "pcr_value": "00" * 32,
                "log": "", **change}
    with pytest.raises(AttestationError) as exc:
        verify(evidence, ak_pem=b"", nonce=b"n" * 16, reference=None)
    assert exc.value.check == "format"


def test_an_append_after_a_torn_record_numbers_on_from_the_last_complete_one(tmp_path: Path) -> None:
    """A crash mid-write leaves a torn record; the next append follows the last complete record, and replay
    then sees a contiguous log that ignores the torn bytes."""
    log, _ = _log(tmp_path)
    with log.path.open("ab") as fh:
        fh.write(b'\x1e{"recnum": 4, "pcr": 15, "conte')
    with log.locked():
        assert log.append(15, Event("app", {"i": 9})) == 4
    assert [r["recnum"] for r in log.records()] == [0, 1, 2, 3, 4]  # it used to be "record 4 is not valid JSON"


def test_an_append_parses_only_the_last_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each append of a launch used to re-parse up to 1 MiB of the log's JSON to number the next record."""
    from kvmrkt import jsondoc
    from measure import events

    log, _ = _log(tmp_path, n=200)
    parsed: list[bytes] = []
    real = jsondoc.loads

    def counting(data: bytes) -> object:
        parsed.append(data)
        return real(data)

    monkeypatch.setattr(events.jsondoc, "loads", counting)
    with log.locked():
        assert log.append(15, Event("app", {"i": 200})) == 201
    assert len(parsed) == 1


def test_a_complete_record_made_torn_by_an_editor_no_longer_replays_to_the_pcr(tmp_path: Path) -> None:
    """Torn records are skipped (a crash mid-append), so an attacker with the log could try to hide an extended
    event by deleting its final newline: the record numbers then have a gap, and the replay refuses the log."""
    log, _ = _log(tmp_path)
    data = log.path.read_bytes()
    victim = canonical(json.loads(data.split(RS)[2]))  # the first app event, extended into the PCR
    log.path.write_bytes(data.replace(victim + b"\n", victim, 1))
    assert [r["recnum"] for r in log.records()] == [0, 2, 3]
    with pytest.raises(EventLogError, match="record number 2"):
        replay(log.records())
