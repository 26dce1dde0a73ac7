"""Cryptographic signature checks: OpenPGP (python-gnupg, isolated home) and cosign-style ECDSA P-256 keys.

Role: given a requirement's keys and an image's signatures, say for each signature who signed it and which
bytes the signature vouches for (``policy.trust.Verified``); parse nothing else. Trust boundary: signatures
are attacker-supplied. GnuPG runs in a fresh 0700 home holding only the requirement's keys (no gpg.conf, no
keyserver, no trust database use), so "valid" can only mean one of those keys; expired or revoked keys and
subkeys, several signatures of which one is bad, cleartext-signed messages: all are rejections. Every key of
a requirement must load before any signature is checked, so a broken fallback key is found before it is
needed.
"""

from __future__ import annotations

import base64
import hashlib
import tempfile
from pathlib import Path

import gnupg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from kvmrkt.errors import PolicyLoadError
from kvmrkt.trust.sigfiles import SignatureSet
from policy.model import Policy, Requirement
from policy.trust import Verified

CLEARTEXT = b"-----BEGIN PGP SIGNED MESSAGE-----"


class _Keyring:
    """A throwaway GnuPG home holding exactly one requirement's keys."""

    def __init__(self, req: Requirement) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="kvmrkt-gpg-")
        Path(self._tmp.name).chmod(0o700)
        self.gpg = gnupg.GPG(gnupghome=self._tmp.name)
        self.fingerprints: set[str] = set()
        for i, key in enumerate(req.keys):
            result = self.gpg.import_keys(key)
            if not result.fingerprints:
                self.close()
                raise PolicyLoadError(f"{req.where}: key {i + 1} of {len(req.keys)} is not a valid OpenPGP public key",
                                      hint="fix or remove it: a broken fallback key would fail when it is needed")
            self.fingerprints |= {f.upper() for f in result.fingerprints}

    def close(self) -> None:
        self._tmp.cleanup()

    def check(self, result: gnupg.Verify, pins: tuple[str, ...]) -> tuple[str | None, str | None]:
        """(signer, problem) from a verify/decrypt result."""
        statuses = [str(p.get("status", "")) for p in getattr(result, "problems", [])]
        key_status = getattr(result, "key_status", None)
        if key_status:
            return None, f"the signing key is not usable: {key_status}"
        if statuses:
            if any("no public key" in s or s == "signature error" for s in statuses) and not result.valid:
                keyid = result.problems[0].get("keyid", "?")
                return None, f"signed by unknown key {keyid} (not one of this scope's keys)"
            return None, f"bad signature ({', '.join(sorted(set(statuses)))})"
        if not result.valid or result.returncode != 0:
            status = result.status or "no valid signature"
            if "no public key" in status or "signature error" in status:
                return None, f"signed by unknown key {getattr(result, 'key_id', '?')} (not one of this scope's keys)"
            return None, f"bad signature ({status})"
        signers = {str(info.get("pubkey_fingerprint") or info.get("fingerprint") or "").upper()
                   for info in result.sig_info.values()} or {str(result.pubkey_fingerprint or "").upper()}
        if pins and not signers <= set(pins):
            return None, f"signed by key(s) {', '.join(sorted(signers - set(pins)))}, not in keyFingerprints"
        if not signers <= self.fingerprints:
            return None, "signed by a key outside this scope's keys"
        return sorted(signers)[0], None


def _verify_gpg(req: Requirement, sigs: SignatureSet) -> list[Verified]:
    ring = _Keyring(req)
    try:
        out = []
        for blob in sigs.simple:
            if blob.lstrip().startswith(CLEARTEXT):
                out.append(Verified(None, problem="cleartext-signed messages are not accepted"))
                continue
            result = ring.gpg.decrypt(blob)
            signer, problem = ring.check(result, req.fingerprints)
            out.append(Verified(signer, result.data if signer else None, problem))
        for sig, path in sigs.detached:
            with tempfile.NamedTemporaryFile() as fh:
                fh.write(sig)
                fh.flush()
                with open(fh.name, "rb") as sig_file:
                    result = ring.gpg.verify_file(sig_file, str(path))
            signer, problem = ring.check(result, req.fingerprints)
            out.append(Verified(signer, None, problem))
        return out
    finally:
        ring.close()


def cosign_key_id(key: ec.EllipticCurvePublicKey) -> str:
    """A public key's fingerprint: SHA-256 of its DER SubjectPublicKeyInfo, upper-case hex."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest().upper()


def _cosign_keys(req: Requirement) -> list[ec.EllipticCurvePublicKey]:
    keys = []
    for i, data in enumerate(req.keys):
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise PolicyLoadError(f"{req.where}: key {i + 1} of {len(req.keys)} is not a PEM public key") from exc
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise PolicyLoadError(f"{req.where}: key {i + 1} is not an ECDSA P-256 key")
        keys.append(key)
    return keys


def _verify_cosign(req: Requirement, sigs: SignatureSet) -> list[Verified]:
    keys = _cosign_keys(req)
    out = []
    for payload, signature in sigs.cosign:
        for key in keys:
            try:
                key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
            except InvalidSignature:
                continue
            out.append(Verified(cosign_key_id(key), payload))
            break
        else:
            out.append(Verified(None, problem="the cosign signature does not verify with any of this scope's keys"))
    return out


def verify(req: Requirement, sigs: SignatureSet) -> list[Verified]:
    """Check an image's signatures of the kind a requirement uses, against that requirement's keys only.

    Raises:
        PolicyLoadError: a key of the requirement cannot be loaded.
    """
    if req.type == "signedBy":
        return _verify_gpg(req, sigs) if sigs.simple or sigs.detached else []
    if req.type == "sigstoreSigned":
        _cosign_keys(req)  # every key must load, even when there is nothing to check
        return _verify_cosign(req, sigs)
    return []


def decode_cosign(payload_b64: str, signature_b64: str) -> tuple[bytes, bytes]:
    """A cosign signature as stored in registries and files (base64 payload and base64 DER signature)."""
    return base64.b64decode(payload_b64), base64.b64decode(signature_b64)


def check_keys(pol: Policy) -> None:
    """Load every key of every signature requirement (what ``kvmrkt policy check`` does beyond parsing).

    Raises:
        PolicyLoadError: naming the requirement whose key does not load.
    """
    for req in (*pol.default, *(r for _t, _s, reqs in pol.transports for r in reqs)):
        if req.type == "signedBy":
            _Keyring(req).close()
        elif req.type == "sigstoreSigned":
            _cosign_keys(req)
