"""Measured launch against a real swtpm: the log replays to the PCR, failures are fatal, bypasses recorded."""

from __future__ import annotations

import json
from pathlib import Path

from measure.events import parse_log
from measure.replay import replay
from measure.tpm import pcr_read

from .conftest import Kvmrkt, _our_processes, start_swtpm, stop_swtpm


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
    assert res.rc != 0
    assert "INTEGRITY FAILURE" in res.err, res.err
    st = json.loads(kvmrkt.ok("status", "--format", "json", uuid_file.read_text().strip()).out)
    assert st["integrity_failures"]
    res = kvmrkt("image", "verify", "busybox")  # the full rehash notices and rebuilds it
    assert res.rc == 0, res.err
    kvmrkt.ok("run", "busybox", "--exec", "/bin/true")


def test_a_log_that_no_longer_describes_the_pcr_is_set_aside(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    """A TPM reset within one host boot (here: another swtpm, as after an emulator restart) leaves the old log
    describing a PCR value that is gone; the next launch keeps that log aside and starts one that matches."""
    kvmrkt.ok("run", "busybox", "--exec", "/bin/true")
    (tmp_path / "tpm2").mkdir()
    tpm = start_swtpm(tmp_path / "tpm2")
    try:
        kvmrkt.write_config(f'[measure]\ntcti = "{tpm.tcti}"\n')
        res = kvmrkt.ok("run", "busybox", "--exec", "/bin/true")
        assert "did not match the event log" in res.err
        (old,) = (kvmrkt.data / "measure").glob("*.set-aside")
        records = parse_log(_log(kvmrkt).read_bytes())
        assert records[0]["content"]["previous_log"] == old.name
        assert replay(records).final == pcr_read(tpm.tcti, 15)
        assert "(matches)" in kvmrkt.ok("attest", "log").out
        assert replay(parse_log(old.read_bytes())).events  # the old log is kept, intact
    finally:
        stop_swtpm(tpm)
