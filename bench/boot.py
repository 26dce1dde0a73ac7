"""Boot benchmark: ``kvmrkt run`` of a busybox app running ``true`` versus the same VM started by a bare QEMU
command line, measured in the same run. Prints JSON: medians, ratio, the same run on the default CNI network,
and the host memory of the QEMU process outside guest RAM.

Usage (as root, after `make setup`):
    .venv/bin/python bench/boot.py [--runs N] [--accel auto|tcg|kvm] [--kernel minimal|debian-cloud]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchtpm import swtpm

from kvmrkt.config import Stage1Config, load_config
from kvmrkt.engine import Engine, PodOptions
from kvmrkt.runargs import AppRequest
from kvmrkt.store import no_progress
from stage1_kvm.assets import load_assets, pod_initrd
from stage1_kvm.qemu import choose_accel, host_tsc_khz
from stage1_kvm.qemu_argv import build_argv
from stage1_kvm.vmspec import build_vmspec, guest_pod_config

REPO = Path(__file__).resolve().parents[1]


def _time(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr.decode()[-2000:]}")
    return elapsed


def _overhead_mib(argv: list[str], cwd: Path, guest_mib: int) -> dict[str, float]:
    """Start QEMU on a pod whose app sleeps, then read its memory: total RSS, and RSS outside guest RAM."""
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        status = cwd / "guest-status"
        while not status.exists() or "START" not in status.read_text(errors="replace"):
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit("memory probe VM did not start")
            time.sleep(0.05)
        time.sleep(0.5)
        total = guest = 0
        size_kib = 0
        rss_kib = 0
        for line in Path(f"/proc/{proc.pid}/smaps").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "Size:":
                size_kib = int(parts[1])
            elif len(parts) >= 2 and parts[0] == "Rss:":
                rss_kib = int(parts[1])
                total += rss_kib
                if size_kib == guest_mib * 1024:
                    guest += rss_kib
        return {"qemu_rss_mib": round(total / 1024, 1), "guest_ram_resident_mib": round(guest / 1024, 1),
                "qemu_overhead_mib": round((total - guest) / 1024, 1)}
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--accel", default="auto")
    ap.add_argument("--kernel", default="minimal", choices=["minimal", "debian-cloud"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmrkt-bench-") as tmp:
        print(json.dumps(_bench(Path(tmp), args.runs, args.accel, args.kernel), indent=2))


def _bench(work: Path, runs: int, requested_accel: str, kernel: str) -> dict[str, object]:
    data, etc = work / "data", work / "etc"
    etc.mkdir()
    # The real launch path: trust check (a policy that accepts the bench image) and measured launch into a swtpm.
    with swtpm(work) as tcti:
        (etc / "config.toml").write_text(f'[stage1]\nkernel = "{kernel}"\n[measure]\ntcti = "{tcti}"\n')
        (etc / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        return _measure_runs(work, data, etc, runs, requested_accel)


def _measure_runs(work: Path, data: Path, etc: Path, runs: int, requested_accel: str) -> dict[str, object]:
    subprocess.run([REPO / "examples" / "busybox-image.sh", work / "img", "latest"], check=True, capture_output=True)
    kvmrkt = [sys.executable, "-m", "kvmrkt", "--dir", str(data), "--config-dir", str(etc)]
    subprocess.run([*kvmrkt, "image", "import", f"oci:{work / 'img'}:latest", "--name", "busybox"], check=True,
                   capture_output=True)
    config = load_config(config_dir=etc, data_dir=data)
    engine = Engine(config)
    cfg: Stage1Config = config.stage1
    assets = load_assets(cfg)
    accel = choose_accel(requested_accel)

    def bare_pod(exec_: list[str], name: str) -> tuple[list[str], Path, int]:
        pod = engine.prepare([AppRequest(image="busybox", exec=exec_[0], args=exec_[1:])], PodOptions())
        manifest = engine.pod_manifest(pod)
        rootfs = {a.name: engine._rootfs(a, no_progress) for a in manifest.apps}
        verity = {a.name: engine._verity(a) for a in manifest.apps}
        spec = build_vmspec(manifest, cfg=cfg, accel=accel, kernel=assets.kernel, rootfs=rootfs, interactive=False,
                            debug=False, tsc_khz=host_tsc_khz(), host_cpus=os.cpu_count() or 1,
                            acpi=assets.acpi, verity=verity)
        cwd = work / name
        (cwd / "logs").mkdir(parents=True)
        pod_initrd(assets.initrd, guest_pod_config(manifest, interactive=False, verity=verity), cwd / "initrd.img")
        engine.remove(pod.uuid)
        return build_argv(spec, qemu=cfg.qemu), cwd, spec.memory_mib

    bare_argv, bare_cwd, _ = bare_pod(["/bin/true"], "bare")
    # The bare VM has no NIC, so the like-for-like kvmrkt run has none either; the default network's cost is
    # measured separately in the same run.
    run_argv = [*kvmrkt, "run", f"--accel={accel}", "--net=none", "busybox", "--exec", "/bin/true"]
    net_argv = [*kvmrkt, "run", f"--accel={accel}", "--net=default", "busybox", "--exec", "/bin/true"]
    _time(run_argv, REPO)  # warm the page cache for both
    _time(net_argv, REPO)
    _time(bare_argv, bare_cwd)
    kv, bare, net = [], [], []
    for _ in range(runs):
        kv.append(_time(run_argv, REPO))
        bare.append(_time(bare_argv, bare_cwd))
        net.append(_time(net_argv, REPO))
        subprocess.run([*kvmrkt, "gc", "--grace-period=0s"], capture_output=True, check=True)
    sleep_argv, sleep_cwd, guest_mib = bare_pod(["/bin/sleep", "30"], "mem")
    return {
        "accel": accel,
        "kernel": assets.kind,
        "runs": runs,
        "kvmrkt_run_median_s": round(statistics.median(kv), 3),
        "bare_qemu_median_s": round(statistics.median(bare), 3),
        "ratio": round(statistics.median(kv) / statistics.median(bare), 3),
        "kvmrkt_run_default_net_median_s": round(statistics.median(net), 3),
        "default_net_added_s": round(statistics.median(net) - statistics.median(kv), 3),
        "kvmrkt_run_s": [round(x, 3) for x in kv],
        "bare_qemu_s": [round(x, 3) for x in bare],
        "guest_ram_mib": guest_mib,
        **_overhead_mib(sleep_argv, sleep_cwd, guest_mib),
    }


if __name__ == "__main__":
    main()
