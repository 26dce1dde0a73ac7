"""The trust policy with real keys and signatures: gpg keys made here, signatures made by skopeo (and by gpg
for the malformed cases), a real registry with a lookaside and a cosign signature tag; one test per rejection."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .conftest import Kvmrkt
from .gpg import Gpg, payload
from .registry import Registry

NAME = "example.com/app:1"


@dataclass
class Image:
    layout: Path
    manifest: Path
    digest: str

    @property
    def sigdir(self) -> Path:
        path = Path(f"{self.layout}.signatures")
        path.mkdir(exist_ok=True)
        return path

    @property
    def ref(self) -> str:
        return f"oci:{self.layout}:latest"


@pytest.fixture
def image(tmp_path: Path, busybox_layout: Path) -> Image:
    layout = tmp_path / "img"
    shutil.copytree(busybox_layout, layout)
    digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    return Image(layout, layout / "blobs" / "sha256" / digest[7:], digest)


@pytest.fixture
def gpg(tmp_path: Path) -> Gpg:
    return Gpg(tmp_path / "gnupg")


@pytest.fixture
def strict(kvmrkt: Kvmrkt) -> Kvmrkt:
    """The kvmrkt fixture without its permissive test policy."""
    (kvmrkt.config / "policy.json").unlink()
    return kvmrkt


def trusted_key(k: Kvmrkt, gpg: Gpg, tmp_path: Path, prefix: str = "example.com/app") -> str:
    fpr = gpg.new_key("trusted <trusted@example.com>")
    k.ok("trust", "--prefix", prefix, str(gpg.export(fpr, tmp_path / "trusted.asc")))
    return fpr


def test_no_policy_rejects_everything(strict: Kvmrkt, image: Image) -> None:
    res = strict("image", "import", image.ref, "--name", NAME)
    assert res.rc == 40 and "no trust policy" in res.err and "kvmrkt trust" in res.err
    assert "--insecure-options=image" in res.err
    res = strict("--insecure-options=image", "image", "import", image.ref, "--name", NAME)
    assert res.rc == 0 and "NOT checking signatures" in res.err
    res = strict("run", NAME, "--exec", "/bin/true")
    assert res.rc == 40


def test_signed_image_runs_until_its_key_is_removed(strict: Kvmrkt, image: Image, gpg: Gpg, tmp_path: Path) -> None:
    fpr = trusted_key(strict, gpg, tmp_path)
    gpg.standalone_sign(image.manifest, NAME, fpr, image.sigdir / "signature-1")
    strict.ok("image", "import", image.ref, "--name", NAME)
    res = strict("run", NAME, "--exec", "/bin/echo", "--", "signed and trusted")
    assert res.rc == 0 and res.out == "signed and trusted\n", res.err
    explain = json.loads(strict.ok("policy", "explain", "--format", "json", NAME).out)
    assert explain["scope"] == 'transports.oci["example.com/app"]' and explain["verdict"]["signers"] == [fpr]
    assert strict.ok("trust", "list").out.split()[:2] == [fpr, "example.com/app"]
    strict.ok("trust", "rm", fpr)
    res = strict("run", NAME, "--exec", "/bin/true")
    assert res.rc == 40 and "rejected by default" in res.err


Case = Callable[[Gpg, Image, str], None]


def _sign_with_untrusted(g: Gpg, img: Image, _fpr: str) -> None:
    other = g.new_key("other <other@example.com>")
    g.standalone_sign(img.manifest, NAME, other, img.sigdir / "signature-1")


def _flipped(g: Gpg, img: Image, fpr: str) -> None:
    g.standalone_sign(img.manifest, NAME, fpr, img.sigdir / "signature-1")
    data = bytearray((img.sigdir / "signature-1").read_bytes())
    data[len(data) // 2] ^= 0x20
    (img.sigdir / "signature-1").write_bytes(bytes(data))


def _other_digest(g: Gpg, img: Image, fpr: str) -> None:
    (img.sigdir / "signature-1").write_bytes(g.sign(payload("sha256:" + "0" * 64, NAME), fpr))


def _other_identity(g: Gpg, img: Image, fpr: str) -> None:
    g.standalone_sign(img.manifest, "example.com/other:1", fpr, img.sigdir / "signature-1")


def _extra_critical(g: Gpg, img: Image, fpr: str) -> None:
    (img.sigdir / "signature-1").write_bytes(g.sign(payload(img.digest, NAME, surprise=True), fpr))


def _one_of_two_untrusted(g: Gpg, img: Image, fpr: str) -> None:
    other = g.new_key("other <other@example.com>")
    (img.sigdir / "signature-1").write_bytes(g.sign(payload(img.digest, NAME), fpr, other))


CASES: dict[str, tuple[Case, int, str]] = {
    "unsigned": (lambda g, i, f: None, 41, "no signature"),
    "untrusted key": (_sign_with_untrusted, 42, "unknown key"),
    "signature over other bytes": (_flipped, 43, "bad signature"),
    "wrong manifest digest": (_other_digest, 44, "is for manifest sha256:0000"),
    "wrong identity": (_other_identity, 44, "example.com/other:1"),
    "extra critical field": (_extra_critical, 43, "critical must have exactly"),
    "two signatures, one untrusted": (_one_of_two_untrusted, 42, "unknown key"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rejections(strict: Kvmrkt, image: Image, gpg: Gpg, tmp_path: Path, case: str) -> None:
    fpr = trusted_key(strict, gpg, tmp_path)
    make, code, words = CASES[case]
    make(gpg, image, fpr)
    res = strict("image", "import", image.ref, "--name", NAME)
    assert res.rc == code, res.err
    assert words in res.err and NAME in res.err and 'transports.oci["example.com/app"]' in res.err, res.err
    assert json.loads(strict.ok("image", "list", "--format", "json").out) == [
        img for img in json.loads(strict.ok("image", "list", "--format", "json").out) if NAME not in img["names"]]


def test_expired_key(strict: Kvmrkt, image: Image, gpg: Gpg, tmp_path: Path) -> None:
    old = gpg.new_key("expired <old@example.com>", expire="1d", faked_time="20200101T000000")
    (image.sigdir / "signature-1").write_bytes(gpg.sign(payload(image.digest, NAME), old,
                                                        faked_time="20200101T010000"))
    strict.ok("trust", "--prefix", "example.com/app", str(gpg.export(old, tmp_path / "old.asc")))
    res = strict("image", "import", image.ref, "--name", NAME)
    assert res.rc == 43 and "expired" in res.err, res.err


def test_revoked_subkey(strict: Kvmrkt, image: Image, gpg: Gpg, tmp_path: Path) -> None:
    primary = gpg.new_key("rotating <rot@example.com>", usage="cert")
    sub = gpg.add_signing_subkey(primary)
    (image.sigdir / "signature-1").write_bytes(gpg.sign(payload(image.digest, NAME), sub))
    gpg.revoke_first_subkey(primary)
    strict.ok("trust", "--prefix", "example.com/app", str(gpg.export(primary, tmp_path / "rot.asc")))
    res = strict("image", "import", image.ref, "--name", NAME)
    assert res.rc == 43 and "revoked" in res.err, res.err


def test_prefix_matches_whole_path_segments(strict: Kvmrkt, image: Image, gpg: Gpg, tmp_path: Path) -> None:
    fpr = trusted_key(strict, gpg, tmp_path, prefix="example.com/etc")
    gpg.standalone_sign(image.manifest, "example.com/etcd:1", fpr, image.sigdir / "signature-1")
    res = strict("image", "import", image.ref, "--name", "example.com/etcd:1")
    assert res.rc == 40 and "rejected by default" in res.err
    gpg.standalone_sign(image.manifest, "example.com/etc/app:1", fpr, image.sigdir / "signature-1")
    strict.ok("image", "import", image.ref, "--name", "example.com/etc/app:1")


def test_policy_files_are_linted(strict: Kvmrkt, image: Image, gpg: Gpg, tmp_path: Path) -> None:
    fpr = trusted_key(strict, gpg, tmp_path)
    assert strict.ok("policy", "check").out.startswith("ok:")
    dropin = strict.config / "policy.d" / "team.json"
    dropin.write_text('{"transports": {"docker": {"a.example": [{"type": "reject"}]}, "docker": {}}}')
    for cmd in (["policy", "check"], ["image", "import", image.ref, "--name", NAME]):
        res = strict(*cmd)
        assert res.rc == 4 and "team.json" in res.err and "duplicate key 'docker'" in res.err
    corrupt = tmp_path / "corrupt.asc"
    corrupt.write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nnot a key\n-----END PGP PUBLIC KEY BLOCK-----\n")
    dropin.write_text(json.dumps({"transports": {"docker": {"b.example": [{
        "type": "signedBy", "keyType": "GPGKeys", "keyFingerprints": [fpr],
        "keyPaths": [str(tmp_path / "trusted.asc"), str(corrupt)]}]}}}))  # fmt: skip
    res = strict("policy", "check")
    assert res.rc == 4 and "key 2 of 2 is not a valid OpenPGP public key" in res.err and "team.json" in res.err
    assert strict("policy", "check", str(tmp_path)).rc == 4  # no policy.json there


def test_a_dropin_cannot_relax_policy_json(strict: Kvmrkt, image: Image, gpg: Gpg, tmp_path: Path) -> None:
    fpr = gpg.new_key("trusted <trusted@example.com>")
    key = gpg.export(fpr, tmp_path / "trusted.asc")
    signed = {"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(key)}
    (strict.config / "policy.json").write_text(json.dumps(
        {"default": [{"type": "reject"}], "transports": {t: {"example.com": [signed]} for t in ("oci", "docker")}}))
    (strict.config / "policy.d").mkdir()
    dropin = strict.config / "policy.d" / "team.json"
    for scope in ("example.com/app", ""):  # narrower than policy.json's scope, and the transport default
        dropin.write_text(json.dumps({"transports": {"oci": {scope: [{"type": "insecureAcceptAnything"}]}}}))
        for cmd in (["policy", "check"], ["image", "import", image.ref, "--name", NAME]):
            res = strict(*cmd)
            assert res.rc == 4 and "team.json" in res.err and f"transports.oci[{scope!r}]" in res.err, res.err
            assert "Traceback" not in res.err
    dropin.unlink()
    other = gpg.new_key("other <other@example.com>")
    gpg.standalone_sign(image.manifest, NAME, other, image.sigdir / "signature-1")
    res = strict("trust", "--prefix", "example.com/app", str(gpg.export(other, tmp_path / "other.asc")))
    assert res.rc == 4 and "would relax policy.json's scope 'example.com'" in res.err
    assert not list((strict.config / "policy.d").glob("*.json"))  # the refused trust left nothing behind
    assert strict("image", "import", image.ref, "--name", NAME).rc == 42  # signed, but not by policy.json's key
    dropin.write_text(json.dumps({"transports": {"oci": {"example.com/app": [signed, {"type": "signedBy",
        "keyType": "GPGKeys", "keyPath": str(tmp_path / "other.asc")}]}}}))  # fmt: skip
    out = strict.ok("policy", "check").out
    assert "only adds requirements" in out and "transports.oci['example.com/app'] keeps every requirement" in out
    gpg.standalone_sign(image.manifest, NAME, fpr, image.sigdir / "signature-2")
    strict.ok("image", "import", image.ref, "--name", NAME)  # both keys signed: the drop-in added one


def test_a_deeply_nested_policy_is_exit_code_4(strict: Kvmrkt, image: Image, tmp_path: Path) -> None:
    deep = "[" * 200_000 + "]" * 200_000
    (strict.config / "policy.json").write_text(deep)
    for cmd in (["policy", "check"], ["image", "import", image.ref, "--name", NAME], ["trust", "list"]):
        res = strict(*cmd)
        assert res.rc == 4 and "policy.json" in res.err and "nested deeper than 64 levels" in res.err, res.err
        assert "Traceback" not in res.err
    (tmp_path / "pod.json").write_text(deep)
    res = strict("--insecure-options=image", "prepare", "--pod-manifest", str(tmp_path / "pod.json"))
    assert res.rc == 2 and "nested deeper" in res.err and "Traceback" not in res.err


def _cosign_key(tmp_path: Path) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    pub = tmp_path / "cosign.pub"
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return key, pub


def _cosign_payload(digest: str, reference: str = "example.com/app", **extra: object) -> bytes:
    return payload(digest, reference, kind="cosign container image signature", **extra)


def test_cosign_style_keys(strict: Kvmrkt, image: Image, tmp_path: Path) -> None:
    key, pub = _cosign_key(tmp_path)
    (strict.config / "policy.json").write_text(json.dumps({"default": [{"type": "reject"}], "transports": {
        "oci": {"example.com/app": [{"type": "sigstoreSigned", "keyPath": str(pub)}]}}}))  # fmt: skip

    def sign(data: bytes, flip: bool = False) -> None:
        sig = key.sign(data, ec.ECDSA(hashes.SHA256()))
        if flip:
            sig = sig[:-1] + bytes([sig[-1] ^ 1])
        (image.sigdir / "cosign-1.payload").write_bytes(data)
        (image.sigdir / "cosign-1.sig").write_bytes(base64.b64encode(sig))

    sign(_cosign_payload(image.digest), flip=True)
    assert strict("image", "import", image.ref, "--name", NAME).rc == 43
    sign(payload(image.digest, "example.com/app"))  # the simple-signing type is not a cosign payload
    assert strict("image", "import", image.ref, "--name", NAME).rc == 43
    sign(_cosign_payload(image.digest).replace(b"docker-manifest-digest", b"Docker-manifest-digest"))
    assert strict("image", "import", image.ref, "--name", NAME).rc == 43
    sign(_cosign_payload(image.digest))
    strict.ok("image", "import", image.ref, "--name", NAME)
    explain = json.loads(strict.ok("policy", "explain", "--format", "json", NAME).out)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert explain["verdict"]["signers"] == [hashlib.sha256(der).hexdigest().upper()]


def _push_cosign_signature(reg: Registry, repo: str, digest: str, key: ec.EllipticCurvePrivateKey,
                           work: Path) -> None:
    """A cosign-format signature artifact (payload layer + signature annotation) at tag sha256-HEX.sig."""
    data = _cosign_payload(digest, f"{reg.host}/{repo}")
    sig = base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()
    layout = work / "cosign-layout"
    (layout / "blobs" / "sha256").mkdir(parents=True)

    def blob(raw: bytes) -> dict[str, object]:
        h = hashlib.sha256(raw).hexdigest()
        (layout / "blobs" / "sha256" / h).write_bytes(raw)
        return {"digest": f"sha256:{h}", "size": len(raw)}

    config = blob(b"{}")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                           "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", **blob(data),
                                       "annotations": {"dev.cosignproject.cosign/signature": sig}}]}).encode()
    m = blob(manifest)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **m,
        "annotations": {"org.opencontainers.image.ref.name": "sig"}}]}))  # fmt: skip
    subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", "--preserve-digests", f"oci:{layout}:sig",
                    f"docker://{reg.host}/{repo}:sha256-{digest[7:]}.sig"], check=True, capture_output=True)


def test_registry_lookaside_and_cosign_tag(strict: Kvmrkt, image: Image, gpg: Gpg, tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    try:
        fpr = gpg.new_key("registry signer <reg@example.com>")
        lookaside = tmp_path / "lookaside"
        regd = tmp_path / "skopeo-registries.d"
        regd.mkdir()
        (regd / "test.yaml").write_text(f"docker:\n  {reg.host}:\n    lookaside-staging: file://{lookaside}\n")
        ref = f"{reg.host}/team/app:1"
        subprocess.run(["skopeo", "--registries.d", str(regd), "copy", "-q", "--dest-tls-verify=false",
                        "--sign-by", fpr, image.ref, f"docker://{ref}"], env=gpg.env, check=True, capture_output=True)
        strict.ok("trust", "--prefix", f"{reg.host}/team", str(gpg.export(fpr, tmp_path / "reg.asc")))
        res = strict("--insecure-options=http", "fetch", f"docker://{ref}")
        assert res.rc == 41, res.err  # no lookaside configured for kvmrkt yet: no signature found
        (strict.config / "registries.d").mkdir()
        (strict.config / "registries.d" / "team.json").write_text(
            json.dumps({"docker": {reg.host: {"lookaside": f"file://{lookaside}"}}}))
        strict.ok("--insecure-options=http", "fetch", f"docker://{ref}")

        key, pub = _cosign_key(tmp_path)
        digest = json.loads(strict.ok("image", "inspect", ref).out)["trust"]["signedDigest"]
        (strict.config / "policy.d" / "cosign.json").write_text(json.dumps({"transports": {"docker": {
            f"{reg.host}/cosigned": [{"type": "sigstoreSigned", "keyPath": str(pub)}]}}}))  # fmt: skip
        subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", image.ref,
                        f"docker://{reg.host}/cosigned/app:1"], check=True, capture_output=True)
        res = strict("--insecure-options=http", "fetch", f"docker://{reg.host}/cosigned/app:1")
        assert res.rc == 41, res.err
        _push_cosign_signature(reg, "cosigned/app", digest, key, tmp_path)
        strict.ok("--insecure-options=http", "fetch", f"docker://{reg.host}/cosigned/app:1")
    finally:
        reg.close()


def test_aci_detached_signature(strict: Kvmrkt, gpg: Gpg, tmp_path: Path) -> None:
    src = tmp_path / "aci"
    (src / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", src / "rootfs" / "bin" / "busybox")
    (src / "manifest").write_text(json.dumps({"acKind": "ImageManifest", "acVersion": "0.8.11",
                                              "name": "example.com/app", "labels": [{"name": "version", "value": "1"}],
                                              "app": {"exec": ["/bin/busybox", "true"], "user": "0", "group": "0"}}))
    aci = tmp_path / "app.aci"
    subprocess.run(["actool", "build", str(src), str(aci)], check=True, capture_output=True)
    fpr = trusted_key(strict, gpg, tmp_path)
    assert strict("image", "import", str(aci)).rc == 41
    Path(f"{aci}.asc").write_bytes(gpg.detach_sign(fpr, aci))
    good = aci.read_bytes()
    aci.write_bytes(good[:-10] + bytes(10))
    res = strict("image", "import", str(aci))
    assert res.rc == 43 and "bad signature" in res.err, res.err  # judged before it is decompressed
    Path(f"{aci}.asc").write_bytes(gpg.detach_sign(fpr, tmp_path / "trusted.asc"))  # a signature over other bytes
    aci.write_bytes(good)
    res = strict("image", "import", str(aci))
    assert res.rc == 43 and "bad signature" in res.err, res.err
    Path(f"{aci}.asc").write_bytes(gpg.detach_sign(fpr, aci))
    aci.write_bytes(good)
    strict.ok("image", "import", str(aci))
    assert strict("run", "example.com/app:1").rc == 0


def test_stage1_asset_modified_after_build(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    from kvmrkt.config import Stage1Config

    assets = tmp_path / "assets"
    shutil.copytree(Stage1Config().assets_dir / "minimal", assets / "minimal")
    record = json.loads((assets / "minimal" / "assets.json").read_text())
    for part in ("kernel", "initrd"):
        record[part]["path"] = str(assets / "minimal" / Path(record[part]["path"]).name)
    (assets / "minimal" / "assets.json").write_text(json.dumps(record))
    kvmrkt.write_config(f'[stage1]\nassets_dir = "{assets}"\n')
    kvmrkt.ok("run", "busybox", "--exec", "/bin/true")
    initrd = Path(record["initrd"]["path"])
    data = bytearray(initrd.read_bytes())
    data[-100] ^= 1
    initrd.write_bytes(bytes(data))
    res = kvmrkt("run", "busybox", "--exec", "/bin/true")
    assert res.rc == 8 and "does not match its recorded digest" in res.err


def _attest(k: Kvmrkt, tmp_path: Path, reference: dict[str, object]) -> tuple[int, dict[str, object]]:
    """Quote this test's TPM and verify the evidence against a reference policy."""
    import secrets

    k.ok("attest", "init", "--out-dir", str(tmp_path / "keys"))
    nonce = secrets.token_hex(16)
    k.ok("attest", "quote", "--nonce", nonce, "-o", str(tmp_path / "ev.json"))
    (tmp_path / "ref.json").write_text(json.dumps(reference))
    res = k("attest", "verify", str(tmp_path / "ev.json"), "--ak-pub", str(tmp_path / "keys" / "ak.pem"),
            "--nonce", nonce, "--reference", str(tmp_path / "ref.json"), "--format", "json")
    return res.rc, json.loads(res.out)


def test_an_unsigned_dependency_is_judged_at_every_run(strict: Kvmrkt, gpg: Gpg, busybox_layout: Path,
                                                       tmp_path: Path) -> None:
    """Review finding: an unsigned example.com/base imported once with --insecure-options=image, and a signed
    app that depends on it, ran the unsigned code with no insecure option. Every image whose files reach the pod
    is judged at prepare and run, measured as its own event and named in the attestation report."""
    from .test_images import _aci

    base = _aci(tmp_path, "base", {"name": "example.com/base", "labels": [{"name": "version", "value": "1"}]},
                busybox_layout)
    app = _aci(tmp_path, "app", {
        "name": "example.com/app", "labels": [{"name": "version", "value": "1"}],
        "dependencies": [{"imageName": "example.com/base", "labels": [{"name": "version", "value": "1"}]}],
        "app": {"exec": ["/bin/echo", "ran"], "user": "0", "group": "0"}}, None)
    fpr = trusted_key(strict, gpg, tmp_path)
    Path(f"{app}.asc").write_bytes(gpg.detach_sign(fpr, app))
    # Judged before it is unpacked, so before its name is read: no scope takes it unsigned, and only the signed
    # scope could take it at all (a name-less refusal's reason is the first non-reject scope's: no-signature).
    res = strict("image", "import", str(base))
    assert res.rc == 41 and "no appc scope accepts it" in res.err, res.err
    strict.ok("--insecure-options=image", "image", "import", str(base))
    strict.ok("image", "import", str(app))
    for command in (["run"], ["prepare"]):
        res = strict(*command, "example.com/app:1")
        assert res.rc == 40 and "example.com/base:1" in res.err and "a dependency of example.com/app:1" in res.err
    assert not list((strict.data / "pods").glob("*/*"))  # nothing prepared
    explain = strict.ok("policy", "explain", "example.com/app:1").out
    assert "verdict: accepted" in explain and "dependency example.com/base:1" in explain and "rejected" in explain
    uuid = strict.ok("--insecure-options=image", "prepare", "--quiet", "example.com/app:1").out.strip()
    res = strict("run-prepared", uuid)  # judged again at run, without the option
    assert res.rc == 40 and "example.com/base:1" in res.err
    # Signed by a key trusted for it, the base is accepted; the measurement names each image with its own signer.
    base_key = gpg.new_key("base <base@example.com>")
    strict.ok("trust", "--prefix", "example.com/base", str(gpg.export(base_key, tmp_path / "base.asc")))
    Path(f"{base}.asc").write_bytes(gpg.detach_sign(base_key, base))
    strict.ok("image", "import", str(base))
    res = strict.ok("run", "example.com/app:1")
    assert res.out == "ran\n"
    rc, doc = _attest(strict, tmp_path, {"images": [{"name": "example.com/app:1", "signer": fpr}]})
    assert rc == 5 and doc["failed_check"] == "reference", doc
    (launch,) = doc["report"]["launches"]  # type: ignore[index]
    dep = launch["dependencies"][0]
    assert dep["image"] == "example.com/base:1" and dep["apps"] == ["app"]
    assert launch["problems"] == [f"dependency example.com/base:1 ({dep['digest']}) of app, signed by "
                                  f"['{base_key}'], is not allowed"]
    rc, doc = _attest(strict, tmp_path, {"images": [{"name": "example.com/app:1", "signer": fpr},
                                                    {"name": "example.com/base:1", "signer": base_key}]})
    assert rc == 0, doc


def test_each_app_of_a_pod_is_judged_by_its_own_image(strict: Kvmrkt, image: Image, gpg: Gpg,
                                                      tmp_path: Path) -> None:
    """Review finding: with --pod-manifest, an unsigned app's image renamed to a trusted name passed the
    reference policy, because signers were pooled across the pod's apps and the name came from the manifest."""
    (strict.config / "policy.json").write_text(json.dumps({"default": [{"type": "reject"}], "transports": {
        "oci": {"unsigned": [{"type": "insecureAcceptAnything"}]}}}))
    fpr = trusted_key(strict, gpg, tmp_path)
    gpg.standalone_sign(image.manifest, NAME, fpr, image.sigdir / "signature-1")
    strict.ok("image", "import", image.ref, "--name", NAME)
    other = tmp_path / "other"  # another image (same bytes would be one image, judged under its latest name)
    shutil.copytree(image.layout, other)
    subprocess.run(["umoci", "config", "--image", f"{other}:latest", "--config.label", "made=unsigned"], check=True,
                   capture_output=True)
    strict.ok("image", "import", f"oci:{other}:latest", "--name", "unsigned/box")
    uuid = strict.ok("prepare", "--quiet", NAME, "--name", "app", "--exec", "/bin/true", "---", "unsigned/box",
                     "--name", "box", "--exec", "/bin/true").out.strip()
    manifest = json.loads(strict.ok("cat-manifest", uuid).out)
    manifest["apps"][1]["image"]["name"] = NAME  # the unsigned app, renamed to the trusted name
    (tmp_path / "pod.json").write_text(json.dumps(manifest))
    strict.ok("run", "--pod-manifest", str(tmp_path / "pod.json"))
    rc, doc = _attest(strict, tmp_path, {"images": [{"name": NAME, "signer": fpr}]})
    assert rc == 5 and doc["failed_check"] == "reference", doc
    launch = doc["report"]["launches"][-1]  # type: ignore[index]
    assert launch["verdict"] == "REJECTED" and len(launch["problems"]) == 1, launch
    assert launch["problems"][0].startswith("app box: image unsigned/box:latest"), launch
