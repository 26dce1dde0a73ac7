"""Trust verdicts: every launch (engine or kvmrkt-oci) records its apps in one schema."""

from __future__ import annotations

from kvmrkt.admission import bundle_verdict
from policy.trust import NOT_JUDGED_SCOPE, Decision

JUDGED_KEYS = {"image", "identity", "dependencies", *Decision("s", ()).to_dict()}


def test_oci_bundle_verdict_has_the_judged_schema_and_says_not_judged() -> None:
    verdict = bundle_verdict("oci-bundle:sha256:c", "docker.io/library/trusted:1")
    assert set(verdict) == JUDGED_KEYS
    assert verdict["scope"] == NOT_JUDGED_SCOPE
    assert verdict["insecure"] is True and verdict["signers"] == [] and verdict["requirements"] == []
    assert verdict["image"] == "oci-bundle:sha256:c" and verdict["dependencies"] == []
