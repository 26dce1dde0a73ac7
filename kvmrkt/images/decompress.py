"""Bounded decompression of hostile streams (image layers, ACIs).

Role: detect the compression of a stream by its magic bytes (gzip, bzip2, xz; zstd is refused; anything else is
read as it is), count the compressed bytes consumed and the bytes produced, and refuse a stream longer than its
declared size or one that expands more than ``max_ratio`` times (after a 1 MiB grace). ``Meter`` is what the
callers that write decompressed data (``kvmrkt.images.layers``) also charge their writes to, so sparse members and
other ways to write more than was read count against the same ratio.

Trust boundary: the bytes are hostile; every limit is checked as the bytes flow, before they are used.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import lzma
import typing
from collections.abc import Iterator

from kvmrkt.errors import LayerError

GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
BZIP2_MAGIC = b"BZh"
UNSUPPORTED_MAGIC = {b"\x28\xb5\x2f\xfd": "zstd"}
RATIO_GRACE = 1024 * 1024  # the ratio limit applies once this many bytes were produced or written


class Cursor:
    """Which member is being read, so that stream-level errors can name it."""

    where = "the tar header"


def is_compressed(prefix: bytes) -> bool:
    """True when ``prefix`` (the first 6 bytes) starts a stream this module decompresses."""
    return prefix.startswith((GZIP_MAGIC, XZ_MAGIC, BZIP2_MAGIC))


class CountingReader(io.RawIOBase):
    """The raw bytes, served after the already-read magic prefix, counted as they are consumed."""

    def __init__(self, raw: typing.BinaryIO, prefix: bytes, declared: int | None, cursor: Cursor) -> None:
        super().__init__()
        self._raw, self._prefix, self._declared, self._cursor = raw, prefix, declared, cursor
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        """Read and count; raise LayerError past the declared size."""
        if self._prefix:
            cut = len(self._prefix) if size < 0 else size
            data, self._prefix = self._prefix[:cut], self._prefix[cut:]
        else:
            data = self._raw.read(size)
        self.consumed += len(data)
        if self._declared is not None and self.consumed > self._declared:
            raise LayerError(f"layer is longer than its declared {self._declared} bytes ({self._cursor.where})")
        return data


class Meter:
    """Charges produced (or written) bytes against the raw bytes consumed: at most ``max_ratio`` times."""

    def __init__(self, raw: CountingReader, max_ratio: int, cursor: Cursor, what: str,
                 max_bytes: int | None = None) -> None:
        self.raw, self.max_ratio, self.cursor, self.what, self.max_bytes = raw, max_ratio, cursor, what, max_bytes
        self.total = 0

    def charge(self, n: int) -> None:
        """Add ``n`` bytes; raise LayerError when the total outgrows the ratio (or ``max_bytes``)."""
        self.total += n
        if self.max_bytes is not None and self.total > self.max_bytes:
            raise LayerError(f"layer {self.what} to more than {self.max_bytes} bytes ({self.cursor.where})")
        if self.total >= RATIO_GRACE and self.total > self.max_ratio * max(self.raw.consumed, 1):
            raise LayerError(
                f"layer {self.what} more than {self.max_ratio}x ({self.total} bytes from {self.raw.consumed}) "
                f"while reading {self.cursor.where}: compression bomb?"
            )


class RatioReader(io.RawIOBase):
    """Decompressed bytes, charged to a Meter as they are read."""

    def __init__(self, inner: io.BufferedIOBase, meter: Meter) -> None:
        super().__init__()
        self._inner, self._meter = inner, meter

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        data = self._inner.read(size)
        self._meter.charge(len(data))
        return data


def _read_prefix(fileobj: typing.BinaryIO, size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := fileobj.read(size - len(data))):
        data += chunk
    return data


@contextlib.contextmanager
def open_stream(
    fileobj: typing.BinaryIO, *, max_ratio: int, cursor: Cursor, declared: int | None = None,
    max_bytes: int | None = None,
) -> Iterator[tuple[io.RawIOBase, CountingReader]]:
    """The plain bytes of ``fileobj`` (decompressed when its magic says so, bounded by ``max_ratio`` and
    ``max_bytes``) and the counter of the raw bytes consumed, for the duration of the block.

    Raises:
        LayerError: an unsupported compression.
    """
    prefix = _read_prefix(fileobj, 6)
    for magic, kind in UNSUPPORTED_MAGIC.items():
        if prefix.startswith(magic):
            raise LayerError(f"{kind}-compressed layers are not supported", hint="use gzip or plain tar")
    raw = CountingReader(fileobj, prefix, declared, cursor)
    with contextlib.ExitStack() as stack:
        inner: io.BufferedIOBase | None = None
        if prefix.startswith(GZIP_MAGIC):
            inner = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        elif prefix.startswith(XZ_MAGIC):
            inner = stack.enter_context(lzma.LZMAFile(typing.cast(typing.IO[bytes], raw), mode="rb"))
        elif prefix.startswith(BZIP2_MAGIC):
            inner = stack.enter_context(bz2.BZ2File(raw, mode="rb"))
        if inner is None:
            yield raw, raw
        else:
            yield RatioReader(inner, Meter(raw, max_ratio, cursor, "decompresses", max_bytes)), raw
