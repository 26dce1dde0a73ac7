"""Host faults become errors a user can act on, not tracebacks: a store index that is not a database (an ImageError
naming the file), and a full filesystem wherever a command writes (the CLI's one-line error naming the file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmrkt.errors import ImageError
from kvmrkt.images.store import Store

REPO = Path(__file__).resolve().parents[2]


def test_a_store_index_that_is_not_a_database_names_the_file(tmp_path: Path) -> None:
    store = Store(tmp_path)
    (tmp_path / "cas").mkdir(mode=0o700)
    index = tmp_path / "cas" / "index.db"
    index.write_bytes(os.urandom(8192))
    with pytest.raises(ImageError) as exc:
        store.images()
    assert f"index {index} cannot be read" in exc.value.message and exc.value.hint
    assert exc.value.exit_code == 3


FULL = """
import errno, sys
from kvmrkt.cli import _base
def full(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device", "/var/lib/kvmrkt/cas/tmp/blob-1")
_base.CliContext.engine = full
sys.argv = ["kvmrkt", "--config-dir", sys.argv[1], *sys.argv[2:]]
_base.main()
"""


@pytest.mark.parametrize("debug", [False, True])
def test_a_full_filesystem_is_one_line_naming_the_file(tmp_path: Path, debug: bool) -> None:
    argv = [sys.executable, "-c", FULL, str(tmp_path), *(["--debug"] if debug else []), "image", "list"]
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                          check=False)
    if debug:  # --debug keeps the traceback, as for every error
        assert "Traceback" in proc.stderr and "OSError" in proc.stderr
        return
    assert proc.returncode == 1
    assert proc.stderr.startswith("kvmrkt: error: No space left on device: /var/lib/kvmrkt/cas/tmp/blob-1\n")
    assert "hint:" in proc.stderr and "Traceback" not in proc.stderr


def test_lent_tap_names_fit_an_interface_name_and_name_their_pod() -> None:
    from kvmrkt.errors import NetworkError
    from kvmrkt.net import taps

    uuid = "0a8203fa-352f-41d2-b803-99f385526fb9"
    names = [taps.host_name(uuid, i) for i in range(taps.MAX_NICS)]
    assert names[0] == "kvt0a8203fa350" and all(len(n) <= 15 for n in names) and len(set(names)) == taps.MAX_NICS
    with pytest.raises(NetworkError):
        taps.host_name(uuid, taps.MAX_NICS)
