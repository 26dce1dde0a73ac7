"""Where a template-restored pod's guest spends the READY -> exit window of ``kvmrkt run busybox --exec /bin/true``
(the first exec of the app after a restore: its root mounted through dm-verity, the app's page cache cold, and
every kernel path translated again by TCG, whose translation cache is not in the snapshot).

Each run starts the pod from a VM template (built in a directory of the bench's own), waits until the guest status
says READY, then connects to the pod's QMP socket (free again once the restore resumed the VM) and asks QEMU for
every vCPU's instruction pointer (``info registers -a``) as often as it answers, until QEMU exits. The samples are
attributed to the functions of the pod's kernel (its vmlinux's symbol table), per phase of the guest status:
READY -> START (network, volumes, the app's root and /dev), START -> EXIT (the app's ns-init, its exec and exit),
after EXIT (power-off). Prints JSON: per phase the number of samples and the largest shares, in percent. The
sampling slows the guest down: read it for shares, not for times.

Usage (as root, after `make setup`):
    .venv/bin/python bench/exec_sample.py [--runs N] [--top N]

Trust boundary: none beyond the benchmark's own files.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchtpm import swtpm
from launch_profile import REPO, _command, _setup
from pycache import use_bytecode_cache

from kvmrkt.config import load_config
from kvmrkt.errors import Stage1Error
from stage1_kvm import agent
from stage1_kvm.assets import load_assets
from stage1_kvm.monitor import Monitor
from stage1_kvm.vmspec import GUEST_STATUS, QMP_SOCKET


def kernel_symbols(vmlinux: Path) -> tuple[list[int], list[str]]:
    """The vmlinux's text symbols, sorted by address."""
    out = subprocess.run(["nm", "-n", "--defined-only", str(vmlinux)], capture_output=True, text=True,
                         check=False).stdout
    syms = [(int(f[0], 16), f[2]) for f in map(str.split, out.splitlines()) if len(f) >= 3 and f[1] in "tTwW"]
    return [a for a, _ in syms], [n for _, n in syms]


def phase(status: str) -> str:
    """The guest's phase, from its status port's text so far."""
    if "EXIT " in status:
        return "3-after-exit"
    return "2-start-to-exit" if "START " in status else "1-ready-to-start"


def sample_run(argv: list[str], env: dict[str, str], data: Path, name: Callable[[int], str],
               counts: dict[str, collections.Counter[str]]) -> int:
    """One pod's samples, added to ``counts``; returns how many were taken."""
    proc = subprocess.Popen(argv, env=env, cwd="/", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pod = None
    deadline = time.monotonic() + 60
    while pod is None and proc.poll() is None and time.monotonic() < deadline:
        for status in (data / "pods" / "run").glob(f"*/{GUEST_STATUS}"):
            if "READY" in status.read_text(errors="replace"):
                pod = status.parent
        time.sleep(0.001)
    taken = 0
    if pod is not None:
        try:
            with agent.socket_path(pod, QMP_SOCKET) as path:
                q = Monitor(path, time.monotonic() + 10, lambda: proc.poll() is None)
        except Stage1Error:  # the pod was over before the monitor answered
            proc.wait()
            return 0
        with contextlib.suppress(Exception):  # QEMU exits between two samples
            while proc.poll() is None:
                now = phase((pod / GUEST_STATUS).read_text(errors="replace"))
                regs = str(q.cmd("human-monitor-command", {"command-line": "info registers -a"}))
                for rip in re.findall(r"RIP=([0-9a-f]+)", regs):
                    counts[now][name(int(rip, 16))] += 1
                taken += 1
        with contextlib.suppress(Exception):
            q.close()
    proc.wait()
    return taken


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    addrs, names = kernel_symbols(load_assets(load_config().stage1, "minimal").kernel)

    def name(rip: int) -> str:
        i = bisect.bisect_right(addrs, rip) - 1
        return names[i] if rip >= 0xFFFFFFFF80000000 and i >= 0 else "(user space)"

    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    with tempfile.TemporaryDirectory(prefix="kvmrkt-xs-") as tmp:
        work = Path(tmp)
        use_bytecode_cache(work)
        subprocess.run([REPO / "examples" / "busybox-image.sh", work / "img", "latest"], check=True,
                       capture_output=True)
        with swtpm(work) as tcti:
            data, etc = _setup(work, REPO, tcti, "this", True)
            argv, env = _command(REPO, data, etc, "none")
            gc = [*argv[:7], "gc", "--grace-period=0s"]
            subprocess.run(argv, env=env, cwd="/", check=True, capture_output=True)  # records the pod's shape
            subprocess.run(gc, env=env, cwd="/", check=True, capture_output=True)
            subprocess.run([*argv[:7], "stage1", "template", "build"], env=env, cwd="/", check=True,
                           capture_output=True)
            taken = []
            for _ in range(args.runs):
                taken.append(sample_run(argv, env, data, name, counts))
                subprocess.run(gc, env=env, cwd="/", check=True, capture_output=True)
    if not any(taken):
        sys.exit("no samples: no run reached READY")
    report: dict[str, object] = {"runs": args.runs, "samples_per_run": taken}
    for ph, c in sorted(counts.items()):
        total = sum(c.values())
        report[ph] = {"samples": total,
                      "percent": {fn: round(100 * n / total, 1) for fn, n in c.most_common(args.top)}}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
