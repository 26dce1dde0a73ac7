"""The CLI's entry points end without the interpreter's final collection over the command's objects (they are
frozen first), on success and on error alike, and atexit handlers and output are not lost on the way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

EXIT = """
import atexit, gc, sys
atexit.register(lambda: print("frozen" if gc.get_freeze_count() else "not frozen", file=sys.stderr))
from kvmrkt.cli.{module} import main
sys.argv = [sys.argv[0], *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize(("module", "argv", "code"), [
    ("_base", ["version"], 0),
    ("_base", ["--config-dir", "/nonexistent/kvmrkt-test", "image", "list", "--no-such-flag"], 2),
    ("oci", ["--root", "/nonexistent/kvmrkt-test", "state", "no-such-container"], 1),
])
def test_entry_points_freeze_before_exit(module: str, argv: list[str], code: int) -> None:
    proc = subprocess.run([sys.executable, "-c", EXIT.format(module=module), *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.splitlines()[-1] == "frozen"
    if code == 0:
        assert proc.stdout.strip()
