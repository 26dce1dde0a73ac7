"""Strict loading of the trust policy: ``CONFIG_DIR/policy.json`` plus ``CONFIG_DIR/policy.d/*.json``.

Role: turn policy files (the containers ``policy.json`` format, plus a ``keyFingerprints`` pin) into frozen
values, or fail naming the file and the field. Unknown fields, duplicate JSON keys, a missing ``default``,
both ``keyPath`` and ``keyData``, a missing or unreadable key file, an unknown requirement type: each is a
``PolicyLoadError``. Drop-in files (one per team, owned by config management) may only add ``transports``
scopes, and only ever add requirements (``DROPIN_RULE``); two files defining the same scope is an error.
Trust boundary: policy files are trusted once they parse, which is why parsing refuses anything it does not
fully understand; drop-ins are trusted less than ``policy.json``: they cannot relax what it says. Key
material is read here, so the verdict never depends on files changing between load and check.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmrkt import jsondoc
from kvmrkt.errors import PolicyLoadError
from policy.scopes import candidate_scopes

POLICY_FILE = "policy.json"
DROPIN_DIR = "policy.d"
TRANSPORTS = ("docker", "oci", "oci-archive", "docker-archive", "appc")
IDENTITY_TYPES = ("matchExact", "matchRepoDigestOrExact", "matchRepository", "exactReference", "exactRepository",
                  "remapIdentity")  # fmt: skip
DROPIN_RULE = ("a drop-in only adds requirements: it may not use insecureAcceptAnything or the transport "
               "default scope \"\", and a scope under one that policy.json names (a parent path, a matching "
               "*.domain, or that transport's \"\") must repeat every requirement of the most specific such "
               "scope (policy.json's default is the fallback for unnamed images, not a covering scope)")


@dataclass(frozen=True, slots=True)
class Identity:
    """``signedIdentity``: how the identity in a signature must relate to the image reference."""

    type: str = "matchRepoDigestOrExact"
    docker_reference: str = ""
    docker_repository: str = ""
    prefix: str = ""
    signed_prefix: str = ""


@dataclass(frozen=True, slots=True)
class Requirement:
    """One requirement of a scope. ``keys`` hold key material (armored/binary GPG keys, or PEM public keys)."""

    type: str
    keys: tuple[bytes, ...] = ()
    fingerprints: tuple[str, ...] = ()
    identity: Identity = Identity()
    where: str = ""


@dataclass(frozen=True, slots=True)
class Policy:
    """The merged policy."""

    default: tuple[Requirement, ...]
    transports: tuple[tuple[str, str, tuple[Requirement, ...]], ...]
    files: tuple[Path, ...]
    digest: str
    dropins: tuple[tuple[str, str, Path, str], ...] = ()
    """Each drop-in scope: (transport, scope, file, the policy.json scope covering it or "" for default)."""

    def scopes(self, transport: str) -> dict[str, tuple[Requirement, ...]]:
        """The scopes defined for one transport."""
        return {scope: reqs for t, scope, reqs in self.transports if t == transport}


def _load_json(path: Path) -> tuple[Any, bytes]:
    try:
        data = jsondoc.read(path)
    except OSError as exc:
        raise PolicyLoadError(f"{path}: cannot read: {exc.strerror}") from exc
    except ValueError as exc:
        raise PolicyLoadError(f"{path}: {exc}") from exc

    def no_dups(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise PolicyLoadError(f"{path}: duplicate key {dup[0]!r}")
        return dict(pairs)

    try:
        return jsondoc.loads(data, object_pairs_hook=no_dups), data
    except ValueError as exc:
        raise PolicyLoadError(f"{path}: not valid JSON: {exc}") from exc


def _fields(obj: Any, where: str, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise PolicyLoadError(f"{where}: expected an object")
    unknown = sorted(set(obj) - required - optional)
    if unknown:
        raise PolicyLoadError(f"{where}: unknown field {unknown[0]!r}")
    missing = sorted(required - set(obj))
    if missing:
        raise PolicyLoadError(f"{where}: missing field {missing[0]!r}")
    return obj


def _key_file(path_text: Any, where: str, base: Path) -> bytes:
    if not isinstance(path_text, str) or not path_text:
        raise PolicyLoadError(f"{where}: expected a file path")
    path = Path(path_text)
    if not path.is_absolute():
        path = base / path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyLoadError(f"{where}: key file {path}: {exc.strerror}") from exc
    if not data.strip():
        raise PolicyLoadError(f"{where}: key file {path} is empty")
    return data


def _keys(req: dict[str, Any], where: str, base: Path, *, plural_data: bool) -> tuple[bytes, ...]:
    sources = [k for k in ("keyPath", "keyPaths", "keyData", "keyDatas") if k in req]
    if len(sources) != 1:
        names = "keyPath, keyPaths, keyData" + (", keyDatas" if plural_data else "")
        raise PolicyLoadError(f"{where}: exactly one of {names} is required (found {', '.join(sources) or 'none'})")
    src = sources[0]
    value = req[src]
    if src == "keyPath":
        return (_key_file(value, f"{where}.keyPath", base),)
    if src == "keyPaths":
        if not isinstance(value, list) or not value:
            raise PolicyLoadError(f"{where}.keyPaths: expected a non-empty list")
        # Every fallback key must load now, so a broken one is fixed before it is needed.
        return tuple(_key_file(v, f"{where}.keyPaths[{i}]", base) for i, v in enumerate(value))
    values = [value] if src == "keyData" else value
    if not isinstance(values, list) or not values:
        raise PolicyLoadError(f"{where}.{src}: expected base64 data")
    out = []
    for i, v in enumerate(values):
        try:
            out.append(base64.b64decode(v, validate=True))
        except (ValueError, TypeError) as exc:
            raise PolicyLoadError(f"{where}.{src}[{i}]: not valid base64") from exc
    return tuple(out)


def _identity(obj: Any, where: str) -> Identity:
    if obj is None:
        return Identity()
    t = _fields(obj, where, {"type"}, {"dockerReference", "dockerRepository", "prefix", "signedPrefix"})["type"]
    if t not in IDENTITY_TYPES:
        raise PolicyLoadError(f"{where}.type: unknown identity type {t!r}")
    need = {"exactReference": {"dockerReference"}, "exactRepository": {"dockerRepository"},
            "remapIdentity": {"prefix", "signedPrefix"}}.get(t, set())  # fmt: skip
    _fields(obj, where, {"type", *need}, set())
    for key in need:
        if not isinstance(obj[key], str) or not obj[key]:
            raise PolicyLoadError(f"{where}.{key}: expected a non-empty string")
    return Identity(t, obj.get("dockerReference", ""), obj.get("dockerRepository", ""), obj.get("prefix", ""),
                    obj.get("signedPrefix", ""))


def _requirement(obj: Any, where: str, base: Path) -> Requirement:
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise PolicyLoadError(f"{where}: expected an object with a type")
    t = obj["type"]
    if t in ("insecureAcceptAnything", "reject"):
        _fields(obj, where, {"type"}, set())
        return Requirement(t, where=where)
    if t == "signedBy":
        _fields(obj, where, {"type", "keyType"},
                {"keyPath", "keyPaths", "keyData", "keyFingerprints", "signedIdentity"})
        if obj["keyType"] != "GPGKeys":
            raise PolicyLoadError(f"{where}.keyType: only GPGKeys is supported, not {obj['keyType']!r}")
        keys = _keys(obj, where, base, plural_data=False)
    elif t == "sigstoreSigned":
        _fields(obj, where, {"type"}, {"keyPath", "keyPaths", "keyData", "keyDatas", "keyFingerprints",
                                       "signedIdentity"})
        keys = _keys(obj, where, base, plural_data=True)
    else:
        raise PolicyLoadError(f"{where}.type: unknown requirement type {t!r}",
                              hint="use insecureAcceptAnything, reject, signedBy or sigstoreSigned")
    fprs = obj.get("keyFingerprints", [])
    if not isinstance(fprs, list) or not all(isinstance(f, str) and len(f.replace(" ", "")) >= 40 for f in fprs):
        raise PolicyLoadError(f"{where}.keyFingerprints: expected a list of full key fingerprints")
    return Requirement(t, keys, tuple(f.replace(" ", "").upper() for f in fprs),
                       _identity(obj.get("signedIdentity"), f"{where}.signedIdentity"), where)


def _requirements(obj: Any, where: str, base: Path) -> tuple[Requirement, ...]:
    if not isinstance(obj, list) or not obj:
        raise PolicyLoadError(f"{where}: expected a non-empty list of requirements")
    return tuple(_requirement(r, f"{where}[{i}]", base) for i, r in enumerate(obj))


def load_policy(config_dir: Path) -> Policy | None:
    """Load the policy, or None when there is no policy file at all (then every image is rejected).

    Raises:
        PolicyLoadError: any problem, naming the file and field.
    """
    main = config_dir / POLICY_FILE
    dropins = sorted((config_dir / DROPIN_DIR).glob("*.json")) if (config_dir / DROPIN_DIR).is_dir() else []
    if not main.exists():
        if dropins:
            raise PolicyLoadError(f"{main}: missing, but {DROPIN_DIR}/ has files (the default lives in {POLICY_FILE})")
        return None
    h = hashlib.sha256()
    default: tuple[Requirement, ...] = ()
    transports: dict[tuple[str, str], tuple[tuple[Requirement, ...], Path]] = {}
    for path in [main, *dropins]:
        doc, raw = _load_json(path)
        h.update(str(path).encode() + b"\0" + hashlib.sha256(raw).digest())
        where = str(path)
        if path == main:
            _fields(doc, where, {"default"}, {"transports"})
            default = _requirements(doc["default"], f"{where}: default", config_dir)
        else:
            _fields(doc, where, {"transports"}, set())
        tr = doc.get("transports", {})
        if not isinstance(tr, dict):
            raise PolicyLoadError(f"{where}: transports must be an object")
        for transport, scopes in tr.items():
            if transport not in TRANSPORTS:
                raise PolicyLoadError(f"{where}: transports: unknown transport {transport!r}",
                                      hint="known: " + ", ".join(TRANSPORTS))
            if not isinstance(scopes, dict):
                raise PolicyLoadError(f"{where}: transports.{transport} must be an object")
            for scope, reqs in scopes.items():
                if (transport, scope) in transports:
                    other = transports[(transport, scope)][1]
                    raise PolicyLoadError(f"{where}: scope {scope!r} of {transport} is also defined in {other}")
                transports[(transport, scope)] = (
                    _requirements(reqs, f"{where}: transports.{transport}[{scope!r}]", config_dir), path)
    main_scopes = {key: reqs for key, (reqs, p) in transports.items() if p == main}
    dropin_scopes = [(t, s, reqs, p) for (t, s), (reqs, p) in sorted(transports.items()) if p != main]
    return Policy(
        default=default,
        transports=tuple((t, s, r) for (t, s), (r, _p) in sorted(transports.items())),
        files=(main, *dropins),
        digest=f"sha256:{h.hexdigest()}",
        dropins=tuple((t, s, p, _check_dropin(t, s, reqs, p, main_scopes)) for t, s, reqs, p in dropin_scopes),
    )


def _same(a: Requirement, b: Requirement) -> bool:
    return (a.type, set(a.keys), set(a.fingerprints), a.identity) == (b.type, set(b.keys), set(b.fingerprints),
                                                                      b.identity)


def _check_dropin(transport: str, scope: str, reqs: tuple[Requirement, ...], path: Path,
                  main: dict[tuple[str, str], tuple[Requirement, ...]]) -> str:
    """Enforce ``DROPIN_RULE`` on one scope of a drop-in; returns the policy.json scope covering it ("" when
    only the default does).

    Raises:
        PolicyLoadError: naming the drop-in, the scope and what it would relax.
    """
    label = f"{path}: transports.{transport}[{scope!r}]"
    if scope == "":
        raise PolicyLoadError(f"{label}: a drop-in may not set the transport default scope \"\"",
                              hint=f"the defaults belong to {POLICY_FILE}; {DROPIN_RULE}")
    for r in reqs:
        if r.type == "insecureAcceptAnything":
            raise PolicyLoadError(f"{r.where}: a drop-in may not accept unsigned images (insecureAcceptAnything)",
                                  hint=f"only {POLICY_FILE} can; {DROPIN_RULE}")
    cover = next((c for c in candidate_scopes(scope)[1:] if (transport, c) in main), None)
    if cover is None:
        return ""
    if any(r.type == "reject" for r in reqs):  # nothing is stricter
        return f"transports.{transport}[{cover!r}]"
    for need in main[(transport, cover)]:
        if need.type != "insecureAcceptAnything" and not any(_same(need, r) for r in reqs):
            raise PolicyLoadError(
                f"{label} would relax {POLICY_FILE}'s scope {cover!r}, which covers it: it lacks {need.type} "
                f"({need.where})", hint=DROPIN_RULE)
    return f"transports.{transport}[{cover!r}]"
