"""Kernel boot benchmark: kvmrkt's own guest kernel under bare QEMU (the machine flags of ``stage1_kvm.qemu_argv``),
with an initramfs whose init is busybox's ``reboot -f``, for a set of kernel command-line variants run interleaved.
Prints JSON: per variant the median wall time to QEMU's exit (the kernel-only floor of a pod's start), the median
CPU time QEMU used (steadier than the wall time when other work shares the host) and, with
``--profile``, the guest-clock timeline of one boot per variant under ``initcall_debug printk.time=1`` (the console
stays quiet, the init prints the ring buffer with ``dmesg``): when init was reached, the largest initcalls, the
largest gaps between two kernel messages, and the named waits. ``--sample`` finds what the messages cannot
show: it boots kvmrkt's line while asking QEMU's monitor for the guest's instruction pointer as often as it
answers, and prints the kernel functions the samples fell in, overall and per 50 ms of wall time (the sampling
slows the guest down about threefold: read it for shares, not for times).

A variant is a list of tokens added to the base command line (kvmrkt's, from ``stage1_kvm.vmspec``); a token
``-NAME`` removes the base's ``NAME``/``NAME=...``; ``lpj=auto`` is the loops_per_jiffy of a profiled boot.
``--vmlinux [LABEL=]PATH`` adds another kernel (e.g. one built from an edited ``kernel.config``): every variant
also boots it, interleaved with the installed kernel, reported as ``VARIANT@LABEL``.

Usage (as root, after `make setup`):
    .venv/bin/python bench/kernel_boot.py [--runs N] [--accel auto|tcg|kvm] [--vcpus N] [--profile]
        [--kernel minimal|debian-cloud]
        [--variant='NAME:TOKENS' ...] [--vmlinux LABEL=PATH ...] [--sample]

Trust boundary: none beyond the benchmark's own files; the guest runs only busybox from the host's package.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import itertools
import json
import os
import re
import resource
import shutil
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from kvmrkt.config import Stage1Config, load_config
from stage1_kvm import agent
from stage1_kvm.assets import cpio_archive, load_assets
from stage1_kvm.qemu import choose_accel, runtime_fds
from stage1_kvm.qemu_argv import build_argv
from stage1_kvm.vm import host_tsc_khz
from stage1_kvm.vmspec import QMP_SOCKET, VMSpec, kernel_cmdline

BUSYBOX = Path("/bin/busybox")  # static (busybox-static): the guest has no libc
# busybox picks its applet by argv[0]; the kernel passes what follows `--` to init (and QEMU appends the
# virtio-mmio device list after it, which reboot ignores and sh takes as $0).
INIT = ("/sbin/reboot", "-f")
# The profiled boot stays quiet (a console at emulated serial speed would stretch the timeline) and its init
# prints the kernel's ring buffer before powering off.
PROFILE = "initcall_debug printk.time=1 log_buf_len=1M"
PROFILE_INIT = ("/bin/sh", '-c "/bin/busybox dmesg; /bin/busybox reboot -f"')
TIMEOUT_S = 30.0
LPJ_AUTO = "lpj=auto"  # replaced by the loops_per_jiffy a profiled boot printed

# kvmrkt's line, without the levers it adopted, and each other lever added to it or removed (the admin-guide's
# kernel-parameters.txt says what each does; mitigations=off is measured only: the guest runs hostile code).
VARIANTS: dict[str, str] = {
    "kvmrkt": "",
    "kvmrkt_before_levers": "-no_timer_check -noapictimer -tsc -lpj -noreplace-smp",
    "-no_timer_check": "-no_timer_check",
    "-noapictimer": "-noapictimer",
    "-tsc=reliable": "-tsc",
    "-tsc_early_khz": "-tsc_early_khz",
    "-lpj": "-lpj",
    "+lpj=measured": "lpj=auto",
    "+nosmp": "nosmp",
    "+maxcpus=1": "maxcpus=1",
    "+clocksource=tsc": "clocksource=tsc",
    "+lapic=notscdeadline": "lapic=notscdeadline",
    "-noreplace-smp": "-noreplace-smp",
    "+rcu_expedited": "rcupdate.rcu_expedited=1",
    "+clearcpuid=erms": "clearcpuid=erms",
    "+clearcpuid=erms,fsrm": "clearcpuid=erms,fsrm",
    "+mitigations=off": "mitigations=off",
    "-random.trust_cpu": "-random.trust_cpu",
}


def floor_initrd(out: Path, *, profile: bool = False) -> Path:
    """An initramfs holding only the static busybox: as ``/sbin/reboot``, or (``profile``) as ``/bin/busybox``
    with ``/bin/sh`` linked to it."""
    busybox = BUSYBOX.read_bytes()
    files = ([("bin", stat.S_IFDIR | 0o755, b""), ("bin/busybox", stat.S_IFREG | 0o755, busybox),
              ("bin/sh", stat.S_IFLNK | 0o777, b"busybox")] if profile else
             [("sbin", stat.S_IFDIR | 0o755, b""), (INIT[0].lstrip("/"), stat.S_IFREG | 0o755, busybox)])
    out.write_bytes(cpio_archive(files))
    return out


def _key(token: str) -> str:
    return token.split("=", 1)[0]


def apply_variant(base: str, tokens: str, lpj: int | None = None, init: tuple[str, str] = INIT) -> str:
    """The base command line with a variant's tokens added (``-NAME`` removes ``NAME``), and ``init`` (path,
    arguments) as init: busybox's ``reboot -f``."""
    words = base.split()
    for token in tokens.split():
        if token.startswith("-"):
            words = [w for w in words if _key(w) != token[1:]]
            continue
        if token == LPJ_AUTO:
            if lpj is None:
                raise SystemExit("variant lpj=auto needs a profiled boot first (run with --profile)")
            token = f"lpj={lpj}"
        words = [w for w in words if _key(w) != _key(token)] + [token]
    words = [f"rdinit={init[0]}" if _key(w) == "rdinit" else w for w in words]
    return " ".join([*words, "--", init[1]])


@dataclass(frozen=True)
class Floor:
    """The kernel-only VM: kvmrkt's machine, kernel and base command line, no devices, init = ``reboot -f``."""

    spec: VMSpec
    profile_initrd: str
    qemu: str
    work: Path

    @classmethod
    def create(cls, work: Path, cfg: Stage1Config, *, accel: str = "auto", vcpus: int = 1) -> Floor:
        """``work``: a directory for the initramfs and sockets; ``cfg``: the stage1 settings whose kernel boots."""
        work.mkdir(parents=True, exist_ok=True)
        assets = load_assets(cfg)
        acc = choose_accel(accel)
        spec = VMSpec(name="kvmrkt-kernel-floor", accel=acc, memory_mib=cfg.min_memory_mib,
                      vcpus=vcpus, kernel=assets.kernel, initrd=str(floor_initrd(work / "floor.img")),
                      cmdline=kernel_cmdline(accel=acc, tsc_khz=host_tsc_khz(), debug=False, vcpus=vcpus,
                                             acpi=assets.acpi),
                      disks=(), shares=(), ports=(), acpi=assets.acpi)
        return cls(spec, str(floor_initrd(work / "profile.img", profile=True)), shutil.which(cfg.qemu) or cfg.qemu,
                   work)

    @contextlib.contextmanager
    def _started(self, cmdline: str, console: bool,
                 kernel: str | None) -> Iterator[tuple[subprocess.Popen[bytes], socket.socket | None]]:
        spec = replace(self.spec, cmdline=cmdline, kernel=Path(kernel) if kernel else self.spec.kernel,
                       **({"initrd": self.profile_initrd} if console else {}))
        with runtime_fds(self.work, spec) as fds:
            reader = None
            if console:  # connected before QEMU starts (queued in the backlog), so no early message is lost
                reader = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                with agent.socket_path(self.work, spec.console_socket) as path:
                    reader.connect(path)
            proc = subprocess.Popen(build_argv(spec, qemu=self.qemu, fds=fds), pass_fds=list(fds.values()),
                                    cwd=self.work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            yield proc, reader
        finally:
            if reader is not None:
                reader.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    def time(self, cmdline: str | None = None, kernel: str | None = None) -> float:
        """Wall seconds from starting QEMU to its exit (default: kvmrkt's command line and kernel)."""
        return self.measure(cmdline, kernel)[0]

    def measure(self, cmdline: str | None = None, kernel: str | None = None) -> tuple[float, float]:
        """Wall seconds from starting QEMU to its exit, and the CPU seconds QEMU used (user + system: what
        other load on the host inflates less than the wall time)."""
        cmdline = cmdline or apply_variant(self.spec.cmdline, "")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        begin = time.perf_counter()
        with self._started(cmdline, console=False, kernel=kernel) as (proc, _):
            try:
                _, err = proc.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                sys.exit(f"the guest did not power off within {TIMEOUT_S:.0f} s: {cmdline}")
            if proc.returncode != 0:
                sys.exit(f"QEMU failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}")
        wall = time.perf_counter() - begin
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

    def console(self, cmdline: str, kernel: str | None = None) -> str:
        """The serial console of one boot with the profile's initramfs (a guest that hangs is killed after
        ``TIMEOUT_S``: its console so far, where the hang shows)."""
        chunks: list[bytes] = []
        deadline = time.monotonic() + TIMEOUT_S
        with self._started(cmdline, console=True, kernel=kernel) as (_, reader):
            assert reader is not None
            with contextlib.suppress(TimeoutError):
                while (left := deadline - time.monotonic()) > 0:
                    reader.settimeout(left)
                    if not (chunk := reader.recv(65536)):
                        break
                    chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")


    def sample(self, cmdline: str, kernel: str | None = None) -> list[tuple[float, int]]:
        """One boot's (wall seconds, guest instruction pointer) samples, taken through QEMU's monitor."""
        from qemu.qmp.legacy import QEMUMonitorProtocol

        samples: list[tuple[float, int]] = []
        with self._started(cmdline, console=False, kernel=kernel) as (proc, _):
            begin = time.perf_counter()
            with agent.socket_path(self.work, QMP_SOCKET) as path:
                qmp = QEMUMonitorProtocol(path)
                qmp.connect()
                with contextlib.suppress(Exception):  # the guest powered off between two samples
                    while proc.poll() is None:
                        reply = qmp.cmd("human-monitor-command", {"command-line": "info registers"})
                        if rip := re.search(r"RIP=([0-9a-f]+)", str(reply.get("return", ""))):
                            samples.append((time.perf_counter() - begin, int(rip[1], 16)))
                with contextlib.suppress(Exception):
                    qmp.close()
        return samples


def sampled(samples: list[tuple[float, int]], vmlinux: Path, top: int = 25) -> dict[str, object]:
    """Where the samples fell: the kernel function holding each (user space is one bucket), overall and per
    50 ms of wall time."""
    out = subprocess.run(["nm", "-n", "--defined-only", str(vmlinux)], capture_output=True, text=True,
                         check=False).stdout
    syms = [(int(f[0], 16), f[2]) for f in map(str.split, out.splitlines()) if len(f) >= 3 and f[1] in "tTwW"]
    addrs = [a for a, _ in syms]

    def name(rip: int) -> str:
        i = bisect.bisect_right(addrs, rip) - 1
        return syms[i][1] if rip >= 0xFFFFFFFF80000000 and i >= 0 else "(user space)"

    per_slot: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for at, rip in samples:
        per_slot[int(at * 20)][name(rip)] += 1
    return {
        "samples": len(samples),
        "wall_s": round(samples[-1][0], 3) if samples else None,
        "functions": dict(collections.Counter(name(rip) for _, rip in samples).most_common(top)),
        "per_50ms": {f"{slot / 20:.2f}": dict(c.most_common(3)) for slot, c in sorted(per_slot.items())},
    }


_STAMP = re.compile(r"^\[\s*(\d+\.\d+)\] (.*)$")
_ADDR = re.compile(r"0xffffffff[0-9a-f]{8}")
_INITCALL = re.compile(r"initcall (\S+?)(?:\+\S*)? returned \S+ after (\d+) usecs")
# Waits worth naming: the message that ends each (the kernel prints when a wait is over, or that it gave up).
MARKERS = {
    "apic_timer_check": "APIC timer disabled due to verification failure",
    "apic_timer_calibration": "calibrating APIC timer",
    "smp_alternatives": "SMP alternatives",
    "smp_boot": "smp: Brought up",
    "delay_loop": "Calibrating delay loop",
    "tsc_unstable": "Marking TSC unstable",
    "tsc_clocksource": "Switched to clocksource tsc",
    "clocksource_switch": "clocksource: Switched to clocksource",
    "unpack_initramfs": "Trying to unpack rootfs",
    "init": "Run /",
}


def symbols(vmlinux: Path) -> dict[str, str]:
    """Kernel addresses to function names, from the vmlinux's symbol table (the minimal kernel has no kallsyms,
    so ``initcall_debug`` prints addresses)."""
    out = subprocess.run(["nm", "--defined-only", str(vmlinux)], capture_output=True, text=True, check=False).stdout
    return {f"0x{addr.lstrip('0')}": name for addr, kind, name in (line.split()[:3] for line in out.splitlines()
                                                                  if len(line.split()) >= 3) if kind in "tT"}


def timeline(console: str, names: dict[str, str] | None = None, top: int = 10) -> dict[str, object]:
    """What a profiled boot's console says about where the guest's time went (guest clock, seconds)."""
    names = names or {}
    # the messages the quiet console printed come again in the dmesg dump: once each, in guest-clock order
    lines = sorted(dict.fromkeys((float(m[1]), _ADDR.sub(lambda a: names.get(a[0], a[0]), m[2]))
                                 for m in map(_STAMP.match, console.splitlines()) if m), key=lambda line: line[0])
    initcalls = sorted(((int(m[2]), names.get(m[1], m[1])) for _, text in lines if (m := _INITCALL.search(text))),
                       reverse=True)
    boot = lines[:next((i + 1 for i, (_, text) in enumerate(lines) if text.startswith(MARKERS["init"])), len(lines))]
    gaps = sorted(((b[0] - a[0], a, b) for a, b in itertools.pairwise(boot)), reverse=True)[:top]  # up to init
    lpj = re.search(r"\(lpj=(\d+)\)", console)
    return {
        "to_init_s": next((t for t, text in lines if text.startswith(MARKERS["init"])), None),
        "last_message_s": lines[-1][0] if lines else None,
        "initcalls_total_s": round(sum(us for us, _ in initcalls) / 1e6, 3),
        "largest_initcalls_ms": {name: round(us / 1000, 1) for us, name in initcalls[:top]},
        "largest_gaps": [{"s": round(d, 3), "at": round(a[0], 3), "after": a[1][:90], "before": b[1][:90]}
                         for d, a, b in gaps],
        "markers_s": {name: t for name, needle in MARKERS.items()
                      if (t := next((t for t, text in lines if needle in text), None)) is not None},
        "lpj": int(lpj[1]) if lpj else None,
    }


def run(floor: Floor, variants: dict[str, str], runs: int, profile: bool,
        kernels: dict[str, str] | None = None) -> dict[str, object]:
    """Interleaved timings (A, B, C, A, B, C, ...) of every variant on every kernel (the installed one, and
    ``kernels``: label -> vmlinux), after one warm-up round."""
    base = floor.spec.cmdline
    kernels = {"": str(floor.spec.kernel), **(kernels or {})}
    out: dict[str, object] = {"accel": floor.spec.accel, "vcpus": floor.spec.vcpus, "base_cmdline": base,
                              "runs": runs, "kernels": kernels}
    lpj = None
    if profile:
        profiles = {}
        for label, kernel in kernels.items():
            names = symbols(Path(kernel))
            for name, tokens in variants.items():
                if LPJ_AUTO in tokens.split() and lpj is None:
                    continue
                prof = timeline(floor.console(apply_variant(base, f"{tokens} {PROFILE}", lpj, PROFILE_INIT),
                                              kernel), names)
                lpj = lpj or (prof["lpj"] if isinstance(prof["lpj"], int) else None)
                profiles[_label(name, label)] = prof
        out["profiles"] = profiles
    lines = {name: apply_variant(base, tokens, lpj) for name, tokens in variants.items()
             if LPJ_AUTO not in tokens.split() or lpj is not None}
    boots = {_label(name, label): (cmdline, kernel) for name, cmdline in lines.items()
             for label, kernel in kernels.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in boots}
    for cmdline, kernel in boots.values():  # warm the page cache and QEMU's first start
        floor.time(cmdline, kernel)
    for _ in range(runs):
        for name, (cmdline, kernel) in boots.items():
            times[name].append(floor.measure(cmdline, kernel))
    out["median_s"] = {name: round(statistics.median(w for w, _ in t), 3) for name, t in times.items()}
    out["median_cpu_s"] = {name: round(statistics.median(c for _, c in t), 3) for name, t in times.items()}
    out["times_s"] = {name: [round(w, 3) for w, _ in t] for name, t in times.items()}
    out["cmdlines"] = lines
    return out


def _label(variant: str, kernel: str) -> str:
    return f"{variant}@{kernel}" if kernel else variant


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--accel", default="auto")
    ap.add_argument("--vcpus", type=int, default=1)
    ap.add_argument("--kernel", default=None, choices=["minimal", "debian-cloud"], help="default: [stage1] kernel")
    ap.add_argument("--profile", action="store_true", help="also print each variant's guest-clock timeline")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:TOKENS",
                    help="measure these variants (and kvmrkt's line) instead of the built-in set")
    ap.add_argument("--sample", action="store_true",
                    help="only sample where one boot of each kernel spends its time (kvmrkt's line)")
    ap.add_argument("--vmlinux", action="append", default=[], metavar="LABEL=PATH",
                    help="also boot this kernel with every variant, interleaved with the installed one")
    args = ap.parse_args()
    variants = dict(VARIANTS)
    if args.variant:
        variants = {"kvmrkt": ""} | dict(v.split(":", 1) if ":" in v else (v, v) for v in args.variant)
    if os.geteuid() != 0:
        sys.exit("run as root (the guest assets are root-only)")
    with tempfile.TemporaryDirectory(prefix="kvmrkt-kboot-") as tmp:
        cfg = load_config().stage1
        floor = Floor.create(Path(tmp), replace(cfg, kernel=args.kernel or cfg.kernel), accel=args.accel,
                             vcpus=args.vcpus)
        kernels = dict(k.split("=", 1) if "=" in k else (Path(k).name, k) for k in args.vmlinux)
        for path in kernels.values():
            if not Path(path).is_file():
                sys.exit(f"no kernel at {path}")
        if args.sample:
            kernels = {"": str(floor.spec.kernel), **kernels}
            report = {label or "kvmrkt": sampled(floor.sample(apply_variant(floor.spec.cmdline, ""), kernel),
                                                 Path(kernel)) for label, kernel in kernels.items()}
            print(json.dumps(report, indent=2))
            return
        print(json.dumps(run(floor, variants, args.runs, args.profile, kernels), indent=2))


if __name__ == "__main__":
    main()
