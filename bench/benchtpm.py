"""A software TPM for the benchmarks: ``with swtpm(state_dir) as tcti:`` (started, waited for, stopped by pid)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def swtpm(state: Path) -> Iterator[str]:
    """Run swtpm on a free loopback port pair (another port pair when one is taken meanwhile); yields its TCTI
    string."""
    for _attempt in range(20):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}", "--server",
                                 f"type=tcp,port={port}", "--ctrl", f"type=tcp,port={port + 1}", "--flags",
                                 "not-need-init,startup-clear"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.02)
        else:
            proc.kill()
            proc.wait()
            continue
        try:
            yield f"swtpm:host=127.0.0.1,port={port}"
        finally:
            proc.terminate()
            proc.wait()
        return
    raise SystemExit("swtpm did not start")
