"""Launch profile: where the host's time goes in ``kvmrkt run busybox --exec /bin/true``.

Each run gets the write end of a pipe in ``KVMRKT_TIMELINE_FD`` (``kvmrkt.host.timeline``): the CLI stamps each
stage of the launch on the monotonic clock (CLI start, imports done, image resolved, policy checked, rootfs
verified, pod prepared, network up, assets verified, per-pod initramfs written, measured, jail built, QEMU
spawned, guest init ready, app started, apps done, VM exited, network down), and this script adds its own
stamps for the process spawned and ended. It prints JSON: for ``--net=none`` and ``--net=default``, the median
time spent in each stage (from the previous stamp to this one), the median total, which stages are the host's
(everything but guest boot and the app), and the CLI process's own CPU time. With ``--compare TREE`` the same
command from another source tree (an older commit, e.g. from ``git archive``) runs interleaved with this one
(ABAB...), and its total medians, the ratio and (if it has the timeline) its stages are reported: a
before/after table from one run. Modules are byte-compiled as in an installed package (``bench/pycache.py``).
``--importtime`` adds the largest imports of one run (``python -X importtime``), by cumulative microseconds.
``--template`` starts the pods from VM templates (built by each tree after its warm-up run, in a directory of the
bench's own) instead of booting them; without it templates are off.

Usage (as root, after `make setup`):
    .venv/bin/python bench/launch_profile.py [--runs N] [--net none,default] [--compare TREE] [--importtime]
                                                   [--template]
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
from pycache import use_bytecode_cache

REPO = Path(__file__).resolve().parents[1]
# The stages the guest (kernel boot, init, the app itself) spends: what is left is the host's.
GUEST_STAGES = ("guest-ready", "app-started", "apps-done", "vm-exited")


def _command(tree: Path, data: Path, etc: Path, net: str) -> tuple[list[str], dict[str, str]]:
    """The command and its environment; it runs in / (``python -m`` imports from its working directory first,
    which would make every tree run the one it was started in)."""
    argv = [sys.executable, "-m", "kvmrkt", "--dir", str(data), "--config-dir", str(etc), "run", "--accel=tcg",
            f"--net={net}", "busybox", "--exec", "/bin/true"]
    return argv, {**os.environ, "PYTHONPATH": str(tree)}


Sample = list[tuple[str, float, float]]  # (stage, seconds since spawn, the CLI's own CPU seconds so far)


def _one(argv: list[str], env: dict[str, str], *, gc: list[str]) -> tuple[float, Sample]:
    """One run: its total and its stages."""
    rfd, wfd = os.pipe()
    begin = time.monotonic_ns()
    proc = subprocess.Popen(argv, env={**env, "KVMRKT_TIMELINE_FD": str(wfd)}, pass_fds=[wfd], cwd="/",
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as stamps:
        text = stamps.read().decode()  # EOF when the CLI (the only holder of the write end) exits
    _, err = proc.communicate()
    end = time.monotonic_ns()
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed ({proc.returncode}): {' '.join(argv)}\n{err.decode()[-2000:]}")
    subprocess.run(gc, env=env, capture_output=True, check=True)
    stages = [(name, (int(ns) - begin) / 1e9, int(cpu) / 1e9)
              for ns, cpu, name in (line.split(" ", 2) for line in text.splitlines())]
    return (end - begin) / 1e9, [*stages, ("cli-exited", (end - begin) / 1e9, stages[-1][2] if stages else 0.0)]


def _profile(samples: list[Sample]) -> dict[str, object]:
    """Median wall time of each stage (since the previous stamp), in the order the stages were reached; the
    host's and the guest's share; and the CLI's own CPU time (its children's, QEMU's and the plugins', not
    included), which a busy host disturbs less than wall times."""
    if not samples or len(samples[0]) < 2:
        return {}
    order: list[str] = []
    spans: dict[str, list[float]] = {}
    for stages in samples:
        prev = 0.0
        for name, at, _cpu in stages:
            if name not in spans:
                order.append(name)
                spans[name] = []
            spans[name].append(at - prev)
            prev = at
    medians = {name: round(statistics.median(spans[name]) * 1000, 1) for name in order}
    guest = sum(v for k, v in medians.items() if k in GUEST_STAGES)
    cpu = statistics.median(stages[-1][2] for stages in samples)
    return {"stage_ms": medians, "host_ms": round(sum(medians.values()) - guest, 1), "guest_ms": round(guest, 1),
            "cli_cpu_ms": round(cpu * 1000, 1)}


def _importtime(argv: list[str], env: dict[str, str], gc: list[str], top: int = 25) -> dict[str, int]:
    proc = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env, cwd="/", capture_output=True,
                          check=True)
    subprocess.run(gc, env=env, capture_output=True, check=True)
    rows = []
    for line in proc.stderr.decode().splitlines():
        parts = line.split("|")
        if line.startswith("import time:") and len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((parts[2].rstrip(), int(parts[1])))
    return dict(sorted(rows, key=lambda r: -r[1])[:top])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--net", default="none,default", help="comma list of --net values to profile")
    ap.add_argument("--compare", type=Path, help="another source tree, run interleaved as the baseline")
    ap.add_argument("--importtime", action="store_true")
    ap.add_argument("--template", action="store_true", help="start pods from VM templates, not booted")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmrkt-lp-") as tmp:
        print(json.dumps(_bench(Path(tmp), args), indent=2))


def _setup(work: Path, tree: Path, tcti: str, name: str, template: bool) -> tuple[Path, Path]:
    data, etc = work / f"data-{name}", work / f"etc-{name}"
    etc.mkdir()
    templates = work / f"templates-{name}"
    templates.mkdir(mode=0o700)
    stage1 = f'templates_dir = "{templates}"' if template else "templates = false"
    (etc / "config.toml").write_text(f'[stage1]\nkernel = "minimal"\n{stage1}\n[measure]\ntcti = "{tcti}"\n'
                                     f'log_dir = "{data / "measure"}"\n')
    (etc / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    argv = [sys.executable, "-m", "kvmrkt", "--dir", str(data), "--config-dir", str(etc), "image", "import",
            f"oci:{work / 'img'}:latest", "--name", "busybox"]
    subprocess.run(argv, env={**os.environ, "PYTHONPATH": str(tree)}, check=True, capture_output=True)
    return data, etc


def _bench(work: Path, args: argparse.Namespace) -> dict[str, object]:
    use_bytecode_cache(work)
    subprocess.run([REPO / "examples" / "busybox-image.sh", work / "img", "latest"], check=True, capture_output=True)
    trees = {"this": REPO, **({"baseline": args.compare.resolve()} if args.compare else {})}
    out: dict[str, object] = {"runs": args.runs, "trees": {k: str(v) for k, v in trees.items()}}
    with swtpm(work) as tcti:
        dirs = {name: _setup(work, tree, tcti, name, args.template) for name, tree in trees.items()}
        for net in args.net.split(","):
            cmds = {name: _command(trees[name], *dirs[name], net) for name in trees}
            gcs = {name: [*cmds[name][0][:7], "gc", "--grace-period=0s"] for name in trees}
            for name in trees:  # warm the page cache (and record the pod's shape)
                _one(*cmds[name], gc=gcs[name])
                if args.template:
                    subprocess.run([*cmds[name][0][:7], "stage1", "template", "build"], env=cmds[name][1],
                                   check=True, capture_output=True, cwd="/")
            totals: dict[str, list[float]] = {name: [] for name in trees}
            samples: dict[str, list[Sample]] = {name: [] for name in trees}
            for _ in range(args.runs):
                for name in trees:
                    total, stages = _one(*cmds[name], gc=gcs[name])
                    totals[name].append(total)
                    samples[name].append(stages)
            result: dict[str, object] = {"total_median_s": {k: round(statistics.median(v), 3)
                                                            for k, v in totals.items()},
                                         "total_s": {k: [round(x, 3) for x in v] for k, v in totals.items()},
                                         **_profile(samples["this"])}
            if args.compare:  # a baseline with the timeline (any commit since it exists) is profiled as well
                result["baseline"] = _profile(samples["baseline"])
            if args.compare:
                result["ratio_this_to_baseline"] = round(statistics.median(totals["this"])
                                                         / statistics.median(totals["baseline"]), 3)
            if args.importtime:
                result["largest_imports_us"] = _importtime(*cmds["this"], gcs["this"])
            out[f"net={net}"] = result
    return out


if __name__ == "__main__":
    main()
