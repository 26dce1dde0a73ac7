"""Measured launch against a real swtpm: the log replays to the PCR, failures are fatal, bypasses recorded."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

from measure.events import parse_log
from measure.replay import replay
from measure.tpm import pcr_read

from .conftest import Kvmrkt, Swtpm, _our_processes


def _log(k: Kvmrkt) -> Path:
    logs = list((k.data / "measure").glob("*.cel"))
    assert len(logs) == 1
    return logs[0]


def test_launch_is_measured_and_the_log_replays(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    uuid_file = tmp_path / "uuid"
    kvmrkt.ok("run", "--uuid-file-save", str(uuid_file), "busybox", "--exec", "/bin/true")
    kvmrkt.ok("run", "busybox", "--name", "a", "--exec", "/bin/true", "---", "busybox", "--name", "b",
              "--exec", "/bin/true")
    uuid = uuid_file.read_text().strip()
    assert json.loads(kvmrkt.ok("status", "--format", "json", uuid).out)["measured"] is True
    rep = replay(parse_log(_log(kvmrkt).read_bytes()))
    assert rep.final == pcr_read(kvmrkt.tcti, 15)
    kinds = [e["event"].split(":", 2)[1] for e in rep.events]
    assert kinds == ["stage1", "app", "pod-manifest", "trust", "stage1", "app", "app", "pod-manifest", "trust"]
    app = json.loads(rep.events[1]["event"].split(":", 2)[2])
    image = json.loads(kvmrkt.ok("image", "inspect", "busybox").out)
    assert app["rootfs"] == image["rootfs"]["digest"] and app["manifest"] == image["id"] and app["pod"] == uuid
    stage1 = json.loads(rep.events[0]["event"].split(":", 2)[2])
    assets = json.loads(Path("/var/lib/kvmrkt/stage1/minimal/assets.json").read_text())
    assert stage1["kernel"] == assets["kernel"]["digest"] and "tsc_early_khz" in stage1["cmdline"]
    out = kvmrkt.ok("attest", "log")
    assert "(matches)" in out.out and "kvmrkt:pod-manifest:" in out.out


def test_insecure_options_are_measured(kvmrkt: Kvmrkt) -> None:
    kvmrkt.ok("--insecure-options=image", "run", "busybox", "--exec", "/bin/true")
    rep = replay(parse_log(_log(kvmrkt).read_bytes()))
    assert rep.events[-1]["event"].startswith('kvmrkt:insecure:{"options":["image"]')


def test_tpm_unreachable_means_no_boot(kvmrkt: Kvmrkt) -> None:
    from .registry import free_port

    kvmrkt.write_config(f'[measure]\ntcti = "swtpm:host=127.0.0.1,port={free_port()}"\n')
    res = kvmrkt("run", "busybox", "--exec", "/bin/true")
    assert res.rc == 5 and "cannot open the TPM" in res.err and "--insecure-options=tpm" in res.err
    assert not _our_processes(str(kvmrkt.data))
    assert not list((kvmrkt.data / "pods" / "run").glob("*/pid"))
    # QEMU may have started (paused, while the TPM was tried): the guest never ran, not one line on its console.
    consoles = list(kvmrkt.data.glob("pods/*/*/console.log"))
    assert consoles and not [p for p in consoles if p.stat().st_size]
    res = kvmrkt("--insecure-options=tpm", "run", "--uuid-file-save", str(kvmrkt.data / "u"), "busybox",
                 "--exec", "/bin/true")
    assert res.rc == 0 and "UNMEASURED" in res.err
    uuid = (kvmrkt.data / "u").read_text().strip()
    assert json.loads(kvmrkt.ok("status", "--format", "json", uuid).out)["measured"] is False


def test_no_tpm_configured_is_an_error(kvmrkt: Kvmrkt) -> None:
    kvmrkt.write_config('[measure]\ntcti = ""\n')
    res = kvmrkt("run", "busybox", "--exec", "/bin/true")
    assert res.rc == 5 and "no TPM is configured" in res.err


def test_debug_and_drtm_pcrs_are_refused(kvmrkt: Kvmrkt) -> None:
    for pcr in (16, 17, 22):
        kvmrkt.write_config(f'[measure]\ntcti = "{kvmrkt.tcti}"\npcr = {pcr}\n')
        res = kvmrkt("run", "busybox", "--exec", "/bin/true")
        assert res.rc == 2 and f"measure.pcr {pcr} cannot be used" in res.err


def test_rootfs_altered_after_measurement_fails_to_read_in_the_guest(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    image = json.loads(kvmrkt.ok("image", "inspect", "busybox").out)
    verity = image["rootfs"]["verity"]
    assert len(verity["rootHash"]) == 64
    kvmrkt.ok("run", "busybox", "--exec", "/bin/true")
    rep = replay(parse_log(_log(kvmrkt).read_bytes()))
    app = json.loads(rep.events[1]["event"].split(":", 2)[2])
    assert app["verity_root"] == verity["rootHash"]
    erofs = kvmrkt.data / "cas" / "rootfs" / (image["rootfs"]["digest"][7:] + ".erofs")
    data = bytearray(erofs.read_bytes())
    for offset in range(4096 * 4, len(data) - 4096, 4096):  # every data block but the superblock's
        data[offset + 100] ^= 0xFF
    erofs.write_bytes(bytes(data))  # same size: nothing on the host notices at launch
    uuid_file = tmp_path / "uuid"
    res = kvmrkt("run", "--uuid-file-save", str(uuid_file), "busybox", "--exec", "/bin/sh", "--", "-c",
                 "cat /bin/busybox > /dev/null")
    assert res.rc == 10, res.err  # the integrity failure's own code, not the app's nor a generic VM failure
    assert "INTEGRITY FAILURE" in res.err, res.err
    st = json.loads(kvmrkt.ok("status", "--format", "json", uuid_file.read_text().strip()).out)
    assert st["integrity_failures"] and st["exit_code"] == 10
    res = kvmrkt("image", "verify", "busybox")  # the full rehash notices and rebuilds it
    assert res.rc == 0, res.err
    kvmrkt.ok("run", "busybox", "--exec", "/bin/true")


PROBE = b"KVMRKT-VERITY-PROBE"


def _corrupt_probe_image(kvmrkt: Kvmrkt, busybox_layout: Path, tmp_path: Path) -> None:
    """Import ``probe``: busybox plus /data.bin (64 blocks of 4 KiB, each starting with PROBE), then flip a byte
    in each of those blocks of its erofs image on the host (busybox itself stays intact, so the app runs)."""
    layout, bundle = tmp_path / "probe-oci", tmp_path / "probe-bundle"
    shutil.copytree(busybox_layout, layout)
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", bundle], check=True, capture_output=True)
    (bundle / "rootfs" / "data.bin").write_bytes(
        b"".join((PROBE + b" %08d\n" % i).ljust(4096, b".") for i in range(64)))
    subprocess.run(["umoci", "repack", "--image", f"{layout}:latest", bundle], check=True, capture_output=True)
    kvmrkt.ok("image", "import", f"oci:{layout}:latest", "--name", "probe")
    digest = json.loads(kvmrkt.ok("image", "inspect", "probe").out)["rootfs"]["digest"]
    erofs = kvmrkt.data / "cas" / "rootfs" / (digest[7:] + ".erofs")
    data = bytearray(erofs.read_bytes())
    blocks = [off for off in range(0, len(data), 4096) if data[off:off + len(PROBE)] == PROBE]
    assert len(blocks) == 64, len(blocks)
    for off in blocks:
        data[off + 100] ^= 0xFF
    erofs.write_bytes(bytes(data))


def test_an_integrity_failure_fails_the_run_whatever_the_app_returns(
    kvmrkt: Kvmrkt, busybox_layout: Path, tmp_path: Path
) -> None:
    """The app reads corrupted blocks (EIO), shrugs and exits 0: run, run-prepared and status still fail."""
    _corrupt_probe_image(kvmrkt, busybox_layout, tmp_path)
    uuid_file = tmp_path / "uuid"
    script = "cat /data.bin > /dev/null; echo app-done; exit 0"
    res = kvmrkt("run", "--uuid-file-save", str(uuid_file), "probe", "--exec", "/bin/sh", "--", "-c", script)
    assert "app-done" in res.out, res.err
    assert res.rc == 10, res.err
    assert "INTEGRITY FAILURE" in res.err and "corrupted" in res.err, res.err
    st = json.loads(kvmrkt.ok("status", "--format", "json", uuid_file.read_text().strip()).out)
    assert st["exit_code"] == 10 and st["apps"][0]["exit_code"] == 0
    assert any("corrupted" in line for line in st["integrity_failures"]), st["integrity_failures"]
    uuid = kvmrkt.ok("prepare", "--quiet", "probe", "--exec", "/bin/sh", "--", "-c", script).out.strip()
    res = kvmrkt("run-prepared", uuid)
    assert res.rc == 10 and "INTEGRITY FAILURE" in res.err, res.err
    assert "integrity=FAILED" in kvmrkt.ok("status", uuid).out


def _quote(k: Kvmrkt, tmp_path: Path, name: str) -> tuple[Path, str]:
    nonce = secrets.token_hex(16)
    k.ok("attest", "quote", "--nonce", nonce, "-o", str(tmp_path / name))
    return tmp_path / name, nonce


def _verify(k: Kvmrkt, evidence: Path, nonce: str, ak: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    res = k("attest", "verify", str(evidence), "--ak-pub", str(ak), "--nonce", nonce, "--format", "json", *extra)
    return res.rc, json.loads(res.out)


def test_a_pcr_extended_outside_kvmrkt_is_tamper_evidence(kvmrkt: Kvmrkt, tmp_path: Path, swtpm: Swtpm) -> None:
    """Review finding: one extend from outside made kvmrkt start a fresh log at the new value, and a quote then
    verified showing only the later launch. Now the log stays, the mismatch is recorded in it, and no verifier
    accepts it; both launches stay visible."""
    kvmrkt.ok("attest", "init", "--out-dir", str(tmp_path))
    first = tmp_path / "first"
    kvmrkt.ok("run", "--uuid-file-save", str(first), "busybox", "--exec", "/bin/true")
    subprocess.run(["tpm2_pcrextend", "-T", swtpm.tcti, "15:sha256=" + "00" * 31 + "01"], check=True)
    second = tmp_path / "second"
    res = kvmrkt.ok("run", "--uuid-file-save", str(second), "busybox", "--exec", "/bin/true")
    assert "TAMPER EVIDENCE" in res.err and "extended it" in res.err
    assert [p.name for p in (kvmrkt.data / "measure").iterdir() if ".cel" in p.name] == [_log(kvmrkt).name]
    rep = replay(parse_log(_log(kvmrkt).read_bytes()))
    assert not rep.proven and rep.mismatches[0]["after_events"] == 4 and rep.final == pcr_read(swtpm.tcti, 15)
    res = kvmrkt("attest", "log")
    assert res.rc == 5 and "TAMPERED: record 5" in res.out and "NOT PROVEN" in res.out
    assert "kvmrkt: error: the event log does not prove" in res.err
    evidence, nonce = _quote(kvmrkt, tmp_path, "ev.json")
    rc, doc = _verify(kvmrkt, evidence, nonce, tmp_path / "ak.pem")
    assert rc == 5 and doc["failed_check"] == "history", doc
    assert [x["pod"] for x in doc["report"]["launches"]] == [first.read_text().strip(), second.read_text().strip()]
    assert doc["report"]["tampered"][0]["recnum"] == 5
    text = kvmrkt("attest", "verify", str(evidence), "--ak-pub", str(tmp_path / "ak.pem"), "--nonce", nonce)
    assert text.rc == 5 and "TAMPERED" in text.out and "extended outside kvmrkt" in text.err


def test_an_extend_after_the_last_launch_is_recorded_by_the_quote(kvmrkt: Kvmrkt, tmp_path: Path,
                                                                  swtpm: Swtpm) -> None:
    kvmrkt.ok("attest", "init", "--out-dir", str(tmp_path))
    kvmrkt.ok("run", "busybox", "--exec", "/bin/true")
    subprocess.run(["tpm2_pcrextend", "-T", swtpm.tcti, "15:sha256=" + "00" * 31 + "02"], check=True)
    evidence, nonce = _quote(kvmrkt, tmp_path, "ev.json")
    rc, doc = _verify(kvmrkt, evidence, nonce, tmp_path / "ak.pem")
    assert rc == 5 and doc["failed_check"] == "history" and len(doc["report"]["launches"]) == 1


def test_a_tpm_reset_ends_the_log_and_the_counters_say_so(kvmrkt: Kvmrkt, tmp_path: Path, swtpm: Swtpm) -> None:
    """A TPM reset (here: the emulator restarted on its state, as at a host reboot) is proven by the TPM's own
    resetCount: the old log is kept as ended, a new one starts from zero, and evidence from before the reset
    cannot be replayed as newer evidence."""
    kvmrkt.ok("attest", "init", "--out-dir", str(tmp_path))
    kvmrkt.ok("run", "busybox", "--exec", "/bin/true")
    old, old_nonce = _quote(kvmrkt, tmp_path, "old.json")
    swtpm.restart()
    res = kvmrkt.ok("run", "busybox", "--exec", "/bin/true")
    assert "the TPM was reset" in res.err and "TAMPER" not in res.err
    (ended,) = (kvmrkt.data / "measure").glob("*.ended")
    records = parse_log(_log(kvmrkt).read_bytes())
    assert records[0]["content"]["previous_log"] == ended.name
    old_cycle = replay(parse_log(ended.read_bytes())).cycle
    assert old_cycle is not None and records[0]["content"]["resetCount"] == old_cycle[0] + 1
    rep = replay(records)
    assert rep.proven and rep.final == pcr_read(swtpm.tcti, 15) and len(rep.events) == 4
    assert replay(parse_log(ended.read_bytes())).events  # the old log is kept, intact
    assert "(matches)" in kvmrkt.ok("attest", "log").out
    new, nonce = _quote(kvmrkt, tmp_path, "new.json")
    rc, doc = _verify(kvmrkt, new, nonce, tmp_path / "ak.pem", "--previous", str(old))
    assert rc == 0 and doc["tpm"]["reset_since_previous"] is True and len(doc["launches"]) == 1, doc
    rc, doc = _verify(kvmrkt, old, old_nonce, tmp_path / "ak.pem", "--previous", str(new))
    assert rc == 5 and doc["failed_check"] == "timing", doc
    # the old evidence's log does not describe the PCR in the new cycle, whatever its quote says
    forged = json.loads(new.read_text())
    forged["log"] = json.loads(old.read_text())["log"]
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    rc, doc = _verify(kvmrkt, tmp_path / "forged.json", nonce, tmp_path / "ak.pem")
    assert rc == 5 and doc["failed_check"] == "history" and "reset cycle" in doc["message"], doc


def test_resettable_pcrs_are_refused(kvmrkt: Kvmrkt) -> None:
    """PCR 23 (and 16) can be reset by anyone with TPM access, which erases history without the TPM's counters
    noticing: a log there proves nothing."""
    kvmrkt.write_config(f'[measure]\ntcti = "{kvmrkt.tcti}"\npcr = 23\n')
    res = kvmrkt("run", "busybox", "--exec", "/bin/true")
    assert res.rc == 2 and "measure.pcr 23 cannot be used" in res.err and "resettable" in res.err


def test_a_damaged_log_stops_launches_until_it_is_moved_aside(kvmrkt: Kvmrkt) -> None:
    """kvmrkt never measures into a log it cannot replay (nor silently starts another): the launch fails, naming
    the log; once the operator keeps it aside, the new log records the PCR's unexplained value."""
    kvmrkt.ok("run", "busybox", "--exec", "/bin/true")
    log = _log(kvmrkt)
    log.write_bytes(log.read_bytes().replace(b'"kind":"app"', b'"kind":"app","x":1', 1).replace(
        b"kvmrkt:app:", b"kvmrkt:app:", 1).replace(b'\\"pod\\"', b'\\"pdo\\"', 1))
    res = kvmrkt("run", "busybox", "--exec", "/bin/true")
    assert res.rc == 5 and "is damaged" in res.err and "move it aside" in res.err, res.err
    assert not _our_processes(str(kvmrkt.data))
    log.rename(log.with_name(log.name + ".damaged"))
    res = kvmrkt.ok("run", "busybox", "--exec", "/bin/true")
    assert "TAMPER EVIDENCE" in res.err
