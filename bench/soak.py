"""Soak benchmark: beats on kvmrkt for a while and reports failures, launch-time percentiles, memory and leaks.

Three phases, each against the bench's own data dir, config dir and swtpm (nothing under /etc/kvmrkt or
/var/lib/kvmrkt is touched; pods boot cold, templates off, minimal kernel, jail uids from a range of the bench's
own so that other sessions' pods are never counted):

- ``sequential``: N ``kvmrkt run --net=default busybox --exec /bin/sh -- -c 'echo ok'`` one after the other
  (``kvmrkt gc --grace-period=0s`` every 25 runs). Launch time = the wall time of each ``kvmrkt run``.
- ``concurrent``: M pods started at once on the default network, guest memory chosen so that M fit in the host's
  available memory (printed as ``guest_memory``). Each sums numbers, then sleeps until stopped. Launch time =
  from its ``kvmrkt run`` being spawned to its app running (``guest-status`` says START). While they run,
  ``kvmrkt list``, ``kvmrkt status UUID`` and ``kvmrkt enter UUID /bin/sh -c 'echo $((6*7))'`` run against them;
  then ``kvmrkt stop UUID`` ends each (its ``kvmrkt run`` must exit 143, its app having printed the sum).
- ``imports``: K different images (the busybox image of ``examples/busybox-image.sh``, each tag with a file of its
  own added by ``umoci repack``, so every digest differs) imported concurrently; as each import ends a pod runs
  it and checks its file, while ``kvmrkt image gc`` and ``kvmrkt gc --grace-period=0s`` run in a loop beside them.
  Launch time = the wall time of each ``kvmrkt run``.

Per phase (JSON on stdout, progress on stderr): pods started, failures (command, exit code, one line of stderr),
p50/p90/p99 launch time, duration, the peak host RSS/PSS of the processes under the data dir (sampled each second
from /proc/PID/smaps_rollup), and a leak census after the phase's final gc compared with the census before the
bench: processes (QEMU, swtpm, CNI plugins, ``kvmrkt`` supervisors) whose cmdline names the data dir or whose
environment names a bench pod, the bench pods' network namespaces, veths whose peer is in one of them, taps,
iptables rules and chains, IPAM leases, mounts, loop and dm devices, cgroups, jail directories, uid leases and
processes running as a jail uid, scratch entries, files under the data dir held open, and the store's size
against the images it keeps. Goals (printed, not asserted): 0 failures, 0 leaks, p99 <= 2 x p50.

Usage (as root, after `make setup`):
    .venv/bin/python bench/soak.py [--sequential N] [--concurrent M] [--imports K] [--accel auto|tcg|kvm]
                                   [--boot-timeout S]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchtpm import swtpm
from pycache import use_bytecode_cache

from kvmrkt.net.firewall import chain as fw_chain

REPO = Path(__file__).resolve().parents[1]
UID_RANGE = "2100000000-2100065535"  # the bench's jail uids: no other session's pod runs as one of these
HOLD_S = 900  # a concurrent pod sleeps at most this long waiting to be stopped
GC_EVERY = 25


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Failure:
    cmd: str
    rc: int
    stderr: str

    def to_dict(self) -> dict[str, object]:
        return {"cmd": self.cmd, "rc": self.rc, "stderr": self.stderr}


def _last_line(text: str) -> str:
    """The stderr line that says what failed: the last ``error`` line (kvmrkt puts a hint after it), else the
    last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or [""])[-1][:300]


@dataclass
class Soak:
    """The bench's kvmrkt (its data dir, config dir, cgroup parent), the pods it started, the children it runs."""

    work: Path
    data: Path
    etc: Path
    cgroup_parent: str
    uuids: set[str] = field(default_factory=set)
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "kvmrkt", "--dir", str(self.data), "--config-dir", str(self.etc), *args]

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self.argv(*args), cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        with self.lock:
            self.procs[proc.pid] = proc
        return proc

    def finish(self, proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, str, str]:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by pid
            out, err = proc.communicate()
            err += f"\n(bench: killed after {timeout:.0f} s)".encode()
        with self.lock:
            self.procs.pop(proc.pid, None)
        return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def call(self, *args: str, timeout: float = 300) -> tuple[int, str, str, float]:
        begin = time.monotonic()
        rc, out, err = self.finish(self.spawn(*args), timeout)
        return rc, out, err, time.monotonic() - begin

    def uuid_file(self, tag: str) -> Path:
        return self.work / "uuids" / tag

    def record_uuid(self, path: Path) -> str:
        uuid = path.read_text().strip() if path.exists() else ""
        if uuid:
            with self.lock:
                self.uuids.add(uuid)
        return uuid

    def pod_dir(self, uuid: str) -> Path:
        return self.data / "pods" / "run" / uuid


# --- figures ------------------------------------------------------------------------------------------------


def percentiles(xs: list[float]) -> dict[str, float | None]:
    """Nearest-rank p50/p90/p99 in seconds (None without samples)."""
    s = sorted(xs)

    def rank(p: float) -> float | None:
        return round(s[max(0, math.ceil(p / 100 * len(s)) - 1)], 3) if s else None

    return {"p50_s": rank(50), "p90_s": rank(90), "p99_s": rank(99), "max_s": round(s[-1], 3) if s else None}


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _environ(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _pids() -> list[str]:
    return [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and int(p.name) != os.getpid()]


def bench_pids(soak: Soak) -> dict[str, str]:
    """Processes that belong to the bench's data dir: the data dir in their cmdline (kvmrkt, QEMU), or a bench
    pod's uuid as their CNI container id (CNI plugins); pid -> what they are."""
    marker = str(soak.data).encode()
    ids = [f"CNI_CONTAINERID={u}".encode() for u in list(soak.uuids)]
    found = {}
    for pid in _pids():
        cmd = _cmdline(pid)
        env = _environ(pid) if ids and marker not in cmd else b""
        if marker in cmd or any(i in env for i in ids):
            argv = cmd.split(b"\0")
            name = Path(argv[0].decode(errors="replace")).name
            if name.startswith("python") and b"kvmrkt" in cmd:
                kind = "kvmrkt " + next((a.decode() for a in argv[6:] if a and not a.startswith(b"-")), "?")
            else:
                kind = name
            found[pid] = kind
    return found


class MemorySampler:
    """Peak summed RSS and PSS (smaps_rollup) of the bench's processes, sampled each second in a thread."""

    def __init__(self, soak: Soak) -> None:
        self.soak, self.peak_pss, self.peak_rss, self.peak_procs = soak, 0, 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            pss = rss = 0
            pids = bench_pids(self.soak)
            for pid in pids:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                        if line.startswith("Pss:"):
                            pss += int(line.split()[1])
                        elif line.startswith("Rss:"):
                            rss += int(line.split()[1])
            if pss > self.peak_pss:
                self.peak_pss, self.peak_rss, self.peak_procs = pss, rss, len(pids)

    def __enter__(self) -> MemorySampler:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def figures(self) -> dict[str, object]:
        return {"peak_pss_mib": round(self.peak_pss / 1024, 1), "rss_at_peak_mib": round(self.peak_rss / 1024, 1),
                "processes_at_peak": self.peak_procs}


# --- leak census: one function per kind of thing -----------------------------------------------------------


def _out(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return ""


def census_processes(soak: Soak) -> set[str]:
    return {f"{pid} {kind}" for pid, kind in bench_pids(soak).items()}


def _netns_ids(soak: Soak) -> dict[str, str]:
    """The bench pods' namespaces that exist, name -> nsid as the host sees it ('' if it has none)."""
    found = {}
    for line in _out("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith("kvmrkt-") and name.removeprefix("kvmrkt-") in soak.uuids:
            found[name] = line.split("id: ")[1].rstrip(")") if "id: " in line else ""
    return found


def census_netns(soak: Soak) -> set[str]:
    return set(_netns_ids(soak))


def census_veths(soak: Soak) -> set[str]:
    """Host-side veths whose peer is in a bench pod's namespace (ptp's; a veth whose namespace is gone is gone)."""
    ids = {v for v in _netns_ids(soak).values() if v}
    links = json.loads(_out("ip", "-j", "link", "show") or "[]")
    return {f"{ln['ifname']} (peer in nsid {ln.get('link_netnsid')})" for ln in links
            if ln["ifname"].startswith("veth") and str(ln.get("link_netnsid", "")) in ids}


def census_new_veths(before: set[str]) -> set[str]:
    """Host-wide, for information: veths that did not exist before the bench (other sessions' too)."""
    links = json.loads(_out("ip", "-j", "link", "show") or "[]")
    return {ln["ifname"] for ln in links if ln["ifname"].startswith("veth")} - before


def census_taps(soak: Soak) -> set[str]:
    prefixes = {"kvt" + u.replace("-", "")[:10] for u in soak.uuids}
    return {p.name for p in Path("/sys/class/net").glob("kvt*")
            if (p / "tun_flags").exists() and p.name[:13] in prefixes}


def census_iptables(soak: Soak) -> set[str]:
    chains = {fw_chain("default", u) for u in soak.uuids}
    found = set()
    for line in _out("iptables-save").splitlines():
        if line.startswith(":KVMRKT-") and line[1:].split()[0] in chains:
            found.add(line.split()[0])
        elif line.startswith("-A") and any(f'id: \\"{u}\\"' in line for u in soak.uuids):
            found.add(line)
    return found


def census_ipam() -> Callable[[Soak], set[str]]:
    root = Path("/var/lib/cni/networks/default")

    def leases(soak: Soak) -> set[str]:
        found = set()
        for f in root.glob("*") if root.is_dir() else []:
            with contextlib.suppress(OSError):
                if f.is_file() and f.read_text().split("\n")[0].strip() in soak.uuids:
                    found.add(f"{f.name} -> {f.read_text().split()[0]}")
        return found

    return leases


def census_mounts(soak: Soak) -> set[str]:
    found = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4]
        run = point.removeprefix("/run/kvmrkt/").split("/")[0] if point.startswith("/run/kvmrkt/") else ""
        if point.startswith(str(soak.data)) or run in soak.uuids:
            found.add(point)
    return found


def census_block(soak: Soak) -> set[str]:
    loops = {f"loop {ln}" for ln in _out("losetup", "-a").splitlines() if str(soak.data) in ln}
    dms = {f"dm {ln.split()[0]}" for ln in _out("dmsetup", "ls").splitlines()
           if ln.split() and any(u in ln for u in soak.uuids)}
    return loops | dms


def census_cgroups(soak: Soak) -> set[str]:
    return {str(d) for base in Path("/sys/fs/cgroup").glob(f"*/{soak.cgroup_parent}") if base.is_dir()
            for d in base.iterdir() if d.is_dir()}


def census_jail(soak: Soak) -> set[str]:
    """Jail directories of pods (a pod dir's ``jail``), uid leases and share grants left in the data dir's
    ``jail/`` tables, processes running as a uid of the bench's range."""
    found = {f"jail dir {p}" for p in (soak.data / "pods").glob("*/*/jail")}
    for table in ("uids.json", "shares.json"):
        path = soak.data / "jail" / table
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(path.read_text())
            found |= {f"{table} {k}={v}" for k, v in doc.items() if not k.startswith("@")}
    lo, hi = (int(x) for x in UID_RANGE.split("-"))
    for pid in _pids():
        with contextlib.suppress(OSError):
            uid = Path(f"/proc/{pid}").stat().st_uid
            if lo <= uid <= hi:
                status = dict(ln.split(":\t", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                              if ":\t" in ln)
                found.add(f"process {pid} uid {uid} {status.get('Name', '?')} state {status.get('State', '?')} "
                          f"ppid {status.get('PPid', '?')}")
    return found


def census_scratch(soak: Soak) -> set[str]:
    tmp = soak.data / "cas" / "tmp"
    return {f"store tmp {p.name}" for p in tmp.iterdir()} if tmp.is_dir() else set()


def census_shm_scratch(before: set[str]) -> set[str]:
    """Host-wide, for information: new entries in root's in-memory scratch (shared by every session of root)."""
    shm = Path(f"/dev/shm/kvmrkt-{os.geteuid()}")
    return ({p.name for p in shm.iterdir()} if shm.is_dir() else set()) - before


def census_open_files(soak: Soak) -> set[str]:
    """Files under the data dir (or a bench pod's /run/kvmrkt dir) that some process other than the bench holds."""
    marks = [str(soak.data), *(f"/run/kvmrkt/{u}" for u in soak.uuids)]
    found = set()
    for pid in _pids():
        fds = Path(f"/proc/{pid}/fd")
        with contextlib.suppress(OSError):
            for fd in fds.iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if any(target.startswith(m) for m in marks):
                        found.add(f"pid {pid} {target}")
    return found


def store_figures(soak: Soak) -> dict[str, int]:
    """``du`` of the store vs what the images ``kvmrkt image list`` shows need: their rootfs (as listed) and the
    store's blobs of their layers and configs (each counted once)."""
    du = _out("du", "-sb", str(soak.data / "cas")).split()
    rc, out, _err, _t = soak.call("image", "list", "--format", "json")
    images = json.loads(out) if rc == 0 and out.strip() else []
    rootfs = {r["rootfs"]["digest"]: int(r["rootfs"]["size"]) for r in images}
    blobs = set()
    for r in images:
        for digest in [*r.get("layers", []), r.get("configDigest", "")]:
            alg, _, hexd = str(digest).partition(":")
            blob = soak.data / "cas" / "blobs" / alg / hexd
            if hexd and blob.is_file():
                blobs.add(blob)
    kept = sum(rootfs.values()) + sum(b.stat().st_size for b in blobs)
    return {"store_du_bytes": int(du[0]) if du else 0, "images_kept": len(images), "images_listed_bytes": kept}


CENSUS: dict[str, Callable[[Soak], set[str]]] = {
    "processes": census_processes, "netns": census_netns, "veths": census_veths, "taps": census_taps,
    "iptables": census_iptables, "ipam_leases": census_ipam(), "mounts": census_mounts, "block": census_block,
    "cgroups": census_cgroups, "jail": census_jail, "scratch": census_scratch, "open_files": census_open_files,
}


@dataclass
class Baseline:
    census: dict[str, set[str]]
    veths: set[str]
    shm: set[str]
    store: dict[str, int]


def take_baseline(soak: Soak) -> Baseline:
    links = json.loads(_out("ip", "-j", "link", "show") or "[]")
    shm = Path(f"/dev/shm/kvmrkt-{os.geteuid()}")
    return Baseline({k: f(soak) for k, f in CENSUS.items()},
                    {ln["ifname"] for ln in links if ln["ifname"].startswith("veth")},
                    {p.name for p in shm.iterdir()} if shm.is_dir() else set(), store_figures(soak))


def leak_census(soak: Soak, base: Baseline) -> dict[str, Any]:
    leaks = {k: sorted(f(soak) - base.census[k]) for k, f in CENSUS.items()}
    leaks = {k: v for k, v in leaks.items() if v}
    store = store_figures(soak)
    # What the store holds beyond what its images account for, against the same before the bench.
    growth = ((store["store_du_bytes"] - store["images_listed_bytes"])
              - (base.store["store_du_bytes"] - base.store["images_listed_bytes"]))
    return {"leaks": leaks, "leak_count": sum(len(v) for v in leaks.values()),
            "store": {**store, "unaccounted_growth_bytes": growth},
            "host_wide_info": {"new_veths": sorted(census_new_veths(base.veths)),
                               "new_shm_scratch": sorted(census_shm_scratch(base.shm))}}


# --- phases --------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    launch_measure: str
    started: int = 0
    launches: list[float] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, cmd: str, rc: int, err: str) -> None:
        with self.lock:
            self.failures.append(Failure(cmd, rc, _last_line(err)))
        log(f"{self.name}: FAILED {cmd} rc={rc}: {_last_line(err)}")

    def check(self, soak: Soak, *args: str, timeout: float = 300) -> tuple[int, str]:
        rc, out, err, _t = soak.call(*args, timeout=timeout)
        if rc != 0:
            self.fail(" ".join(args[:2]), rc, err)
        return rc, out


def phase_sequential(soak: Soak, ph: Phase, n: int, accel: str) -> None:
    for i in range(n):
        uf = soak.uuid_file(f"seq-{i}")
        rc, out, err, took = soak.call("run", f"--accel={accel}", "--net=default", "--uuid-file-save", str(uf),
                                       "busybox", "--exec", "/bin/sh", "--", "-c", "echo ok")
        if soak.record_uuid(uf):
            ph.started += 1
        ph.launches.append(took)
        if rc != 0 or "ok" not in out.split():
            ph.fail("run", rc, err if rc != 0 else f"no 'ok' in stdout: {out[-200:]!r}")
        if (i + 1) % GC_EVERY == 0 or i + 1 == n:
            ph.check(soak, "gc", "--grace-period=0s")
        if (i + 1) % 10 == 0 or i + 1 == n:
            log(f"sequential: {i + 1}/{n} runs, {len(ph.failures)} failures, last {took:.2f} s")


POD_SCRIPT = ("s=0; i=0; while [ $i -lt 5000 ]; do s=$((s+i)); i=$((i+1)); done; echo sum=$s; "
              f"exec sleep {HOLD_S}")
SUM = "sum=12497500"
STOPPED = 128 + signal.SIGTERM  # `kvmrkt run`'s code when ``kvmrkt stop`` ended its app (the sleep) as asked


def guest_memory(m: int) -> dict[str, object]:
    """Guest MiB so that M pods fit: 60% of MemAvailable split M ways, less ~100 MiB per pod for QEMU and its
    supervising ``kvmrkt run`` outside guest RAM; at most kvmrkt's default (256), at least 128."""
    avail = next(int(ln.split()[1]) // 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                 if ln.startswith("MemAvailable:"))
    mib = max(128, min(256, int(avail * 0.6 / max(m, 1)) - 100))
    return {"guest_mib": mib, "host_available_mib": avail, "pods": m, "set_by":
            f"config [stage1] min_memory_mib = memory_overhead_mib = {mib} (apps ask no --memory: guest = overhead)"}


def _running(soak: Soak, uf: Path) -> str:
    uuid = soak.record_uuid(uf)
    with contextlib.suppress(OSError):
        if uuid and "START" in (soak.pod_dir(uuid) / "guest-status").read_text(errors="replace"):
            return uuid
    return ""


def phase_concurrent(soak: Soak, ph: Phase, m: int, accel: str, boot_timeout: float) -> None:
    pods = []
    for i in range(m):
        uf = soak.uuid_file(f"conc-{i}")
        pods.append((uf, time.monotonic(), soak.spawn("run", f"--accel={accel}", "--net=default", "--uuid-file-save",
                                                      str(uf), "busybox", "--exec", "/bin/sh", "--", "-c",
                                                      POD_SCRIPT)))
    log(f"concurrent: {m} pods spawned")
    running: dict[int, str] = {}
    deadline = time.monotonic() + boot_timeout + 60
    while len(running) < m and time.monotonic() < deadline:
        for i, (uf, began, proc) in enumerate(pods):
            if i in running:
                continue
            if uuid := _running(soak, uf):
                running[i] = uuid
                ph.launches.append(time.monotonic() - began)
            elif proc.poll() is not None:
                running[i] = ""  # exited before running: its failure is read below
        time.sleep(0.1)
    uuids = [u for u in running.values() if u]
    ph.started = len(uuids)
    log(f"concurrent: {len(uuids)}/{m} running; probing with list, status, enter")

    def enter(uuid: str) -> None:
        rc, out = ph.check(soak, "enter", uuid, "/bin/sh", "-c", "echo $((6*7))")
        if rc == 0 and out.split() != ["42"]:
            ph.fail("enter", rc, f"printed {out[-200:]!r}, not 42")

    with ThreadPoolExecutor(max_workers=4) as pool:
        probes: list[Future[Any]] = [pool.submit(ph.check, soak, "list", "--format", "json"),
                                        *(pool.submit(ph.check, soak, "status", u) for u in uuids),
                                        *(pool.submit(enter, u) for u in uuids),
                                        pool.submit(ph.check, soak, "list")]
        for probe in probes:
            probe.result()
        log("concurrent: waiting for each pod's sum, then stopping it (kvmrkt stop UUID)")
        deadline = time.monotonic() + 120
        for u in uuids:
            log_file = soak.pod_dir(u) / "logs" / "busybox.stdout"
            while time.monotonic() < deadline and SUM not in (log_file.read_text() if log_file.exists() else ""):
                time.sleep(0.1)
        for f in [pool.submit(ph.check, soak, "stop", u) for u in uuids]:
            f.result()
    for uf, _began, proc in pods:
        rc, out, err = soak.finish(proc, timeout=120)
        if rc != STOPPED or SUM not in out:
            uuid = soak.record_uuid(uf)
            if "(bench: killed" in err and uuid:  # did not end in time: stop its pod for good
                soak.call("stop", "--force", uuid)
            ph.fail("run", rc, err if rc != STOPPED else f"the app's sum is missing: {out[-200:]!r}")
    ph.check(soak, "gc", "--grace-period=0s")


def build_images(work: Path, k: int) -> Path:
    """One layout, K more tags: busybox plus a layer holding /soak-marker with the tag in it (so digests differ).
    Unpacked once, repacked per tag (each repack diffs against the unpacked image; ``umoci insert`` 0.4.7 writes
    a layer whose tar stream is truncated, which kvmrkt rightly refuses)."""
    layout, bundle = work / "img", work / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)], check=True, capture_output=True)
    for i in range(k):
        (bundle / "rootfs" / "soak-marker").write_text(f"soak-{i}\n")
        subprocess.run(["umoci", "repack", "--image", f"{layout}:soak-{i}", str(bundle)], check=True,
                       capture_output=True)
    shutil.rmtree(bundle)
    return layout


def phase_imports(soak: Soak, ph: Phase, k: int, accel: str, layout: Path) -> None:
    done = threading.Event()
    gcs = {"image gc": 0, "gc": 0}

    def gc_loop() -> None:
        while not done.is_set():
            ph.check(soak, "image", "gc")
            ph.check(soak, "gc", "--grace-period=0s")
            gcs["image gc"] += 1
            gcs["gc"] += 1
            done.wait(0.5)

    def one(i: int) -> None:
        rc, _out, err, took = soak.call("image", "import", f"oci:{layout}:soak-{i}", "--name", f"soak-{i}")
        if rc != 0:
            ph.fail("image import", rc, err)
            return
        uf = soak.uuid_file(f"imp-{i}")
        rc, out, err, took = soak.call("run", f"--accel={accel}", "--net=default", "--uuid-file-save", str(uf),
                                       f"soak-{i}", "--exec", "/bin/cat", "--", "/soak-marker")
        if soak.record_uuid(uf):
            with ph.lock:
                ph.started += 1
        ph.launches.append(took)
        if rc != 0 or f"soak-{i}" not in out:
            ph.fail("run", rc, err if rc != 0 else f"marker not printed: {out[-200:]!r}")

    gc_thread = threading.Thread(target=gc_loop, daemon=True)
    gc_thread.start()
    with ThreadPoolExecutor(max_workers=k) as pool:  # all imports at once; each image's run as its import ends
        for f in [pool.submit(one, i) for i in range(k)]:
            f.result()
    done.set()
    gc_thread.join()
    ph.check(soak, "gc", "--grace-period=0s")
    _rc, out = ph.check(soak, "image", "list", "--format", "json")
    names = {n for r in (json.loads(out) if out.strip() else []) for n in r.get("names", [])}
    missing = [f"soak-{i}" for i in range(k) if not any(n.startswith(f"soak-{i}") and
                                                        n.removeprefix(f"soak-{i}") in ("", ":latest")
                                                        for n in names)]
    ph.extra["gc_rounds_beside_imports"] = gcs
    ph.extra["imported_images_not_listed_after"] = missing
    log(f"imports: {k} imported and run, {len(ph.failures)} failures, gc rounds {gcs}")


# --- driver --------------------------------------------------------------------------------------------------


def report(ph: Phase, took: float, mem: MemorySampler, census: dict[str, Any]) -> dict[str, object]:
    pct = percentiles(ph.launches)
    p50, p99 = pct["p50_s"], pct["p99_s"]
    return {
        "pods_started": ph.started, "failures": len(ph.failures), "failure_list": [f.to_dict() for f in ph.failures],
        "launch_time": {"measure": ph.launch_measure, "samples": len(ph.launches), **pct},
        "duration_s": round(took, 1), "memory_at_peak": mem.figures(), **ph.extra,
        "census_after": census,
        "goals": {"zero_failures": not ph.failures, "zero_leaks": census["leak_count"] == 0,
                  "p99_le_2x_p50": (p99 <= 2 * p50) if p50 is not None and p99 is not None else None},
    }


def cleanup(soak: Soak) -> None:
    """Stop what the bench started (by pid, and its pods by uuid), collect them, kill what of the data dir is
    still alive (by pid), remove the bench's cgroup parent."""
    for proc in list(soak.procs.values()):
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    soak.procs.clear()
    for uuid in sorted(soak.uuids):
        if soak.pod_dir(uuid).exists():
            soak.call("stop", "--force", uuid, timeout=60)
    soak.call("gc", "--grace-period=0s", timeout=120)
    for pid in bench_pids(soak):
        with contextlib.suppress(OSError):
            os.kill(int(pid), signal.SIGKILL)
    for base in Path("/sys/fs/cgroup").glob(f"*/{soak.cgroup_parent}"):
        for d in sorted(base.rglob("*"), key=lambda p: -len(p.parts)):
            if d.is_dir():
                with contextlib.suppress(OSError):
                    d.rmdir()
        with contextlib.suppress(OSError):
            base.rmdir()
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        if line.split()[4].startswith(str(soak.data)):
            subprocess.run(["umount", "-l", line.split()[4]], capture_output=True)


def run(work: Path, args: argparse.Namespace) -> dict[str, object]:
    data, etc = work / "data", work / "etc"
    etc.mkdir()
    (work / "uuids").mkdir()
    soak = Soak(work, data, etc, cgroup_parent=f"kvmrkt-soak-{os.getpid()}")
    mem_choice = guest_memory(args.concurrent)
    log(f"guest memory: {mem_choice}")
    out: dict[str, object] = {"sizes": {"sequential": args.sequential, "concurrent": args.concurrent,
                                        "imports": args.imports},
                              "guest_memory": mem_choice, "boot_timeout_s": args.boot_timeout, "accel": args.accel}
    with swtpm(work) as tcti:
        (etc / "config.toml").write_text(
            f'[stage1]\nkernel = "minimal"\ntemplates = false\nboot_timeout = {args.boot_timeout}\n'
            f'min_memory_mib = {mem_choice["guest_mib"]}\nmemory_overhead_mib = {mem_choice["guest_mib"]}\n'
            f'[measure]\ntcti = "{tcti}"\nlog_dir = "{data / "measure"}"\n'
            f'[jail]\nuid_range = "{UID_RANGE}"\ncgroup_parent = "{soak.cgroup_parent}"\n')
        (etc / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        try:
            log("building images")
            subprocess.run([REPO / "examples" / "busybox-image.sh", work / "img", "latest"], check=True,
                           capture_output=True)
            layout = build_images(work, args.imports)
            rc, _o, err, _t = soak.call("image", "import", f"oci:{layout}:latest", "--name", "busybox")
            if rc != 0:
                sys.exit(f"importing busybox failed: {err[-2000:]}")
            warm = soak.call("run", f"--accel={args.accel}", "--net=default", "--uuid-file-save",
                             str(soak.uuid_file("warm")), "busybox", "--exec", "/bin/true")  # compiles, warms
            soak.record_uuid(soak.uuid_file("warm"))
            soak.call("gc", "--grace-period=0s")
            log(f"warm-up run rc={warm[0]} in {warm[3]:.2f} s; baseline census")
            base = take_baseline(soak)
            out["baseline_census"] = {k: sorted(v) for k, v in base.census.items() if v}
            out["baseline_store"] = base.store
            phases: list[tuple[str, str, Callable[[Phase], None]]] = [
                ("sequential", "wall time of each `kvmrkt run` (boot, app, teardown)",
                 lambda ph: phase_sequential(soak, ph, args.sequential, args.accel)),
                ("concurrent", "from spawning `kvmrkt run` to the app running (guest-status START), polled/0.1 s",
                 lambda ph: phase_concurrent(soak, ph, args.concurrent, args.accel, args.boot_timeout)),
                ("imports", "wall time of each `kvmrkt run` of a freshly imported image",
                 lambda ph: phase_imports(soak, ph, args.imports, args.accel, layout)),
            ]
            for name, measure, body in phases:
                ph = Phase(name, measure)
                log(f"phase {name}")
                begin = time.monotonic()
                with MemorySampler(soak) as mem:
                    body(ph)
                took = time.monotonic() - begin
                time.sleep(2.0)  # let exiting processes be reaped: what is left then is counted
                census = leak_census(soak, base)
                out[name] = report(ph, took, mem, census)
                log(f"phase {name}: {took:.1f} s, {len(ph.failures)} failures, {census['leak_count']} leaks")
        finally:
            log("cleaning up")
            cleanup(soak)
    return out


def _interrupted(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequential", type=int, default=1000, metavar="N")
    ap.add_argument("--concurrent", type=int, default=50, metavar="M")
    ap.add_argument("--imports", type=int, default=20, metavar="K")
    ap.add_argument("--accel", default="auto")
    ap.add_argument("--boot-timeout", type=float, default=120.0)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupted)  # cleaned up as on Ctrl-C
    tmp = tempfile.mkdtemp(prefix="kvmrkt-soak-")  # short: the swtpm socket lives in it
    try:
        use_bytecode_cache(Path(tmp))
        print(json.dumps(run(Path(tmp), args), indent=2))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: everything was cleaned up on the way out
        sys.exit("soak: interrupted (cleaned up)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
