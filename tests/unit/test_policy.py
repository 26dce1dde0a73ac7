"""Pure trust logic: strict policy loading, scope matching on path segments, identities, payloads, verdicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmrkt.errors import PolicyDeniedError, PolicyLoadError
from policy.model import Identity, load_policy
from policy.trust import (
    GPG_PAYLOAD_TYPE,
    Subject,
    Verified,
    candidate_scopes,
    decide,
    decide_unnamed,
    identity_matches,
    match_scope,
    parse_payload,
)

DIGEST = "sha256:" + "a" * 64


def write(d: Path, doc: object, name: str = "policy.json") -> None:
    path = d / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))


def signed(key: str = "k.asc", **extra: object) -> dict[str, object]:
    return {"type": "signedBy", "keyType": "GPGKeys", "keyPath": key, **extra}


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    (tmp_path / "k.asc").write_text("key material")
    return tmp_path


def test_no_policy_is_none_and_rejects(cfg: Path) -> None:
    assert load_policy(cfg) is None
    with pytest.raises(PolicyDeniedError, match="no trust policy") as err:
        decide(None, Subject("docker", "a/b:1", "a/b:1", DIGEST), lambda r: [])
    assert err.value.exit_code == 40


@pytest.mark.parametrize(("doc", "word"), [
    ({"transports": {}}, "'default'"),
    ({"default": [{"type": "reject"}], "extra": 1}, "'extra'"),
    ('{"default": [{"type": "reject"}], "default": []}', "duplicate key 'default'"),
    ({"default": [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": "k.asc", "keyData": "eA=="}]},
     "exactly one of"),
    ({"default": [signed("missing.asc")]}, "missing.asc"),
    ({"default": [{"type": "magic"}]}, "unknown requirement type 'magic'"),
    ({"default": [{"type": "reject", "keyPath": "k.asc"}]}, "'keyPath'"),
    ({"default": []}, "non-empty list"),
    ({"default": [{"type": "reject"}], "transports": {"ftp": {}}}, "unknown transport 'ftp'"),
    ({"default": [signed(keyFingerprints=["ABCD"])]}, "keyFingerprints"),
    ({"default": [signed(signedIdentity={"type": "exactReference"})]}, "dockerReference"),
    ({"default": [signed(keyType="X509")]}, "GPGKeys"),
    ("[1, 2", "not valid JSON"),
])  # fmt: skip
def test_strict_loading_names_file_and_field(cfg: Path, doc: object, word: str) -> None:
    write(cfg, doc)
    with pytest.raises(PolicyLoadError, match=word) as err:
        load_policy(cfg)
    assert "policy.json" in err.value.message


def test_dropins_merge_and_conflict(cfg: Path) -> None:
    write(cfg, {"default": [{"type": "reject"}], "transports": {"docker": {"a.example": [{"type": "reject"}]}}})
    write(cfg, {"transports": {"docker": {"b.example": [{"type": "reject"}]}}}, "policy.d/team-b.json")
    pol = load_policy(cfg)
    assert pol is not None and set(pol.scopes("docker")) == {"a.example", "b.example"}
    write(cfg, {"transports": {"docker": {"a.example": [{"type": "reject"}]}}}, "policy.d/team-c.json")
    with pytest.raises(PolicyLoadError, match="also defined in"):
        load_policy(cfg)
    write(cfg, {"default": [{"type": "reject"}], "transports": {}}, "policy.d/team-c.json")
    with pytest.raises(PolicyLoadError, match="'default'"):
        load_policy(cfg)


MAIN_WITH_SCOPES = {"default": [{"type": "reject"}], "transports": {
    "docker": {"example.com": [signed()], "*.corp.example": [signed()]}, "oci": {"": [signed()]}}}  # fmt: skip
OTHER = signed("other.asc")


@pytest.mark.parametrize(("transports", "word"), [
    ({"docker": {"example.com/team": [{"type": "insecureAcceptAnything"}]}}, "insecureAcceptAnything"),
    ({"docker": {"b.example": [{"type": "insecureAcceptAnything"}]}}, "insecureAcceptAnything"),
    ({"docker": {"example.com/team": [{"type": "insecureAcceptAnything"}, signed()]}}, "insecureAcceptAnything"),
    ({"docker": {"": [{"type": "insecureAcceptAnything"}]}}, 'default scope ""'),
    ({"appc": {"": [OTHER]}}, 'default scope ""'),
    ({"docker": {"example.com/team": [OTHER]}}, "relax policy.json's scope 'example.com'"),
    ({"docker": {"example.com/app:1": [OTHER]}}, "relax policy.json's scope 'example.com'"),
    ({"docker": {"example.com/team": [signed(keyFingerprints=["A" * 40])]}}, "lacks signedBy"),
    ({"docker": {"x.corp.example/app": [OTHER]}}, "relax policy.json's scope '\\*.corp.example'"),
    ({"oci": {"b.example/app": [OTHER]}}, "relax policy.json's scope ''"),
])  # fmt: skip
def test_a_dropin_cannot_relax_policy_json(cfg: Path, transports: object, word: str) -> None:
    (cfg / "other.asc").write_text("other key")
    write(cfg, MAIN_WITH_SCOPES)
    write(cfg, {"transports": transports}, "policy.d/team.json")
    with pytest.raises(PolicyLoadError, match=word) as err:
        load_policy(cfg)
    assert "policy.d/team.json" in err.value.message and "transports." in err.value.message
    assert err.value.exit_code == 4 and err.value.hint and "only adds requirements" in err.value.hint


def test_a_dropin_may_add_requirements_and_unnamed_scopes(cfg: Path) -> None:
    (cfg / "other.asc").write_text("other key")
    write(cfg, MAIN_WITH_SCOPES)
    write(cfg, {"transports": {"docker": {"example.com/team": [OTHER, signed()], "example.com/old": [
        {"type": "reject"}], "b.example": [OTHER]}, "appc": {"example.com/team": [OTHER]}}}, "policy.d/team.json")
    pol = load_policy(cfg)
    assert pol is not None
    assert {(t, s, c) for t, s, _p, c in pol.dropins} == {
        ("docker", "example.com/team", "transports.docker['example.com']"),
        ("docker", "example.com/old", "transports.docker['example.com']"),
        ("docker", "b.example", ""), ("appc", "example.com/team", "")}  # fmt: skip
    subject = Subject("docker", "example.com/team/app:1", "example.com/team/app:1", DIGEST)
    scope, reqs = match_scope(pol, subject)
    assert scope == 'transports.docker["example.com/team"]' and len(reqs) == 2


def test_scope_candidates_follow_path_segments() -> None:
    assert candidate_scopes("reg.example.com:5000/ns/app:1.0") == [
        "reg.example.com:5000/ns/app:1.0", "reg.example.com:5000/ns/app", "reg.example.com:5000/ns",
        "reg.example.com:5000", "*.example.com", "*.com", ""]
    assert candidate_scopes("busybox:latest") == ["busybox:latest", "busybox", ""]
    assert "example.com/etc" not in candidate_scopes("example.com/etcd:1")
    assert "example.com/etc" in candidate_scopes("example.com/etc/x:1")
    digest_ref = f"example.com/app@{DIGEST}"
    assert candidate_scopes(digest_ref)[:2] == [digest_ref, "example.com/app"]


@given(st.lists(st.text(alphabet="abcdefgh", min_size=1, max_size=4), min_size=1, max_size=4),
       st.text(alphabet="abcdefgh", min_size=1, max_size=3))
def test_a_scope_never_covers_a_longer_segment(parts: list[str], suffix: str) -> None:
    scope = "/".join(parts)
    assert scope not in candidate_scopes(f"{scope}{suffix}:1")
    assert scope in candidate_scopes(f"{scope}/{suffix}:1")


def test_most_specific_scope_wins(cfg: Path) -> None:
    write(cfg, {"default": [{"type": "insecureAcceptAnything"}], "transports": {"docker": {
        "example.com": [{"type": "reject"}], "example.com/team": [{"type": "insecureAcceptAnything"}],
        "": [{"type": "reject"}]}}})  # fmt: skip
    pol = load_policy(cfg)
    assert pol is not None
    def scope(ref: str, transport: str = "docker") -> str:
        return match_scope(pol, Subject(transport, ref, "", DIGEST))[0]

    assert scope("example.com/team/app:1") == 'transports.docker["example.com/team"]'
    assert scope("example.com/teamx/app:1") == 'transports.docker["example.com"]'
    assert match_scope(pol, Subject("docker", "other.org/app:1", "", DIGEST))[0] == 'transports.docker[""]'
    assert match_scope(pol, Subject("oci", "other.org/app:1", "", DIGEST))[0] == "default"


@pytest.mark.parametrize(("rule", "image", "signed", "ok"), [
    (Identity("matchExact"), "a.com/x:1", "a.com/x:1", True),
    (Identity("matchExact"), "a.com/x:1", "a.com/x:2", False),
    (Identity(), "a.com/x:1", "a.com/x:1", True),
    (Identity(), "a.com/x:1", "a.com/x:2", False),
    (Identity(), f"a.com/x@{DIGEST}", "a.com/x:2", True),
    (Identity(), f"a.com/x@{DIGEST}", "a.com/y:2", False),
    (Identity("matchRepository"), "a.com/x:1", "a.com/x:9", True),
    (Identity("matchRepository"), "a.com/x:1", "a.com/xy:1", False),
    (Identity("exactReference", docker_reference="b.com/z:1"), "a.com/x:1", "b.com/z:1", True),
    (Identity("exactRepository", docker_repository="b.com/z"), "a.com/x:1", "b.com/z:7", True),
    (Identity("remapIdentity", prefix="mirror.local/ns", signed_prefix="a.com/ns"), "mirror.local/ns/x:1",
     "a.com/ns/x:1", True),
    (Identity("remapIdentity", prefix="mirror.local/ns", signed_prefix="a.com/ns"), "mirror.local/nsx/x:1",
     "a.com/nsx/x:1", False),
])  # fmt: skip
def test_identity_rules(rule: Identity, image: str, signed: str, ok: bool) -> None:
    assert identity_matches(rule, image, signed) is ok


def payload(digest: str = DIGEST, ref: str = "a.com/x:1", **crit: object) -> bytes:
    doc = {"critical": {"type": GPG_PAYLOAD_TYPE, "image": {"docker-manifest-digest": digest},
                        "identity": {"docker-reference": ref}, **crit}, "optional": None}
    return json.dumps(doc).encode()


def test_payload_parsing_is_strict() -> None:
    assert parse_payload(payload(), GPG_PAYLOAD_TYPE) == (DIGEST, "a.com/x:1")
    for bad in (payload(extra=1), payload().replace(b"docker-manifest-digest", b"Docker-manifest-digest"),
                b'{"critical": {}, "critical": {}}', payload().replace(b"atomic", b"cosign")):
        with pytest.raises(ValueError):
            parse_payload(bad, GPG_PAYLOAD_TYPE)


def test_decide_reasons(cfg: Path) -> None:
    write(cfg, {"default": [signed(keyFingerprints=["A" * 40])]})
    pol = load_policy(cfg)
    subject = Subject("docker", "a.com/x:1", "a.com/x:1", DIGEST)

    def reason(sigs: list[Verified]) -> str:
        with pytest.raises(PolicyDeniedError) as err:
            decide(pol, subject, lambda _r: sigs)
        return err.value.reason

    assert reason([]) == "no-signature"
    assert reason([Verified(None, problem="signed by unknown key 1234")]) == "untrusted-key"
    assert reason([Verified("B" * 40, payload())]) == "untrusted-key"
    assert reason([Verified(None, problem="bad signature")]) == "bad-signature"
    assert reason([Verified("A" * 40, payload(digest="sha256:" + "b" * 64))]) == "identity-mismatch"
    assert reason([Verified("A" * 40, payload(ref="a.com/evil:1"))]) == "identity-mismatch"
    assert reason([Verified("A" * 40, payload(extra=True))]) == "bad-signature"
    assert decide(pol, subject, lambda _r: [Verified(None, problem="x"), Verified("A" * 40, payload())]).signers == (
        "A" * 40,)


def test_unnamed_appc_images_are_judged_against_every_scope(cfg: Path) -> None:
    """Before an ACI's name is read, it passes only if some appc scope (or the default) would accept it."""
    subject = Subject("appc", "bomb.aci", "bomb.aci", DIGEST)
    detached = [Verified("A" * 40)]
    write(cfg, {"default": [{"type": "reject"}]})
    with pytest.raises(PolicyDeniedError) as err:
        decide_unnamed(load_policy(cfg), subject, lambda _r: detached)
    assert err.value.reason == "rejected-scope"
    write(cfg, {"default": [{"type": "reject"}], "transports": {"appc": {
        "example.com": [signed(keyFingerprints=["A" * 40])], "other.com": [{"type": "reject"}]}}})
    pol = load_policy(cfg)
    assert decide_unnamed(pol, subject, lambda _r: detached).scope == 'transports.appc["example.com"]'
    with pytest.raises(PolicyDeniedError) as err:
        decide_unnamed(pol, subject, lambda _r: [])
    assert err.value.reason == "no-signature" and "no appc scope accepts it" in err.value.message
    assert "no signature was found" in err.value.message


def test_mcs_ranges_and_labels(tmp_path: Path) -> None:
    from kvmrkt.errors import SELinuxError
    from policy.selinux import Label, allocate, parse_range

    assert parse_range("c0.c1023") == (0, 1023)
    for bad in ("c5.c3", "c0.c3", "x", "c0.c2000"):
        with pytest.raises(SELinuxError):
            parse_range(bad)
    label = Label("u:r:t", "u:object_r:f", (3, 9))
    assert label.process_label == "u:r:t:s0:c3,c9" and label.file_label == "u:object_r:f:s0:c3,c9"
    path = tmp_path / "mcs.json"
    first = allocate(path, "a", ["a"], categories="c0.c7")
    assert allocate(path, "a", ["a"], categories="c0.c7") == first
    others = {allocate(path, f"p{i}", None, categories="c0.c7").mcs for i in range(27)}
    assert first.mcs not in others and len(others) == 27  # 8 categories: 28 pairs
    with pytest.raises(SELinuxError, match="no free"):
        allocate(path, "one-too-many", None, categories="c0.c7")
