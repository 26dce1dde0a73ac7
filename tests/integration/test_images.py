"""Image sources against real peers: docker-registry (anonymous, basic and token auth) pushed to by skopeo,
skopeo-made docker-archive and oci-archive files, actool-made ACIs; and the image commands."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Kvmrkt
from .registry import PASSWORD, USER, Registry

HTTP = "--insecure-options=http"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, busybox_layout: Path) -> Iterator[Registry]:
    reg = Registry(tmp_path_factory.mktemp("registry"))
    reg.push(busybox_layout, "test/busybox", "1.0")
    yield reg
    reg.close()


def _ids(k: Kvmrkt) -> dict[str, str]:
    return {name: img["id"] for img in json.loads(k.ok("image", "list", "--format", "json").out)
            for name in img["names"]}


def test_fetch_and_run_from_a_registry(kvmrkt: Kvmrkt, registry: Registry) -> None:
    ref = f"docker://{registry.host}/test/busybox:1.0"
    res = kvmrkt("fetch", ref)
    assert res.rc == 3 and "--insecure-options=http" in res.err
    fetched = kvmrkt.ok(HTTP, "fetch", ref).out.split()
    assert fetched[1] == f"{registry.host}/test/busybox:1.0"
    again = kvmrkt.ok(HTTP, "fetch", ref)
    assert again.out.split()[0] == fetched[0] and "already in the store" in again.err
    by_digest = kvmrkt.ok(HTTP, "fetch", f"docker://{registry.host}/test/busybox@{fetched[0]}").out.split()
    assert by_digest[0] == fetched[0]
    res = kvmrkt(HTTP, "run", ref, "--exec", "/bin/echo", "--", "from the registry")
    assert res.rc == 0 and res.out == "from the registry\n", res.err
    missing = kvmrkt(HTTP, "fetch", f"docker://{registry.host}/test/nothing:1.0")
    assert missing.rc == 3 and "not found" in missing.err


def test_pull_policies(kvmrkt: Kvmrkt, registry: Registry, tmp_path: Path, busybox_layout: Path) -> None:
    ref = f"docker://{registry.host}/test/policy:1"
    res = kvmrkt(HTTP, "run", "--pull-policy=never", ref, "--exec", "/bin/true")
    assert res.rc == 3 and "never" in res.err
    registry.push(busybox_layout, "test/policy", "1")
    first = kvmrkt.ok(HTTP, "fetch", ref).out.split()[0]
    # Move the tag to a different image (same files, another config).
    changed = tmp_path / "changed"
    shutil.copytree(busybox_layout, changed)
    subprocess.run(["umoci", "config", "--image", f"{changed}:latest", "--config.env", "CHANGED=1"], check=True,
                   capture_output=True)
    registry.push(changed, "test/policy", "1")
    kvmrkt.ok(HTTP, "run", "--pull-policy=new", ref, "--exec", "/bin/true")
    assert _ids(kvmrkt)[f"{registry.host}/test/policy:1"] == first
    res = kvmrkt(HTTP, "run", "--pull-policy=update", ref, "--exec", "/bin/sh", "--", "-c", "echo $CHANGED")
    assert res.out == "1\n", res.err
    assert _ids(kvmrkt)[f"{registry.host}/test/policy:1"] != first


@pytest.mark.parametrize("auth", ["basic", "token"])
def test_registry_auth(kvmrkt: Kvmrkt, tmp_path: Path, busybox_layout: Path, auth: str) -> None:
    reg = Registry(tmp_path / "reg", auth=auth)
    try:
        reg.push(busybox_layout, "private/busybox", "1")
        ref = f"docker://{reg.host}/private/busybox:1"
        res = kvmrkt(HTTP, "fetch", ref)
        assert res.rc == 3 and "auth.d" in res.err
        auth_d = kvmrkt.config / "auth.d"
        auth_d.mkdir()
        doc = {"rktKind": "dockerAuth", "rktVersion": "v1", "registries": [reg.host],
               "credentials": {"user": USER, "password": "wrong"}}
        (auth_d / "test.json").write_text(json.dumps(doc))
        res = kvmrkt(HTTP, "fetch", ref)
        assert res.rc == 3
        doc["credentials"]["password"] = PASSWORD
        (auth_d / "test.json").write_text(json.dumps(doc))
        kvmrkt.ok(HTTP, "fetch", ref)
        if reg.tokens:
            assert reg.tokens.requests >= 2
        (auth_d / "test.json").write_text('{"rktKind": "dockerAuth", "registries": "oops"}')
        res = kvmrkt(HTTP, "fetch", ref)
        assert res.rc == 2 and "test.json" in res.err
    finally:
        reg.close()


def test_registry_tls_with_its_own_ca(kvmrkt: Kvmrkt, tmp_path: Path, busybox_layout: Path) -> None:
    reg = Registry(tmp_path / "reg", tls=True)
    try:
        reg.push(busybox_layout, "tls/busybox", "1")
        ref = f"docker://{reg.host}/tls/busybox:1"
        res = kvmrkt("fetch", ref)
        assert res.rc == 3 and "certs.d" in res.err and "CERTIFICATE_VERIFY_FAILED" in res.err
        kvmrkt.ok("--insecure-options=tls", "fetch", ref)
        certs = kvmrkt.config / "certs.d" / reg.host
        certs.mkdir(parents=True)
        (certs / "ca.crt").write_bytes(reg.ca_pem)
        kvmrkt.ok("image", "rm", f"{reg.host}/tls/busybox:1")
        kvmrkt.ok("fetch", ref)
    finally:
        reg.close()


def test_docker_and_oci_archives(kvmrkt: Kvmrkt, busybox_layout: Path, tmp_path: Path) -> None:
    docker = tmp_path / "busybox-docker.tar"
    ociarch = tmp_path / "busybox-oci.tar"
    subprocess.run(["skopeo", "copy", "-q", f"oci:{busybox_layout}:latest", f"docker-archive:{docker}:demo/bb:2.0"],
                   check=True, capture_output=True)
    subprocess.run(["skopeo", "copy", "-q", f"oci:{busybox_layout}:latest", f"oci-archive:{ociarch}:3.0"],
                   check=True, capture_output=True)
    first = kvmrkt.ok("image", "import", f"docker-archive:{docker}").out.split()
    assert first[1] == "docker.io/demo/bb:2.0"
    assert kvmrkt.ok("image", "import", f"docker-archive:{docker}").out.split()[0] == first[0]
    kvmrkt.ok("image", "import", f"oci-archive:{ociarch}:3.0", "--name", "from-oci-archive")
    for name in ("docker.io/demo/bb:2.0", "from-oci-archive"):
        res = kvmrkt("run", name, "--exec", "/bin/sh", "--", "-c", "echo ok $(id -un)")
        assert res.out == "ok root\n", res.err
    assert kvmrkt("image", "import", f"docker-archive:{docker}:nope").rc == 3


def _aci(tmp_path: Path, name: str, manifest: dict[str, object], rootfs_from: Path | None) -> Path:
    src = tmp_path / f"{name}-src"
    (src / "rootfs").mkdir(parents=True)
    if rootfs_from:
        subprocess.run(["umoci", "unpack", "--image", f"{rootfs_from}:latest", str(tmp_path / f"{name}-b")],
                       check=True, capture_output=True)
        shutil.rmtree(src / "rootfs")
        shutil.move(tmp_path / f"{name}-b" / "rootfs", src / "rootfs")
    (src / "manifest").write_text(json.dumps({"acKind": "ImageManifest", "acVersion": "0.8.11", **manifest}))
    out = tmp_path / f"{name}.aci"
    subprocess.run(["actool", "build", "--overwrite", str(src), str(out)], check=True, capture_output=True)
    return out


def test_aci_with_dependency_and_signature(kvmrkt: Kvmrkt, busybox_layout: Path, tmp_path: Path) -> None:
    base = _aci(tmp_path, "base", {"name": "example.com/base", "labels": [{"name": "version", "value": "1"}]},
                busybox_layout)
    app = _aci(tmp_path, "app", {
        "name": "example.com/app", "labels": [{"name": "version", "value": "2"}],
        "dependencies": [{"imageName": "example.com/base", "labels": [{"name": "version", "value": "1"}]}],
        "app": {"exec": ["/bin/sh", "-c", "cat /greeting; echo $MODE; id -u; pwd; grep /data /proc/mounts | wc -l"],
                "user": "app", "group": "app", "workingDirectory": "/home/app",
                "environment": [{"name": "MODE", "value": "aci"}],
                "mountPoints": [{"name": "data", "path": "/data"}],
                "isolators": [{"name": "resource/memory", "value": {"limit": "400M"}}]},
    }, None)  # fmt: skip
    (tmp_path / "app-src" / "rootfs" / "greeting").write_text("hello from the app layer\n")
    subprocess.run(["actool", "build", "--overwrite", str(tmp_path / "app-src"), str(app)], check=True)
    Path(f"{app}.asc").write_text("-----BEGIN PGP SIGNATURE-----\nplaceholder\n")
    res = kvmrkt("image", "import", str(app))
    assert res.rc == 3 and "example.com/base" in res.err and "import the dependency first" in res.err
    base_id = kvmrkt.ok("image", "import", str(base)).out.split()[0]
    app_out = kvmrkt.ok("image", "import", str(app)).out.split()
    assert app_out[0].startswith("sha512:") and app_out[1] == "example.com/app:2"
    assert json.loads(kvmrkt.ok("policy", "explain", "--format", "json", "example.com/app:2").out)[
        "signatures"] == ["detached.asc"]
    uuid_file = tmp_path / "uuid"
    res = kvmrkt("run", "--uuid-file-save", str(uuid_file), "example.com/app:2")
    assert res.rc == 0, res.err
    assert res.out.splitlines() == ["hello from the app layer", "aci", "1000", "/home/app", "1"]
    st = json.loads(kvmrkt.ok("status", "--format", "json", uuid_file.read_text().strip()).out)
    assert st["memory_mib"] == 382 + 128
    manifest = json.loads(kvmrkt.ok("image", "cat-manifest", "example.com/app:2").out)
    assert manifest["acKind"] == "ImageManifest"
    assert json.loads(kvmrkt.ok("image", "inspect", "example.com/app:2").out)["dependencies"] == [base_id]
    res = kvmrkt("image", "rm", "example.com/base:1")
    assert res.rc == 3 and "dependency" in res.err
    exported = tmp_path / "exported.aci"
    kvmrkt.ok("image", "export", "example.com/app:2", str(exported))
    assert subprocess.run(["sha512sum", exported], capture_output=True, text=True).stdout.split()[0] == app_out[0][7:]


def test_image_commands(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    image = json.loads(kvmrkt.ok("image", "inspect", "busybox").out)
    assert image["kind"] == "oci" and image["rootfs"]["format"] == "erofs"
    assert json.loads(kvmrkt.ok("image", "cat-manifest", "busybox").out)["schemaVersion"] == 2
    kvmrkt.ok("image", "extract", "--rootfs-only", "busybox", str(tmp_path / "x"))
    assert (tmp_path / "x" / "bin" / "busybox").is_file() and (tmp_path / "x" / "bin" / "sh").is_symlink()
    kvmrkt.ok("image", "render", "busybox", str(tmp_path / "r"))
    assert (tmp_path / "r" / "manifest").is_file() and (tmp_path / "r" / "rootfs" / "etc" / "passwd").is_file()
    assert kvmrkt("image", "extract", "busybox", str(tmp_path / "r")).rc == 2
    out = tmp_path / "busybox.oci.tar"
    kvmrkt.ok("image", "export", "busybox", str(out))
    assert kvmrkt("image", "export", "busybox", str(out)).rc == 2
    again = kvmrkt.ok("image", "import", f"oci-archive:{out}", "--name", "reimported").out.split()[0]
    assert again == image["id"]
    kvmrkt.ok("image", "verify", "busybox")

    rootfs = kvmrkt.data / "cas" / "rootfs" / (image["rootfs"]["digest"][7:] + ".erofs")
    rootfs.write_bytes(b"corrupted")
    res = kvmrkt("run", "busybox", "--exec", "/bin/echo", "--", "rebuilt")
    assert res.out == "rebuilt\n" and "rebuilding" in res.err
    assert json.loads(kvmrkt.ok("image", "inspect", "busybox").out)["rootfs"] == image["rootfs"]

    layer = kvmrkt.data / "cas" / "blobs" / "sha256" / image["layers"][0][7:]
    data = bytearray(layer.read_bytes())
    data[100] ^= 1
    layer.write_bytes(bytes(data))
    res = kvmrkt("image", "verify", "busybox")
    assert res.rc == 3 and "corrupt" in res.err
    assert not layer.exists()

    res = json.loads(kvmrkt.ok("image", "gc", "--grace-period=0s", "--format", "json").out)
    assert res["images"] == []  # the exited pod still uses it
    kvmrkt.ok("gc", "--grace-period=0s")
    res = json.loads(kvmrkt.ok("image", "gc", "--grace-period=0s", "--format", "json").out)
    assert len(res["images"]) == 1
    assert json.loads(kvmrkt.ok("image", "list", "--format", "json").out) == []
    assert not list((kvmrkt.data / "cas" / "blobs" / "sha256").iterdir())


def test_rootfs_is_deterministic(kvmrkt: Kvmrkt, busybox_layout: Path, tmp_path: Path) -> None:
    other = Kvmrkt(tmp_path / "other", kvmrkt.config)
    other.ok("image", "import", f"oci:{busybox_layout}:latest")
    a = json.loads(kvmrkt.ok("image", "inspect", "busybox").out)["rootfs"]
    b = json.loads(other.ok("image", "inspect", "busybox-oci").out)["rootfs"]
    assert a == b


def test_interrupted_import_reuses_complete_blobs(kvmrkt: Kvmrkt, busybox_layout: Path, tmp_path: Path) -> None:
    layout = tmp_path / "two-layers"
    shutil.copytree(busybox_layout, layout)
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)], check=True, capture_output=True)
    (bundle / "rootfs" / "second-layer").write_text("2\n")
    subprocess.run(["umoci", "repack", "--image", f"{layout}:latest", str(bundle)], check=True, capture_output=True)
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    second = layout / "blobs" / "sha256" / manifest["layers"][1]["digest"][7:]
    saved = second.read_bytes()
    second.unlink()
    assert kvmrkt("image", "import", f"oci:{layout}:latest", "--name", "two").rc == 3
    assert "two:latest" not in _ids(kvmrkt)
    second.write_bytes(saved)
    res = kvmrkt.ok("image", "import", f"oci:{layout}:latest", "--name", "two")
    assert "layer 1/2" in res.err and "already in the store" in res.err
    assert kvmrkt.ok("run", "two", "--exec", "/bin/cat", "--", "/second-layer").out == "2\n"


def test_concurrent_imports(kvmrkt: Kvmrkt, busybox_layout: Path, tmp_path: Path) -> None:
    procs = [subprocess.Popen(kvmrkt.argv("image", "import", f"oci:{busybox_layout}:latest", "--name", f"c{i}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    ids = _ids(kvmrkt)
    assert {ids[f"c{i}:latest"] for i in range(4)} == {ids["busybox:latest"]}
