"""The image store's index: SQLite, every statement's rows read at once, and a database that cannot be read
(damaged, not a database, locked past the busy timeout) an ``ImageError`` naming the file, never a traceback.

Role: the connection ``kvmrkt.images.store.Store`` keeps its records in. Trust boundary: the file is root's, in the
store's 0700 directory; kvmrkt does not repair it (the blobs it indexes are intact, and what to keep is the
operator's call).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from kvmrkt.errors import ImageError

_T = TypeVar("_T")


class Index:
    """A connection to the index at ``path`` (autocommit: statements ``BEGIN``/``COMMIT`` themselves)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = self._guard(lambda: sqlite3.connect(path, timeout=60, isolation_level=None))

    def _guard(self, step: Callable[[], _T]) -> _T:
        try:
            return step()
        except sqlite3.DatabaseError as exc:
            raise ImageError(f"the image store's index {self.path} cannot be read: {exc}",
                             hint="restore it from a backup, or move the store's cas directory aside and import "
                                  "the images again") from exc

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> Rows:
        return Rows(self._guard(lambda: self.conn.execute(sql, params).fetchall()))


class Rows:
    """A statement's rows, already read."""

    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None
