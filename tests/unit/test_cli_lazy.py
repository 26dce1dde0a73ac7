"""The kvmrkt command line imports the OCI runtime (``kvmrkt oci``) only when one of its commands runs: every
other command starts without it; ``kvmrkt oci`` and the help listing still work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def test_the_cli_starts_without_the_oci_runtime() -> None:
    code = ("import sys, kvmrkt.cli\n"
            "print(sorted(m for m in sys.modules if m.startswith(('kvmrkt.ocirt', 'kvmrkt.cli.oci'))))")
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_kvmrkt_oci_is_still_there() -> None:
    listing = subprocess.run([sys.executable, "-m", "kvmrkt", "--help"], env=ENV, capture_output=True, text=True,
                             check=True).stdout
    assert any(line.split()[:1] == ["oci"] for line in listing.splitlines())
    oci = subprocess.run([sys.executable, "-m", "kvmrkt", "oci", "--help"], env=ENV, capture_output=True, text=True,
                         check=True).stdout
    assert "OCI runtime" in oci and "create" in oci
