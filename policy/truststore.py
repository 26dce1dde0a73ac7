"""rkt-style ``kvmrkt trust``: write GPG keys and the policy entries that trust them.

Role: the convenience layer over ``policy.json``: ``trust --prefix NAME KEY`` stores the key as
``policy.d/keys/<FINGERPRINT>.asc`` and a drop-in ``policy.d/trust-<prefix>.json`` whose scope ``NAME`` (in every
transport) requires a signature by the keys trusted for it, pinned by fingerprint; ``trust --root KEY`` makes
the policy default require one of the root keys; ``trust list`` and ``trust rm FPR`` manage them. A missing
``policy.json`` is created with ``default: reject``. Trust boundary: the operator vouches for the key file;
its fingerprint is shown so they can check it. Writes are atomic, and the result is reloaded with the strict
loader before this returns, so a trust command can never leave a broken policy behind.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import gnupg

from kvmrkt.errors import PolicyError, PolicyLoadError
from kvmrkt.host.files import write_atomic
from policy.model import DROPIN_DIR, POLICY_FILE, TRANSPORTS, load_policy

KEYS_DIR = "keys"
TRUST_PREFIX = "trust-"


def key_fingerprint(key: bytes) -> str:
    """The primary fingerprint of one OpenPGP public key.

    Raises:
        PolicyError: not exactly one public key.
    """
    with tempfile.TemporaryDirectory(prefix="kvmrkt-gpg-") as home:
        Path(home).chmod(0o700)
        result = gnupg.GPG(gnupghome=home).import_keys(key)
        primaries = {f.upper() for f in result.fingerprints}
        if len(primaries) != 1 or any(r.get("ok") is None for r in result.results):
            raise PolicyError("the key file must hold exactly one OpenPGP public key")
        if gnupg.GPG(gnupghome=home).list_keys(secret=True):
            raise PolicyError("the key file holds a secret key: give the public key only")
        return str(primaries.pop())


def _slug(prefix: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", prefix).strip("_") or "root"


def _write(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), mode=0o644)


def _signed_by(keys: list[Path], fingerprints: list[str]) -> dict[str, Any]:
    return {"type": "signedBy", "keyType": "GPGKeys", "keyPaths": [str(k) for k in keys],
            "keyFingerprints": fingerprints}


def trust(config_dir: Path, key_file: Path, *, prefix: str | None, root: bool) -> tuple[str, Path]:
    """Trust a key for a name prefix (or as a root key). Returns (fingerprint, policy file written).

    Raises:
        PolicyError: unreadable or unsuitable key; PolicyLoadError: the resulting policy does not load.
    """
    if bool(prefix) == root:
        raise PolicyError("give exactly one of --prefix NAME or --root")
    try:
        key = key_file.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read {key_file}: {exc.strerror}") from exc
    fpr = key_fingerprint(key)
    keys_dir = config_dir / DROPIN_DIR / KEYS_DIR
    keys_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(keys_dir / f"{fpr}.asc", key, mode=0o644)
    main = config_dir / POLICY_FILE
    load_policy(config_dir)  # the files read below as plain JSON must be sound policy files first
    doc: dict[str, Any] = json.loads(main.read_text()) if main.exists() else {"default": [{"type": "reject"}]}
    dropin = config_dir / DROPIN_DIR / f"{TRUST_PREFIX}{_slug(prefix or '')}.json"
    before = {p: p.read_bytes() if p.exists() else None for p in (main, dropin)}
    if root:
        req = doc["default"][0] if doc.get("default") else {}
        fprs = sorted({*req.get("keyFingerprints", []), fpr}) if req.get("type") == "signedBy" else [fpr]
        doc["default"] = [_signed_by([keys_dir / f"{f}.asc" for f in fprs], fprs)]
        target = main
    else:
        assert prefix is not None
        target = dropin
        old = json.loads(target.read_text()) if target.exists() else {"transports": {}}
        prev = old["transports"].get("docker", {}).get(prefix, [{}])[0].get("keyFingerprints", [])
        fprs = sorted({*prev, fpr})
        req = _signed_by([keys_dir / f"{f}.asc" for f in fprs], fprs)
        _write(target, {"transports": {t: {prefix: [req]} for t in TRANSPORTS}})
    if not main.exists() or root:
        _write(main, doc)
    try:
        load_policy(config_dir)
    except PolicyLoadError:  # e.g. the drop-in would relax policy.json: leave the policy as it was
        for path, data in before.items():
            if data is None:
                path.unlink(missing_ok=True)
            else:
                write_atomic(path, data, mode=0o644)
        raise
    return fpr, target


def trusted(config_dir: Path) -> list[dict[str, str]]:
    """Keys written by ``trust``: fingerprint, scope (a prefix, or "root") and the file that grants it."""
    out = []
    main = config_dir / POLICY_FILE
    load_policy(config_dir)  # the files read below as plain JSON must be sound policy files first
    if main.exists():
        doc = json.loads(main.read_text())
        for req in doc.get("default", []):
            out += [{"fingerprint": f, "scope": "root", "file": str(main)} for f in req.get("keyFingerprints", [])]
    dropins = config_dir / DROPIN_DIR
    for path in sorted(dropins.glob(f"{TRUST_PREFIX}*.json")) if dropins.is_dir() else []:
        for prefix, reqs in json.loads(path.read_text())["transports"].get("docker", {}).items():
            for req in reqs:
                out += [{"fingerprint": f, "scope": prefix, "file": str(path)} for f in req.get("keyFingerprints", [])]
    return out


def untrust(config_dir: Path, fingerprint: str) -> list[str]:
    """Stop trusting a key everywhere ``trust`` granted it; returns the scopes it was removed from.

    Raises:
        PolicyError: the key was not trusted by ``trust``.
    """
    fpr = fingerprint.replace(" ", "").upper()
    removed = []
    keys_dir = config_dir / DROPIN_DIR / KEYS_DIR
    for entry in trusted(config_dir):
        if entry["fingerprint"] != fpr:
            continue
        path = Path(entry["file"])
        doc = json.loads(path.read_text())
        if entry["scope"] == "root":
            fprs = [f for f in doc["default"][0]["keyFingerprints"] if f != fpr]
            doc["default"] = [_signed_by([keys_dir / f"{f}.asc" for f in fprs], fprs)] if fprs else [{"type": "reject"}]
            _write(path, doc)
        else:
            reqs = doc["transports"]["docker"][entry["scope"]]
            fprs = [f for f in reqs[0]["keyFingerprints"] if f != fpr]
            if fprs:
                req = _signed_by([keys_dir / f"{f}.asc" for f in fprs], fprs)
                _write(path, {"transports": {t: {entry["scope"]: [req]} for t in TRANSPORTS}})
            else:
                path.unlink()
        removed.append(entry["scope"])
    if not removed:
        raise PolicyError(f"key {fpr} is not trusted (see `kvmrkt trust list`)")
    (keys_dir / f"{fpr}.asc").unlink(missing_ok=True)
    try:
        load_policy(config_dir)
    except PolicyLoadError as exc:
        raise PolicyError(f"removing {fpr} left a policy that does not load: {exc.message}") from exc
    return removed
