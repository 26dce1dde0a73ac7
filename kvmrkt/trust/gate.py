"""The trust gate: what the policy says about an image, at import and at every prepare or run.

Role: load the policy, judge a subject (transport, identity, digest) with its signatures, refuse at import
before anything but the manifest digest is read, judge stored images again before they reach a pod, and explain a
verdict. Trust boundary: the policy is config management's (validated by ``policy.model``); signatures and names
come with the image and are hostile; ``--insecure-options=image`` lifts exactly this layer, loudly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmrkt.config import RuntimeConfig
from kvmrkt.digest import Digest
from kvmrkt.errors import KvmrktError, PolicyDeniedError
from kvmrkt.images.records import ImageRecord, Provenance
from kvmrkt.images.store import Store
from kvmrkt.pods.manifest import PodManifest
from kvmrkt.trust import admission, sigfiles
from policy.model import Policy, Requirement, load_policy
from policy.trust import Decision, Subject, Verified, decide, decide_unnamed, match_scope


def subject_of(record: ImageRecord) -> Subject:
    """What the policy judges a stored image as (its identity is also the reference scopes match)."""
    identity = record.identity or record.name
    return Subject(record.transport or "oci", identity, identity, record.signed_digest or record.id)


class TrustGate:
    """Policy verdicts on images, for one command."""

    def __init__(self, config: RuntimeConfig, store: Store, *, warn: Callable[[str], None]) -> None:
        self.config = config
        self.store = store
        self.warn = warn

    @property
    def insecure(self) -> bool:
        """``--insecure-options=image``: signatures are not checked (every use is announced)."""
        return "image" in self.config.insecure_options

    def policy(self) -> Policy | None:
        """The trust policy (None: there is none, every image is rejected)."""
        return load_policy(self.config.config_dir)

    def policy_digest(self) -> str | None:
        """The digest of the policy files in force (measured with each launch); None if there is no valid one."""
        with contextlib.suppress(KvmrktError):
            pol = self.policy()
            return pol.digest if pol else None
        return None

    def _decide(self, subject: Subject, files: dict[str, bytes], detached_target: Path | None, *,
                named: bool = True) -> Decision:
        sigset = sigfiles.signature_set(files, detached_target)

        def verify(req: Requirement) -> list[Verified]:
            from policy import signatures  # gpg and cryptography only when a requirement checks a signature

            return signatures.verify(req, sigset)

        return (decide if named else decide_unnamed)(self.policy(), subject, verify)

    def gate(self, prov: Provenance, digest: Digest, files: dict[str, bytes]) -> None:
        """The import gate: refuse an image the policy does not accept, before anything but its manifest digest
        is read."""
        if self.insecure:
            self.warn(f"WARNING: --insecure-options=image: NOT checking signatures of {prov.identity} ({digest})")
            return
        target = (prov.content or self.store.blob_path(digest)) if prov.transport == "appc" else None
        self._decide(Subject(prov.transport, prov.identity, prov.identity, str(digest)), files, target,
                     named=prov.named)

    def check(self, record: ImageRecord) -> Decision:
        """Judge a stored image against the current policy, with the signatures stored with it.

        Raises:
            PolicyDeniedError: the policy does not accept it (now).
        """
        if self.insecure:
            self.warn(f"WARNING: --insecure-options=image: NOT checking signatures of {record.name}")
            return Decision("-", (), insecure=True)
        subject = subject_of(record)
        signed = Digest.parse(subject.digest)
        target = self.store.blob_path(signed) if record.kind == "aci" else None
        return self._decide(subject, self.store.signature_files(signed), target)

    def judge_pod(self, manifest: PodManifest) -> dict[str, Any]:
        """Judge every image whose files reach the pod now (the policy may have changed since it was fetched)."""
        return admission.judge(manifest, self.store, self.check)

    def explain(self, ref: str) -> dict[str, Any]:
        """Which scope and requirements apply to a stored image, and the verdict."""
        record = self.store.resolve(ref)
        pol = self.policy()
        subject = subject_of(record)
        scope, reqs = match_scope(pol, subject) if pol else ("(no policy)", ())
        out: dict[str, Any] = {
            "image": record.name, "transport": subject.transport, "identity": subject.identity,
            "signed_digest": subject.digest, "scope": scope,
            "requirements": [{"type": r.type, "where": r.where, "keyFingerprints": list(r.fingerprints),
                              "signedIdentity": r.identity.type} for r in reqs],
            "signatures": sorted(self.store.signature_files(Digest.parse(subject.digest))),
            "policy_files": [str(p) for p in pol.files] if pol else [],
        }  # fmt: skip
        try:
            out["verdict"] = {"accepted": True, **self.check(record).to_dict()}
        except PolicyDeniedError as exc:
            out["verdict"] = {"accepted": False, "reason": exc.reason, "message": exc.message}
        out["dependencies"] = admission.explain_dependencies(self.store, record, self.check)
        return out
