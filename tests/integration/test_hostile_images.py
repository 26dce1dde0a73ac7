"""Hostile images: every escape, bomb and lie is rejected with a clear error, and the store is unchanged.

Each case is an OCI image layout whose layers are tarballs made here, imported with the real CLI.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import Kvmrkt

Member = Callable[[tarfile.TarFile], None]


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def layer(*members: Member, compress: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for add in members:
            add(tar)
    return gzip.compress(buf.getvalue(), 1) if compress else buf.getvalue()


def file(name: str, data: bytes = b"x", mode: int = 0o644) -> Member:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), mode
        tar.addfile(info, io.BytesIO(data))

    return add


def special(name: str, kind: bytes, link: str = "", devmajor: int = 0) -> Member:
    def add(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.devmajor, info.mode = kind, link, devmajor, 0o644
        tar.addfile(info)

    return add


def make_layout(root: Path, layers: list[bytes], *, lie: bool = False, manifest_text: str | None = None) -> Path:
    layout = root / "layout"
    layout.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    config = _blob(layout, json.dumps({"architecture": "amd64", "os": "linux",
                                       "config": {"Cmd": ["/bin/sh"]}, "rootfs": {"type": "layers"}}).encode())
    descs = []
    for data in layers:
        d = _blob(layout, data)
        if lie:  # the bytes on disk are not what the digest names
            path = layout / "blobs" / "sha256" / str(d["digest"])[7:]
            path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **d})
    manifest = manifest_text or json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config}, "layers": descs})
    m = _blob(layout, manifest.encode())
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **m,
         "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))  # fmt: skip
    return layout


def _snapshot(k: Kvmrkt) -> tuple[str, list[str]]:
    cas = k.data / "cas"
    return k.ok("image", "list", "--format", "json").out, sorted(p.name for p in (cas / "rootfs").iterdir())


CASES: dict[str, tuple[Callable[[], list[bytes]], str]] = {
    "dotdot": (lambda: [layer(file("../../../../tmp/kvmrkt-escaped"))], "'..'"),
    "absolute": (lambda: [layer(file("/tmp/kvmrkt-escaped"))], "absolute path"),
    "symlink-then-write, two layers": (
        lambda: [layer(special("tmp", tarfile.SYMTYPE, "/tmp")), layer(file("tmp/kvmrkt-escaped"))],
        "symlink"),
    "relative symlink escape": (
        lambda: [layer(special("a", tarfile.SYMTYPE, "../../../../../tmp")), layer(file("a/kvmrkt-escaped"))],
        "symlink"),
    "symlink-then-write, one layer": (
        lambda: [layer(special("d", tarfile.SYMTYPE, "/tmp"), file("d/kvmrkt-escaped"))], "symlink"),
    "hardlink outside": (lambda: [layer(special("h", tarfile.LNKTYPE, "../../../etc/passwd"))], "'..'"),
    "zip bomb": (lambda: [layer(file("zeros", b"\0" * (64 << 20)))], "compression bomb"),
    "garbage layer": (lambda: [b"\x1f\x8b" + os.urandom(4096)], "not a valid tar"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_layers_are_rejected(kvmrkt: Kvmrkt, tmp_path: Path, case: str) -> None:
    make, message = CASES[case]
    layout = make_layout(tmp_path, make())
    before = _snapshot(kvmrkt)
    res = kvmrkt("image", "import", f"oci:{layout}:latest", "--name", "hostile")
    assert res.rc == 3, res.err
    assert message in res.err, res.err
    assert "Traceback" not in res.err
    assert _snapshot(kvmrkt) == before
    assert not list((kvmrkt.data / "cas" / "tmp").iterdir())
    assert not Path("/tmp/kvmrkt-escaped").exists()


def test_lying_digest(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    layout = make_layout(tmp_path, [layer(file("a"))], lie=True)
    res = kvmrkt("image", "import", f"oci:{layout}:latest")
    assert res.rc == 3 and "does not match its digest" in res.err


def test_duplicate_json_keys(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    text = '{"schemaVersion": 2, "schemaVersion": 2, "config": {}, "layers": []}'
    layout = make_layout(tmp_path, [], manifest_text=text)
    res = kvmrkt("image", "import", f"oci:{layout}:latest")
    assert res.rc == 2 and "duplicate key" in res.err


def test_limits_are_configurable(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    kvmrkt.write_config("[images]\nmax_entries = 50\nmax_total_bytes = 1048576\n")
    many = make_layout(tmp_path / "many", [layer(*(file(f"f{i}") for i in range(100)))])
    res = kvmrkt("image", "import", f"oci:{many}:latest")
    assert res.rc == 3 and "entries" in res.err
    big = make_layout(tmp_path / "big", [layer(file("big", os.urandom(2 << 20)))])
    res = kvmrkt("image", "import", f"oci:{big}:latest")
    assert res.rc == 3 and "bytes" in res.err


def test_devices_are_not_created_but_setuid_survives(kvmrkt: Kvmrkt, tmp_path: Path, busybox_layout: Path) -> None:
    layout = make_layout(tmp_path, [layer(special("dev/sda-evil", tarfile.BLKTYPE, devmajor=8),
                                          file("bin/suid", b"#!/bin/sh\n", 0o4755))])
    out = kvmrkt.ok("image", "import", f"oci:{layout}:latest", "--name", "devices").out
    image = json.loads(kvmrkt.ok("image", "inspect", "devices").out)
    assert image["skippedDevices"] == ["dev/sda-evil"] and out.startswith(image["id"])
    kvmrkt.ok("image", "extract", "--rootfs-only", "devices", str(tmp_path / "tree"))
    assert not (tmp_path / "tree" / "dev" / "sda-evil").exists()
    assert (tmp_path / "tree" / "bin" / "suid").stat().st_mode & 0o7777 == 0o4755
    assert (kvmrkt.data / "cas").stat().st_mode & 0o777 == 0o700
