"""Content digests (``sha256:<hex>``) and streaming file hashing.

Role: parse, print and compare digests; hash files without reading them whole. Trust boundary: digest
strings come from untrusted manifests, so parsing is strict (algorithm and hex length checked) and the hex
part is safe to use as a file name.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from io import BufferedIOBase
from pathlib import Path

from kvmrkt.errors import DigestMismatchError, ManifestError

_HEX_LEN = {"sha256": 64, "sha512": 128}
_RE = re.compile(r"^(sha256|sha512):([0-9a-f]+)\Z")


@dataclass(frozen=True, slots=True)
class Digest:
    """An algorithm and a lowercase hex value."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``sha256:<64 hex>`` (or sha512).

        Raises:
            ManifestError: anything else.
        """
        m = _RE.match(text)
        if not m or len(m.group(2)) != _HEX_LEN[m.group(1)]:
            raise ManifestError(f"invalid digest {text[:100]!r}")
        return cls(m.group(1), m.group(2))

    @classmethod
    def of_bytes(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of in-memory bytes."""
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    @classmethod
    def of_file(cls, path: Path, algorithm: str = "sha256") -> Digest:
        """The digest of a file."""
        with path.open("rb") as fh:
            return cls.of_stream(fh, algorithm)

    @classmethod
    def of_stream(cls, fh: BufferedIOBase, algorithm: str = "sha256") -> Digest:
        """The digest of what is left to read in an open file (``hashlib.file_digest``: read into one buffer,
        not a new 1 MiB block per chunk, which a long-lived process's heap would keep)."""
        return cls(algorithm, hashlib.file_digest(fh, algorithm).hexdigest())

    def matches(self, other: Digest) -> bool:
        """Constant-time equality."""
        return self.algorithm == other.algorithm and hmac.compare_digest(self.hex, other.hex)

    def verify_file(self, path: Path) -> None:
        """Check that a file hashes to this digest.

        Raises:
            DigestMismatchError: it does not.
        """
        actual = Digest.of_file(path, self.algorithm)
        if not self.matches(actual):
            raise DigestMismatchError(f"{path} is corrupt: expected {self}, found {actual}")

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"
