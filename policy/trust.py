"""The pure trust decision: which scope applies to an image, and whether its verified signatures satisfy it.

Role: no I/O. Input: the loaded ``Policy``, a ``Subject`` (transport, scope reference, identity, signed digest)
and, per requirement, the signatures as verified by ``policy.signatures`` (who signed, and the payload bytes
the cryptography vouched for). Output: a ``Decision`` or a ``PolicyDeniedError`` whose reason is one of
rejected-scope / no-signature / untrusted-key / bad-signature / identity-mismatch, naming the image and the
scope that matched. Trust boundary: payloads are parsed only after their signature verified, strictly
(unknown ``critical`` fields, duplicate keys, a wrong type or digest are rejections).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmrkt import jsondoc
from kvmrkt.errors import PolicyDeniedError
from policy.model import Identity, Policy, Requirement
from policy.scopes import candidate_scopes, repository

GPG_PAYLOAD_TYPE = "atomic container signature"
COSIGN_PAYLOAD_TYPE = "cosign container image signature"


@dataclass(frozen=True, slots=True)
class Subject:
    """What is being judged. ``reference`` is what scopes match (registry ``host/repo:tag``, a file path, an
    appc name); ``identity`` is the name signatures must vouch for; ``digest`` what they must sign."""

    transport: str
    reference: str
    identity: str
    digest: str

    def describe(self) -> str:
        """How errors name the image."""
        return f"{self.identity} ({self.transport}:{self.reference}, {self.digest[:19]})"


@dataclass(frozen=True, slots=True)
class Verified:
    """One signature after the cryptographic check: ``signer`` (key fingerprint) when it verified, ``problem``
    otherwise; ``payload`` is what the signature covers (None for detached signatures over the image)."""

    signer: str | None
    payload: bytes | None = None
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """An accepted image: the scope that applied and who signed."""

    scope: str
    requirements: tuple[str, ...]
    signers: tuple[str, ...] = ()
    insecure: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON form (recorded in the pod and measured)."""
        return {"scope": self.scope, "requirements": list(self.requirements), "signers": list(self.signers),
                "insecure": self.insecure}


NOT_JUDGED_SCOPE = "(oci bundle: not judged)"
"""The scope recorded for an OCI bundle's rootfs (``kvmrkt-oci``): it is no stored image, so no policy judged it
and no signature was checked (the engine that unpacked it may have); verifiers allow it only when told to."""
NOT_JUDGED = Decision(NOT_JUDGED_SCOPE, (), (), insecure=True)


# --- scopes ---------------------------------------------------------------------------------------------


def match_scope(pol: Policy, subject: Subject) -> tuple[str, tuple[Requirement, ...]]:
    """The most specific scope with requirements for the subject (``default`` when none)."""
    scopes = pol.scopes(subject.transport)
    for cand in candidate_scopes(subject.reference):
        if cand in scopes:
            label = f'transports.{subject.transport}["{cand}"]' if cand else f'transports.{subject.transport}[""]'
            return label, scopes[cand]
    return "default", pol.default


# --- payloads and identities ----------------------------------------------------------------------------


def _strict_json(data: bytes) -> Any:
    def no_dups(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate key")
        return dict(pairs)

    return jsondoc.loads(data, object_pairs_hook=no_dups)


def parse_payload(data: bytes, expected_type: str) -> tuple[str, str]:
    """Parse a simple-signing payload (after its signature verified); returns (manifest digest, reference).

    Raises:
        ValueError: anything but exactly the expected critical fields.
    """
    doc = _strict_json(data)
    if not isinstance(doc, dict) or set(doc) - {"critical", "optional"} or "critical" not in doc:
        raise ValueError("payload must have critical (and optionally optional) only")
    if doc.get("optional") is not None and not isinstance(doc["optional"], dict):
        raise ValueError("optional must be an object")
    crit = doc["critical"]
    if not isinstance(crit, dict) or set(crit) != {"type", "image", "identity"}:
        raise ValueError("critical must have exactly type, image and identity")
    if crit["type"] != expected_type:
        raise ValueError(f"critical.type is {crit['type']!r}, not {expected_type!r}")
    image, identity = crit["image"], crit["identity"]
    if not isinstance(image, dict) or set(image) != {"docker-manifest-digest"}:
        raise ValueError("critical.image must have exactly docker-manifest-digest")
    if not isinstance(identity, dict) or set(identity) != {"docker-reference"}:
        raise ValueError("critical.identity must have exactly docker-reference")
    digest, ref = image["docker-manifest-digest"], identity["docker-reference"]
    if not isinstance(digest, str) or not isinstance(ref, str):
        raise ValueError("digest and reference must be strings")
    return digest, ref


def identity_matches(rule: Identity, image_ref: str, signed_ref: str) -> bool:
    """Does the reference in a signature vouch for this image reference under ``rule``?"""
    if rule.type == "matchExact":
        return image_ref == signed_ref
    if rule.type == "matchRepoDigestOrExact":
        return repository(image_ref) == repository(signed_ref) if "@" in image_ref else image_ref == signed_ref
    if rule.type == "matchRepository":
        return repository(image_ref) == repository(signed_ref)
    if rule.type == "exactReference":
        return signed_ref == rule.docker_reference
    if rule.type == "exactRepository":
        return repository(signed_ref) == rule.docker_repository
    if rule.type == "remapIdentity":
        if image_ref.startswith(rule.prefix) and (
            len(image_ref) == len(rule.prefix) or image_ref[len(rule.prefix)] in "/:@" or rule.prefix.endswith("/")
        ):
            image_ref = rule.signed_prefix + image_ref[len(rule.prefix) :]
        return identity_matches(Identity("matchRepoDigestOrExact"), image_ref, signed_ref)
    return False


# --- the decision -----------------------------------------------------------------------------------------

_RANK = {"no-signature": 0, "untrusted-key": 1, "bad-signature": 2, "identity-mismatch": 3}


@dataclass
class _Outcome:
    reason: str = "no-signature"
    detail: str = "no signature was found"
    signers: list[str] = field(default_factory=list)

    def worse(self, reason: str, detail: str) -> None:
        if _RANK[reason] >= _RANK[self.reason]:
            self.reason, self.detail = reason, detail


def judge_requirement(req: Requirement, subject: Subject, sigs: list[Verified]) -> tuple[bool, _Outcome]:
    """Whether one signature requirement is met by at least one of the verified signatures."""
    out = _Outcome()
    expected = COSIGN_PAYLOAD_TYPE if req.type == "sigstoreSigned" else GPG_PAYLOAD_TYPE
    rule = req.identity
    if req.type == "sigstoreSigned" and req.identity == Identity():
        rule = Identity("matchRepository")  # cosign payloads only bind the repository (the spec ignores tags)
    for sig in sigs:
        if sig.signer is None:
            reason = "untrusted-key" if sig.problem and "unknown key" in sig.problem else "bad-signature"
            out.worse(reason, sig.problem or "the signature does not verify")
            continue
        if req.fingerprints and sig.signer.upper() not in req.fingerprints:
            out.worse("untrusted-key", f"signed by key {sig.signer}, which keyFingerprints does not list")
            continue
        if sig.payload is None:  # detached signature over the image bytes (appc): nothing more to check
            out.signers.append(sig.signer)
            return True, out
        try:
            digest, ref = parse_payload(sig.payload, expected)
        except ValueError as exc:
            out.worse("bad-signature", f"signed payload rejected: {exc}")
            continue
        if digest != subject.digest:
            out.worse("identity-mismatch", f"the signature is for manifest {digest}, not {subject.digest}")
            continue
        if not identity_matches(rule, subject.identity, ref):
            out.worse("identity-mismatch", f"the signature vouches for {ref!r}, not {subject.identity!r} "
                                           f"({rule.type})")
            continue
        out.signers.append(sig.signer)
        return True, out
    return False, out


def decide(pol: Policy | None, subject: Subject, verify: Callable[[Requirement], list[Verified]]) -> Decision:
    """Apply the policy to a subject; ``verify(req)`` returns the subject's signatures checked against that
    requirement's keys.

    Raises:
        PolicyDeniedError: with the image, the scope and what was missing.
    """
    if pol is None:
        raise PolicyDeniedError(
            f"image {subject.describe()} rejected: there is no trust policy, so every image is rejected",
            reason="rejected-scope",
            hint="trust a key with `kvmrkt trust --prefix NAME KEY.asc` (writes policy.json), or run once with "
                 "--insecure-options=image",
        )
    scope, reqs = match_scope(pol, subject)
    return _judge_scope(scope, reqs, subject, verify)


def decide_unnamed(pol: Policy | None, subject: Subject,
                   verify: Callable[[Requirement], list[Verified]]) -> Decision:
    """Judge an image before its name is known (an ACI's name is inside its compressed bytes, which are not
    to be read before it is judged): accepted when at least one scope of its transport, or the default,
    would accept it. Sound only where the checks do not depend on the name (appc's detached signatures);
    ``decide`` judges it again once the name is read.

    Raises:
        PolicyDeniedError: no scope accepts it, with every scope's message and the reason of the first scope
        that wants something the image could bring (a signature) rather than rejecting it outright.
    """
    if pol is None:
        return decide(pol, subject, verify)
    scopes = [("default", pol.default), *((f'transports.{subject.transport}["{name}"]', reqs)
                                          for name, reqs in pol.scopes(subject.transport).items())]
    refusals: list[PolicyDeniedError] = []
    for scope, reqs in scopes:
        try:
            return _judge_scope(scope, reqs, subject, verify)
        except PolicyDeniedError as exc:
            refusals.append(exc)
    if len(refusals) == 1:
        raise refusals[0]
    main = next((r for r in refusals if r.reason != "rejected-scope"), refusals[0])
    raise PolicyDeniedError(
        f"image {subject.describe()} rejected before it was unpacked: no {subject.transport} scope accepts it ("
        + "; ".join(r.message for r in refusals) + ")", reason=main.reason, hint=main.hint)


def _judge_scope(scope: str, reqs: tuple[Requirement, ...], subject: Subject,
                 verify: Callable[[Requirement], list[Verified]]) -> Decision:
    signers: list[str] = []
    for req in reqs:
        if req.type == "insecureAcceptAnything":
            continue
        if req.type == "reject":
            raise PolicyDeniedError(f"image {subject.describe()} rejected by {scope} ({req.where}: reject)",
                                    reason="rejected-scope")
        ok, outcome = judge_requirement(req, subject, verify(req))
        if not ok:
            raise PolicyDeniedError(
                f"image {subject.describe()} rejected by {scope}: {req.type} not satisfied: {outcome.detail}",
                reason=outcome.reason,
                hint={"no-signature": "sign the image (skopeo standalone-sign / copy --sign-by) or add its signature",
                      "untrusted-key": "trust the signer's key in this scope, or check keyFingerprints"}
                .get(outcome.reason),
            )
        signers += outcome.signers
    return Decision(scope, tuple(r.type for r in reqs), tuple(signers))
