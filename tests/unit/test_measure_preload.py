"""A launch that will be measured starts importing the TPM library in the background (measure.tpm.preload); one
that will not (--insecure-options=tpm, or no TPM configured: refused later) does not load it at all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHECK = """
import sys, threading
from pathlib import Path
from kvmrkt.config import load_config
from kvmrkt.pods.measured import prepare_to_measure
etc = Path(sys.argv[1])
config = load_config(config_dir=etc, data_dir=etc / "data", insecure_options=sys.argv[2])
prepare_to_measure(config)
for t in threading.enumerate():
    if t is not threading.main_thread():
        t.join()
print("loaded" if "tpm2_pytss" in sys.modules else "not loaded")
"""


@pytest.mark.parametrize(("tcti", "insecure", "expected"), [
    ("swtpm:path=/nonexistent/tpm", "", "loaded"),
    ("swtpm:path=/nonexistent/tpm", "tpm", "not loaded"),
    ("", "", "not loaded"),
])
def test_preload_only_for_measured_launches(tmp_path: Path, tcti: str, insecure: str, expected: str) -> None:
    (tmp_path / "config.toml").write_text(f'[measure]\ntcti = "{tcti}"\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("KVMRKT_TCTI", None)
    proc = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path), insecure], env=env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected
