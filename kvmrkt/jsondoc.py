"""The one way kvmrkt parses JSON that comes from outside it (policy files, manifests, configs, registry
responses, evidence, signature payloads, plugin output).

Role: ``json.loads`` with the parse bombs turned into ``ValueError`` (which callers already map to their
module's error, naming the document): documents over a size limit, nesting deeper than ``MAX_DEPTH`` (a file
nested 200,000 levels deep makes the parser itself raise ``RecursionError``) and the non-JSON constants
``NaN``/``Infinity``; integers of more than 4300 digits are already a ``ValueError`` in Python >= 3.11.
``read`` reads a file without loading more than the limit into memory. Trust boundary: the input is hostile;
nothing is evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_BYTES = 16 << 20
MAX_DEPTH = 64


class JSONBombError(ValueError):
    """Valid or not, the document is too big or too deep, or holds NaN/Infinity."""


def _constant(name: str) -> Any:
    raise JSONBombError(f"{name} is not JSON")


def _depth_ok(doc: Any, limit: int) -> bool:
    level = [doc] if isinstance(doc, (dict, list)) else []
    for _ in range(limit):
        level = [v for node in level for v in (node.values() if isinstance(node, dict) else node)
                 if isinstance(v, (dict, list))]
        if not level:
            return True
    return False


def loads(data: bytes | str, *, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None,
          max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse one JSON document.

    Raises:
        ValueError: not JSON (``json.JSONDecodeError``), or a parse bomb (``JSONBombError``); whatever
            ``object_pairs_hook`` raises.
    """
    if len(data) > max_bytes:
        raise JSONBombError(f"larger than {max_bytes} bytes")
    try:
        doc = json.loads(data, object_pairs_hook=object_pairs_hook, parse_constant=_constant)
    except RecursionError:
        raise JSONBombError(f"nested deeper than {max_depth} levels") from None
    if not _depth_ok(doc, max_depth):
        raise JSONBombError(f"nested deeper than {max_depth} levels")
    return doc


def read(path: Path, *, max_bytes: int = MAX_BYTES) -> bytes:
    """A file's bytes, refusing more than ``max_bytes`` (before reading them all).

    Raises:
        OSError: unreadable; JSONBombError: too large.
    """
    with path.open("rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise JSONBombError(f"{path} is larger than {max_bytes} bytes")
    return data


def load(path: Path, *, max_bytes: int = MAX_BYTES) -> Any:
    """``loads(read(path))``.

    Raises:
        OSError: unreadable; ValueError: as ``loads``.
    """
    return loads(read(path, max_bytes=max_bytes), max_bytes=max_bytes)
