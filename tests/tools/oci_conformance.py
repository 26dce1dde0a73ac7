"""Run opencontainers/runtime-tools' validation suite (58 TAP programs) against an OCI runtime binary.

Role: test infrastructure, not part of kvmrkt. ``tests/integration/test_oci_conformance.py`` runs it against
kvmrkt-oci; run as a script it measures another runtime on the same machine for the side-by-side count
(``python tests/tools/oci_conformance.py --runtime runc``; root, after ``make setup``). It prints one line per test
and a JSON summary.

Trust boundary: the suite and the runtime are trusted test programs; each ``.t`` runs in its own process group
with a time limit (some hang on a broken runtime), with its bundles in a private temporary directory, and the
runtime's containers live under a state root of their own that is emptied afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.tools.build_go_tools import ensure

_PLAN = re.compile(r"^1\.\.(\d+)")
_RESULT = re.compile(r"^(not ok|ok)\b(.*)$")
_NOTE = re.compile(r'^(\s+"error": |WARNING: )')


@dataclass(frozen=True)
class TapResult:
    """One validation program's outcome. ``status`` is pass, fail, skip (every case skipped) or timeout."""

    name: str
    status: str
    seconds: float
    failed: tuple[str, ...]  # the "not ok" lines, or why the program as a whole failed
    output: str
    mounts: tuple[str, ...] = ()  # what the runtime left mounted on the host (unmounted since)


def classify(stdout: str, returncode: int | None) -> tuple[str, tuple[str, ...]]:
    """Judge one TAP stream as prove(1) does (the plan is met, nothing is "not ok", the program exited 0), with
    the suite's own way of failing a lifecycle test: no result line at all ("1..0") and a diagnostic with an
    ``"error"``, or a "WARNING:" line (poststop's "The poststop hook invoke fails")."""
    if returncode is None:
        return "timeout", ("timed out",)
    planned, oks, skips, failed, notes = None, 0, 0, [], []
    for line in stdout.splitlines():
        if _NOTE.match(line):
            notes.append(line.strip())
        if (m := _PLAN.match(line)) and planned is None:
            planned = int(m.group(1))
        elif m := _RESULT.match(line):
            directive = m.group(2).lower()
            if m.group(1) == "ok":
                oks += 1
                skips += "# skip" in directive
            elif "# todo" in directive:
                oks += 1
            else:
                failed.append(line.strip())
    if failed:
        return "fail", tuple(failed)
    if returncode != 0:
        return "fail", (f"exited {returncode}",)
    if planned is None or planned != oks:
        return "fail", (f"plan {planned} but {oks} results",)
    if not oks and notes:
        return "fail", tuple(notes)
    return ("skip" if oks and skips == oks else "pass"), ()


def validation_names(suite: Path) -> list[str]:
    return sorted(p.stem for p in (suite / "validation").glob("*.t"))


def unmount_under(path: Path) -> tuple[str, ...]:
    """Lazily unmount everything mounted under ``path``, deepest first, and return the mount points. A runtime
    given a config without a mount namespace (linux_ns_itype) mounts into the host's: runc binds the rootfs and
    mounts /proc, /dev, /sys there. Removing the directory must never reach through such mounts."""
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    inside = tuple(p for p in points if p.startswith(f"{path}/"))
    for point in reversed(inside):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return inside


def run_one(suite: Path, name: str, runtime: Path, work: Path, timeout: float) -> TapResult:
    """Run ``validation/<name>.t`` with ``RUNTIME=runtime`` from a directory holding runtimetest and the rootfs
    tarball (where the suite looks for them); its bundles go to a temporary directory under ``work``."""
    cwd = work / name
    cwd.mkdir(parents=True)
    os.symlink(suite / "rootfs-amd64.tar.gz", cwd / "rootfs-amd64.tar.gz")
    shutil.copy2(suite / "bin" / "runtimetest", cwd / "runtimetest")  # copied into bundles: a link would dangle
    env = {**os.environ, "RUNTIME": str(runtime), "TMPDIR": str(cwd)}
    started = time.monotonic()
    # Output to a file, not a pipe: a runtime's daemon that inherits it must not keep us waiting for EOF.
    with (cwd / "tap.out").open("w+") as out_file:
        proc = subprocess.Popen([str(suite / "validation" / f"{name}.t")], cwd=cwd, env=env, stdout=out_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group is the .t and the runtime commands it started
            proc.wait()
            rc = None
        out_file.seek(0)
        out = out_file.read()
    status, failed = classify(out, rc)
    return TapResult(name, status, time.monotonic() - started, failed, out, unmount_under(cwd))


def run_suite(suite: Path, runtime: Path, work: Path, *, timeout: float = 60, names: list[str] | None = None,
              report: Callable[[TapResult], None] | None = None) -> list[TapResult]:
    results = []
    for name in names or validation_names(suite):
        res = run_one(suite, name, runtime, work, timeout)
        if report:
            report(res)
        results.append(res)
    return results


def print_result(res: TapResult) -> None:
    why = f"  ({res.failed[0][:150]})" if res.failed else ""
    why += f"  [left {len(res.mounts)} mounts on the host, unmounted]" if res.mounts else ""
    print(f"{res.status:7} {res.seconds:5.1f}s {res.name}{why}", flush=True)


def load_expected(path: Path) -> set[str]:
    """The names in an expected-to-pass list: one per line, ``#`` starts a comment."""
    return {ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()} - {""}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="runtime-tools validation suite against an OCI runtime binary")
    ap.add_argument("--runtime", default="runc", help="runtime binary (default: runc)")
    ap.add_argument("--timeout", type=float, default=60, help="seconds per validation program")
    ap.add_argument("tests", nargs="*", help="only these tests (default: all)")
    args = ap.parse_args(argv)
    binary = shutil.which(args.runtime)
    if not binary:
        print(f"oci_conformance: {args.runtime} not found", file=sys.stderr)
        return 1
    suite = ensure("runtime-tools")  # runtimetest, validation/*.t, rootfs-amd64.tar.gz
    work = Path(tempfile.mkdtemp(prefix="oci-conformance-"))
    root = work / "state"
    wrapper = work / "runtime"  # the runtime with a state root of its own, so leftovers can be found
    wrapper.write_text(f'#!/bin/sh\nexec {binary} --root {root} "$@"\n')
    wrapper.chmod(0o755)
    started = time.monotonic()
    try:
        results = run_suite(suite, wrapper, work / "tests", timeout=args.timeout, names=args.tests,
                            report=print_result)
    finally:
        listing = subprocess.run([str(wrapper), "list", "-q"], capture_output=True, text=True, check=False)
        for cid in listing.stdout.split():
            subprocess.run([str(wrapper), "delete", "--force", cid], capture_output=True, check=False)
        unmount_under(work)
        shutil.rmtree(work)
    elapsed = time.monotonic() - started
    passed = [r.name for r in results if r.status == "pass"]
    print(json.dumps({"runtime": binary, "passed": len(passed), "total": len(results),
                      "skipped": [r.name for r in results if r.status == "skip"],
                      "timed_out": [r.name for r in results if r.status == "timeout"],
                      "seconds": round(elapsed, 1), "passing": passed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
