"""Boot benchmark: ``kvmrkt run`` of a busybox app running ``true`` versus the same VM started by a bare QEMU
command line, measured in the same run. Prints JSON: medians, ratio, the same run on the default CNI network,
the cost of the VMM jail (the bare QEMU started jailed as kvmrkt starts it: its cgroup created, limited and
removed, the mount namespace and private root built, privileges dropped, the guard's filter, versus started
plainly as root; and the same for ``/bin/true``, which shows the jail's own cost without the VM's noise), and
the host memory of the QEMU process outside guest RAM; and the kernel-only floor (``bench/kernel_boot.py``: the same
kernel and command line, an initramfs whose init is ``reboot -f``).

Usage (as root, after `make setup`):
    .venv/bin/python bench/boot.py [--runs N] [--accel auto|tcg|kvm] [--kernel minimal|debian-cloud]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchtpm import swtpm
from kernel_boot import Floor
from pycache import use_bytecode_cache

from kvmrkt.config import Stage1Config, load_config
from kvmrkt.engine import Engine
from kvmrkt.host import proc as _proc
from kvmrkt.pods import jail as jails
from kvmrkt.pods.prepare import PodOptions
from kvmrkt.pods.runargs import AppRequest
from kvmrkt.stage1 import JailSpec
from stage1_kvm import cgroups
from stage1_kvm import jail as vmm_jail
from stage1_kvm.assets import load_assets, pod_initrd
from stage1_kvm.qemu import choose_accel, runtime_fds
from stage1_kvm.qemu_argv import build_argv
from stage1_kvm.vm import host_tsc_khz
from stage1_kvm.vmspec import VMSpec, build_vmspec, guest_pod_config

REPO = Path(__file__).resolve().parents[1]


def _time(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr.decode()[-2000:]}")
    return elapsed


@dataclass
class Bare:
    """A pod's VM as one QEMU command line, with the files and sockets it needs opened per start."""

    spec: VMSpec
    cwd: Path
    jail: JailSpec
    qemu: str
    guard: Path

    @contextlib.contextmanager
    def start(self, *, jailed: bool) -> Iterator[subprocess.Popen[bytes]]:
        """QEMU started plainly as root, or exactly as the qemu backend starts it (cgroup, jail, guard, fds)."""
        cg = None
        spec, layout = (vmm_jail.plan(self.spec, self.cwd, guard=self.guard, vmm=Path(self.qemu)) if jailed
                        else (self.spec, None))
        with runtime_fds(self.cwd, self.spec) as fds:
            argv = build_argv(spec, qemu=self.qemu, fds=fds)
            if layout is not None:
                argv = vmm_jail.guarded(self.qemu, argv)
            if layout is None:
                proc = _proc.spawn(argv, pass_fds=list(fds.values()), cwd=self.cwd, netns=self.spec.netns)
            else:
                cg = cgroups.create(self.jail.cgroup_parent, f"bench-{self.cwd.name}", self.jail)
                vmm_jail.readable(layout)
                root = self.cwd / vmm_jail.ROOT
                root.mkdir(exist_ok=True)
                proc = _proc.spawn(argv, pass_fds=list(fds.values()), cwd=self.cwd, netns=self.spec.netns,
                                   setup=vmm_jail.confine(root, layout, self.jail.uid, self.jail.gid, cg.procs_files))
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if cg is not None:
                cg.remove()

    def setup_cost_ms(self, runs: int = 25) -> dict[str, float]:
        """The jail's own cost without the VM's noise: ``/bin/true`` started plainly versus started exactly as
        QEMU is (cgroup created and removed, private root built, privileges dropped, through the guard)."""
        _, layout = vmm_jail.plan(self.spec, self.cwd, guard=self.guard, vmm=Path(self.qemu))
        root = self.cwd / vmm_jail.ROOT
        root.mkdir(exist_ok=True)
        plain, jailed = [], []
        for _ in range(runs):
            begin = time.perf_counter()
            _proc.spawn(["/bin/true"], cwd=self.cwd).wait()
            plain.append(time.perf_counter() - begin)
            begin = time.perf_counter()
            cg = cgroups.create(self.jail.cgroup_parent, f"bench-{self.cwd.name}", self.jail)
            vmm_jail.readable(layout)
            proc = _proc.spawn(vmm_jail.guarded("/bin/true", ["true"]), cwd=self.cwd,
                               setup=vmm_jail.confine(root, layout, self.jail.uid, self.jail.gid, cg.procs_files))
            if proc.wait() != 0:
                sys.exit("the jailed /bin/true failed")
            cg.remove()
            jailed.append(time.perf_counter() - begin)
        return {"true_plain_ms": round(statistics.median(plain) * 1000, 2),
                "true_jailed_ms": round(statistics.median(jailed) * 1000, 2),
                "jail_setup_ms": round((statistics.median(jailed) - statistics.median(plain)) * 1000, 2)}

    def time(self, *, jailed: bool) -> float:
        begin = time.perf_counter()
        with self.start(jailed=jailed) as proc:
            if proc.wait() != 0:
                sys.exit(f"bare QEMU failed ({proc.returncode}) in {self.cwd}")
        return time.perf_counter() - begin


def _overhead_mib(bare: Bare) -> dict[str, float]:
    """Start QEMU (jailed) on a pod whose app sleeps, then read its memory: total RSS, and RSS outside guest RAM."""
    guest_mib = bare.spec.memory_mib
    with bare.start(jailed=True) as proc:
        deadline = time.monotonic() + 60
        status = bare.cwd / "guest-status"
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--accel", default="auto")
    ap.add_argument("--kernel", default="minimal", choices=["minimal", "debian-cloud"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmrkt-bench-") as tmp:
        use_bytecode_cache(Path(tmp))  # the CLI as installed: byte-compiled
        print(json.dumps(_bench(Path(tmp), args.runs, args.accel, args.kernel), indent=2))


def _bench(work: Path, runs: int, requested_accel: str, kernel: str) -> dict[str, object]:
    data, etc = work / "data", work / "etc"
    etc.mkdir()
    # The real launch path: trust check (a policy that accepts the bench image) and measured launch into a swtpm.
    with swtpm(work) as tcti:
        (etc / "config.toml").write_text(f'[stage1]\nkernel = "{kernel}"\n[measure]\ntcti = "{tcti}"\n'
                                         f'log_dir = "{data / "measure"}"\n')  # the bench TPM's own log
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

    def bare_pod(exec_: list[str], name: str) -> Bare:
        pod = engine.prepare([AppRequest(image="busybox", exec=exec_[0], args=exec_[1:])], PodOptions())
        manifest = engine.pod_manifest(pod)
        jail = jails.for_pod(config, manifest)
        rootfs, verity = engine.app_disks(manifest)
        spec = build_vmspec(manifest, cfg=cfg, jail=jail, accel=accel, kernel=assets.kernel, rootfs=rootfs,
                            interactive=False, debug=False, tsc_khz=host_tsc_khz(), acpi=assets.acpi, verity=verity)
        cwd = work / name
        (cwd / "logs").mkdir(parents=True)
        pod_initrd(assets.initrd, guest_pod_config(manifest, interactive=False, verity=verity), cwd / "initrd.img")
        engine.remove(pod.uuid)
        return Bare(spec, cwd, jail, shutil.which(cfg.qemu) or cfg.qemu, assets.guard)

    bare = bare_pod(["/bin/true"], "bare")
    floor = Floor.create(work / "floor", cfg, accel=accel)
    # The bare VM has no NIC, so the like-for-like kvmrkt run has none either; the default network's cost is
    # measured separately in the same run.
    run_argv = [*kvmrkt, "run", f"--accel={accel}", "--net=none", "busybox", "--exec", "/bin/true"]
    net_argv = [*kvmrkt, "run", f"--accel={accel}", "--net=default", "busybox", "--exec", "/bin/true"]
    _time(run_argv, REPO)  # warm the page cache for all
    _time(net_argv, REPO)
    bare.time(jailed=False)
    bare.time(jailed=True)
    floor.time()
    kv, plain, jailed, net, kernel = [], [], [], [], []
    for _ in range(runs):
        kv.append(_time(run_argv, REPO))
        plain.append(bare.time(jailed=False))
        jailed.append(bare.time(jailed=True))
        net.append(_time(net_argv, REPO))
        kernel.append(floor.time())
        subprocess.run([*kvmrkt, "gc", "--grace-period=0s"], capture_output=True, check=True)
    probe = bare_pod(["/bin/sleep", "30"], "mem")
    return {
        "accel": accel,
        "kernel": assets.kind,
        "runs": runs,
        "kvmrkt_run_median_s": round(statistics.median(kv), 3),
        "bare_qemu_median_s": round(statistics.median(plain), 3),
        "ratio": round(statistics.median(kv) / statistics.median(plain), 3),
        "bare_qemu_jailed_median_s": round(statistics.median(jailed), 3),
        "jail_added_s": round(statistics.median(jailed) - statistics.median(plain), 4),
        "kvmrkt_run_default_net_median_s": round(statistics.median(net), 3),
        "default_net_added_s": round(statistics.median(net) - statistics.median(kv), 3),
        "kernel_floor_median_s": round(statistics.median(kernel), 3),
        "kvmrkt_run_s": [round(x, 3) for x in kv],
        "bare_qemu_s": [round(x, 3) for x in plain],
        "bare_qemu_jailed_s": [round(x, 3) for x in jailed],
        **bare.setup_cost_ms(),
        "guest_ram_mib": probe.spec.memory_mib,
        **_overhead_mib(probe),
    }


if __name__ == "__main__":
    main()
