"""Benchmarks time the CLI as an installed package runs it: with byte-compiled modules.

A development shell may set ``PYTHONDONTWRITEBYTECODE`` (then every ``kvmrkt`` command compiles each of its ~120
modules from source, ~0.15 s per command on a 2-core host); an installed package has its ``.pyc`` files.
``use_bytecode_cache(work)`` lets the benchmark's child processes write and read them under ``work`` (through
``PYTHONPYCACHEPREFIX``, so the source tree is not touched); the first, warm-up run compiles.
"""

from __future__ import annotations

import os
from pathlib import Path


def use_bytecode_cache(work: Path) -> None:
    """Byte-compile into ``work``/pycache for this process's children (and this process)."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
