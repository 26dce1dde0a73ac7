"""App output and the guest console are bounded on the host ([pods] max_log_bytes), on both backends: a guest
that floods its stdout/stderr, or writes forever, cannot fill the host's disk, and the pod still runs and ends
normally with the app's exit code."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from .conftest import BASE_CONFIG, Kvmrkt, use_backend

LIMIT = 1 << 20
MARKER = re.compile(rb"^\[kvmrkt: (\d+) earlier bytes of this log were dropped")


@pytest.fixture(params=["qemu", "libvirt"])
def kvmrkt(kvmrkt: Kvmrkt, request: pytest.FixtureRequest) -> Kvmrkt:
    use_backend(kvmrkt, request, request.param)
    kvmrkt.write_config(BASE_CONFIG + f"\n[pods]\nmax_log_bytes = {LIMIT}\n")
    return kvmrkt


def _log_sizes(pod_dir: Path) -> dict[str, int]:
    files = [pod_dir / "console.log", *(pod_dir / "logs").iterdir()]
    return {f.name: f.stat().st_size for f in files if f.is_file()}


def test_a_flood_of_output_is_kept_bounded_with_a_marker(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    """3x the limit on stdout and on stderr: each log keeps the latest output under a marker that counts what
    was dropped, the terminal still gets the end of it, and the run ends with the app's code."""
    uuid_file = tmp_path / "uuid"
    flood = "dd if=/dev/zero bs=65536 count=48 2>/dev/null | tr '\\0' {c}"
    script = (f"{flood.format(c='x')}; echo; echo END-OF-OUTPUT; ({flood.format(c='y')}; echo; echo END-OF-ERR) >&2;"
              " exit 7")
    res = kvmrkt("run", "--uuid-file-save", str(uuid_file), "busybox", "--exec", "/bin/sh", "--", "-c", script)
    assert res.rc == 7, res.err[-2000:]
    assert res.out.endswith("END-OF-OUTPUT\n") and res.err.rstrip().endswith("END-OF-ERR")
    uuid = uuid_file.read_text().strip()
    pod_dir = kvmrkt.data / "pods" / "run" / uuid
    sizes = _log_sizes(pod_dir)
    assert all(size <= LIMIT for size in sizes.values()), sizes
    for name, end in (("busybox.stdout", b"END-OF-OUTPUT\n"), ("busybox.stderr", b"END-OF-ERR\n")):
        data = (pod_dir / "logs" / name).read_bytes()
        m = MARKER.match(data)
        assert m, data[:200]
        kept = data[data.index(b"\n") + 1:]
        assert data.endswith(end) and int(m.group(1)) + len(kept) == 3 * LIMIT + 1 + len(end)
        assert set(kept[:-len(end) - 1]) == {ord("x" if name.endswith("stdout") else "y")}
    st = json.loads(kvmrkt.ok("status", "--format", "json", uuid).out)
    assert st["exit_code"] == 7 and not st["integrity_failures"]


def test_a_guest_writing_forever_does_not_grow_the_host(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    """An app that never stops writing (and a terminal that does not read): the pod keeps running, its logs
    stay under the limit while the guest writes many times that, and it stops cleanly."""
    uuid_file = tmp_path / "uuid"
    proc = kvmrkt.start("run", "--uuid-file-save", str(uuid_file), "busybox", "--exec", "/bin/sh", "--", "-c",
                        "exec yes kvmrkt-flood-line")
    uuid = kvmrkt.wait_running(uuid_file)
    pod_dir = kvmrkt.data / "pods" / "run" / uuid
    started, dropped = time.monotonic(), 0
    while dropped < 8 * LIMIT:
        assert time.monotonic() - started < 120, f"the guest wrote only {dropped} bytes"
        assert proc.poll() is None
        sizes = _log_sizes(pod_dir)
        assert all(size <= LIMIT for size in sizes.values()), sizes
        m = MARKER.match((pod_dir / "logs" / "busybox.stdout").read_bytes()[:200])
        dropped = int(m.group(1)) if m else 0
        time.sleep(0.2)
    print(f"guest wrote > {dropped / (time.monotonic() - started) / 1e6:.1f} MB/s")
    assert '"state": "running"' in kvmrkt.ok("status", "--format", "json", uuid).out
    kvmrkt.ok("stop", uuid)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]  # yes died of SIGTERM
    assert "[kvmrkt: " in out and "kvmrkt-flood-line\n" in out  # the terminal skipped what the log dropped
    assert all(size <= LIMIT for size in _log_sizes(pod_dir).values())


def test_a_guest_flooding_its_status_channel_is_stopped(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    """The status file is the one file the VMM writes for the guest (only the guest init writes to it, a few
    lines per app). Appending to it from the host stands in for a hostile guest init: past 1 MiB the VM is
    killed with a clear error, so the host's disk stays bounded there too."""
    uuid_file = tmp_path / "uuid"
    proc = kvmrkt.start("run", "--uuid-file-save", str(uuid_file), "busybox", "--exec", "/bin/sleep", "--", "600")
    uuid = kvmrkt.wait_running(uuid_file)
    status = kvmrkt.data / "pods" / "run" / uuid / "guest-status"
    with status.open("ab") as fh:
        fh.write(b"ERROR busybox flood\n" * 60000)  # 1.2 MB
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 8 and "more than 1048576 bytes of status messages" in err, err[-2000:]
