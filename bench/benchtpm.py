"""A software TPM for the benchmarks: ``with swtpm(state_dir) as tcti:`` (started, waited for, stopped by pid).

It serves on a unix socket in ``state_dir``, which any network namespace can reach (bench/oci.py's CRI node runs
kvmrkt-oci in a namespace of its own, where the host's loopback is not)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def swtpm(state: Path) -> Iterator[str]:
    """Run swtpm on ``state``/tpm (keep ``state`` short: a unix socket path fits in 108 bytes); yields its TCTI
    string."""
    sock = state / "tpm"
    proc = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}", "--server",
                             f"type=unixio,path={sock}", "--ctrl", f"type=unixio,path={sock}.ctrl", "--flags",
                             "not-need-init,startup-clear"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (sock.exists() and Path(f"{sock}.ctrl").exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("swtpm did not start")
            time.sleep(0.02)
        yield f"swtpm:path={sock}"
    finally:
        proc.terminate()
        proc.wait()
