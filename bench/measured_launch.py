"""Measured-launch benchmark: the launch latency that measurement adds (log append + fsync + TPM extends for
one pod's events, against a real swtpm, with the log reconciled against the TPM's PCR and reset counters first),
and ``attest verify`` (quote checks, replay, history) of evidence whose log holds 10,000 more events, all
really extended into the swtpm. Prints JSON.

Usage: .venv/bin/python bench/measured_launch.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchtpm import swtpm

from measure import attest
from measure.events import Event, encode_record, launch_events, parse_log
from measure.replay import replay
from measure.tpm import Measurer, _pytss, esapi

APPS = [{"app": "web", "image": "example.com/web:1", "manifest": "sha256:" + "a" * 64, "signed": "sha256:" + "a" * 64,
         "rootfs": "sha256:" + "b" * 64}]  # fmt: skip
STAGE1 = {"backend": "qemu", "accel": "tcg", "kernel": "sha256:" + "c" * 64, "initrd": "sha256:" + "d" * 64,
          "pod_initrd": "sha256:" + "e" * 64, "cmdline": "console=ttyS0 panic=-1 quiet", "memory_mib": 256, "vcpus": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmrkt-bench-measure-") as tmp:
        work = Path(tmp)
        with swtpm(work) as tcti:
            measurer = Measurer(tcti, 15, work / "logs")
            times = []
            for i in range(args.runs):
                events = launch_events(pod=f"pod-{i}", manifest=b"{}", apps=APPS, trust={"policy": None},
                                       stage1=STAGE1, insecure=[])
                start = time.perf_counter()
                measurer.measure(events)
                times.append(time.perf_counter() - start)
            # 10,000 more events in the same log (it must prove the PCR's history from the reset), extended.
            big = measurer.log
            first = len(big.records())
            pytss = _pytss()
            data = bytearray()
            with esapi(measurer.tcti) as ctx:
                for n in range(first, first + 10_000):
                    event = Event("app", {"n": n})
                    data += encode_record(n, 15, "kvmrkt", {"event": event.encode().decode(), "kind": "app"},
                                          event.digest())
                    ha = pytss.TPMT_HA(hashAlg=pytss.TPM2_ALG.SHA256)
                    ha.digest.sha256 = event.digest()
                    ctx.pcr_extend(pytss.ESYS_TR.PCR15, pytss.TPML_DIGEST_VALUES([ha]))
            with big.path.open("ab") as fh:
                fh.write(bytes(data))
            keys = attest.init(measurer.tcti, work / "keys")
            nonce = bytes.fromhex(attest.new_nonce())
            evidence = attest.quote(measurer.tcti, 15, nonce, big.path)
        start = time.perf_counter()
        report = attest.verify(evidence, ak_pem=keys[0].read_bytes(), nonce=nonce, reference={})
        verify_s = time.perf_counter() - start
        start = time.perf_counter()
        rep = replay(parse_log(big.path.read_bytes()))
        replay_s = time.perf_counter() - start
        print(json.dumps({
            "events_per_launch": len(events),
            "measure_launch_median_ms": round(statistics.median(times) * 1000, 2),
            "measure_launch_p90_ms": round(sorted(times)[int(len(times) * 0.9)] * 1000, 2),
            "runs": args.runs,
            "attest_verify_10000_events_s": round(verify_s, 3),
            "attested_events": report["attested_events"],
            "replay_only_10000_events_s": round(replay_s, 3),
            "replayed_events": len(rep.events),
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
