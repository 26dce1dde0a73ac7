"""The one place that knows signature file names: how an image's signatures are named where they are found
(``signature-N`` beside a local source or in a lookaside, cosign ``cosign-N.payload``/``.sig``), how they are
stored (``Store.save_signatures``: ``simple-N``, ``cosign-N.payload``/``cosign-N.sig``, ``detached.asc``), and
the typed ``SignatureSet`` the policy checks.

Role: pure naming and mapping, no I/O and no cryptography (``policy.signatures`` verifies). Trust boundary: the
file contents are attacker-supplied and pass through untouched; names that are not one of the forms below are
ignored by ``signature_set``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

SOURCE_PREFIX = "signature-"
"""Simple-signing signatures where they are found: ``signature-N`` (skopeo standalone-sign, lookasides)."""
SIMPLE_PREFIX = "simple-"
COSIGN_PREFIX = "cosign-"
DETACHED = "detached.asc"
"""An appc image's detached OpenPGP signature over the ACI file (rkt's ``FILE.aci.asc``)."""


def source_name(n: int) -> str:
    """The found name of simple-signing signature ``n`` (1-based)."""
    return f"{SOURCE_PREFIX}{n}"


def simple_name(n: int | str) -> str:
    """The stored name of simple-signing signature ``n``."""
    return f"{SIMPLE_PREFIX}{n}"


def cosign_names(n: int | str) -> tuple[str, str]:
    """The (payload, signature) names of cosign signature ``n``, found and stored alike."""
    return f"{COSIGN_PREFIX}{n}.payload", f"{COSIGN_PREFIX}{n}.sig"


def is_cosign_signature(name: str) -> bool:
    """True for a cosign signature's name (``cosign-N.sig``)."""
    return name.startswith(COSIGN_PREFIX) and name.endswith(".sig")


def cosign_payload_of(sig_name: str) -> str:
    """The payload's name for a cosign signature's name."""
    return sig_name.removesuffix(".sig") + ".payload"


@dataclass(frozen=True, slots=True)
class SignatureSet:
    """An image's signatures: simple-signing OpenPGP messages, cosign (payload, DER signature) pairs, and
    detached OpenPGP signatures over a file (appc)."""

    simple: tuple[bytes, ...] = ()
    cosign: tuple[tuple[bytes, bytes], ...] = ()
    detached: tuple[tuple[bytes, Path], ...] = field(default=())

    def __len__(self) -> int:
        return len(self.simple) + len(self.cosign) + len(self.detached)


def signature_set(files: Mapping[str, bytes], detached_target: Path | None) -> SignatureSet:
    """The signatures in stored files (a cosign signature without its payload gets an empty one, which fails
    verification; the detached signature counts only with the file it signs)."""
    names = sorted(files)
    return SignatureSet(
        simple=tuple(files[k] for k in names if k.startswith(SIMPLE_PREFIX)),
        cosign=tuple((files.get(cosign_payload_of(k), b""), files[k]) for k in names if is_cosign_signature(k)),
        detached=((files[DETACHED], detached_target),) if DETACHED in files and detached_target else (),
    )
