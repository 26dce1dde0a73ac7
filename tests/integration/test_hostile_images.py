"""Hostile images: every escape, bomb and lie is rejected with a clear error, and the store is unchanged.

Each case is an OCI image layout whose layers are tarballs made here, imported with the real CLI.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
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


# --- bombs: what is written counts, untrusted bytes are judged first, scratch is kvmrkt's own ----------------


def _store_files(k: Kvmrkt) -> list[str]:
    """Every file of the store but the index and its lock (blobs, signatures, rootfs, work entries)."""
    cas = k.data / "cas"
    return sorted(str(p.relative_to(cas)) for p in cas.rglob("*") if not p.name.startswith(("index.db", "lock")))


def _scratch_left(k: Kvmrkt) -> list[Path]:
    """Work entries of this store: in its tmp, and its unpack directories in the memory scratch."""
    from kvmrkt.images.store import Store, memory_scratch

    return [*(k.data / "cas" / "tmp").iterdir(), *memory_scratch().glob(f"{Store(k.data).unpack_prefix}*")]


def _refused(k: Kvmrkt, args: list[str], rc: int, message: str, before: list[str]) -> None:
    """The command fails with ``rc`` and ``message``, leaves the store as it was and no scratch, and image gc
    still works."""
    res = k(*args)
    assert res.rc == rc and message in res.err, (res.rc, res.err)
    assert "Traceback" not in res.err
    assert _store_files(k) == before
    assert not _scratch_left(k)
    assert "Traceback" not in k.ok("image", "gc").err


def sparse_layer(tmp_path: Path, fmt: str, *, compress: bool = True, size: int = 64 << 20) -> bytes:
    """A layer holding one GNU tar sparse member (``fmt``: gnu = old GNU 'S', else PAX sparse 0.0/0.1/1.0) that is
    all hole: a few hundred bytes that expand to ``size`` bytes written."""
    src = tmp_path / f"sparse-{fmt}"
    src.mkdir()
    with (src / "holes").open("wb") as fh:
        fh.truncate(size)
    args = ["--format=gnu"] if fmt == "gnu" else ["--format=pax", f"--sparse-version={fmt}"]
    data = subprocess.run(["tar", "--sparse", *args, "-cf", "-", "-C", str(src), "holes"], check=True,
                          capture_output=True).stdout
    return gzip.compress(data) if compress else data


@pytest.mark.parametrize(("fmt", "compress"), [("gnu", True), ("0.0", True), ("0.1", True), ("1.0", True),
                                               ("1.0", False)])
def test_sparse_member_bomb(kvmrkt: Kvmrkt, tmp_path: Path, fmt: str, compress: bool) -> None:
    data = sparse_layer(tmp_path, fmt, compress=compress)
    assert len(data) < 64 << 10
    layout = make_layout(tmp_path, [data])
    _refused(kvmrkt, ["image", "import", f"oci:{layout}:latest", "--name", "sparse"], 3, "expands on disk more "
             "than 200x", _store_files(kvmrkt))


def test_hardlinks_count_their_size(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    kvmrkt.write_config("[images]\nmax_total_bytes = 16777216\n")
    links = [special(f"l{i}", tarfile.LNKTYPE, "f") for i in range(40)]  # 40 names for 1 MiB: 41 MiB to a reader
    layout = make_layout(tmp_path, [layer(file("f", os.urandom(1 << 20)), *links)])
    _refused(kvmrkt, ["image", "import", f"oci:{layout}:latest", "--name", "links"], 3, "exceeds 16777216 bytes",
             _store_files(kvmrkt))


def test_deep_tree(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    deep = [special("/".join(["d"] * i), tarfile.DIRTYPE) for i in range(1, 3001)]
    layout = make_layout(tmp_path, [layer(*deep)])
    _refused(kvmrkt, ["image", "import", f"oci:{layout}:latest", "--name", "deep"], 3, "deeper than 256 directories",
             _store_files(kvmrkt))


def _bomb_aci(tmp_path: Path, size: int = 64 << 20) -> Path:
    """An ACI as actool lays it out (rootfs/ first, the manifest last) whose rootfs holds ``size`` zero bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        zeros = tarfile.TarInfo("rootfs/zeros")
        zeros.size = size
        tar.addfile(zeros, io.BytesIO(bytes(size)))
        manifest = json.dumps({"acKind": "ImageManifest", "acVersion": "0.8.11", "name": "example.com/bomb",
                               "app": {"exec": ["/zeros"]}}).encode()
        info = tarfile.TarInfo("manifest")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    path = tmp_path / "bomb.aci"
    path.write_bytes(gzip.compress(buf.getvalue(), 9))
    return path


def test_unsigned_aci_bomb_is_judged_before_it_is_decompressed(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    aci = _bomb_aci(tmp_path)
    assert aci.stat().st_size < 100 << 10
    (kvmrkt.config / "policy.json").write_text('{"default": [{"type": "reject"}]}')
    before = _store_files(kvmrkt)
    _refused(kvmrkt, ["image", "import", str(aci)], 40, "rejected", before)
    _refused(kvmrkt, ["image", "import", str(aci), "--name", "example.com/bomb:1"], 40,
             "example.com/bomb:1", before)


def test_aci_bomb_decompression_is_bounded(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    aci = _bomb_aci(tmp_path)  # the fixture's policy accepts anything: the limits must stop it
    _refused(kvmrkt, ["image", "import", str(aci)], 3, "compression bomb", _store_files(kvmrkt))


def test_rejected_docker_archive_stores_nothing(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers"}})
    parts = {"manifest.json": json.dumps([{"Config": "c.json", "RepoTags": ["evil:1"], "Layers": ["l.tar"]}]),
             "c.json": config, "l.tar": layer(file("a", os.urandom(4096)), compress=False)}
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in parts.items():
            raw = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    (kvmrkt.config / "policy.json").write_text('{"default": [{"type": "reject"}]}')
    _refused(kvmrkt, ["image", "import", f"docker-archive:{archive}"], 40, "evil:1", _store_files(kvmrkt))


def _tree(root: Path, depth: int, uid: int) -> None:
    """A ``depth``-deep chain of directories with a file at the bottom, owned by ``uid``, an hour and more old."""
    os.mkdir(root, 0o755)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", 0o755, dir_fd=fd)
        os.chown("d", uid, uid, dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    os.chown(root, uid, uid)
    os.utime(root, (time.time() - 7200, time.time() - 7200))


def test_image_gc_survives_planted_and_deep_scratch(kvmrkt: Kvmrkt) -> None:
    """Anyone can create /dev/shm/kvmrkt-unpack-* (older versions' scratch names): gc removes only this uid's
    old trees there (iteratively, whatever their depth) and never touches another user's."""
    tag = os.urandom(4).hex()
    planted, legacy = Path(f"/dev/shm/kvmrkt-unpack-planted-{tag}"), Path(f"/dev/shm/kvmrkt-unpack-legacy-{tag}")
    try:
        _tree(planted, 3000, 65534)
        _tree(legacy, 3000, os.geteuid())
        for _ in range(2):
            res = kvmrkt("image", "gc")
            assert res.rc == 0 and "Traceback" not in res.err, res.err
        assert planted.is_dir() and planted.stat().st_uid == 65534
        assert not legacy.exists()
    finally:
        for path in (planted, legacy):
            subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=True)


def test_planted_memory_scratch_is_not_used(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    from kvmrkt.images.store import memory_scratch

    base = memory_scratch()
    aside = base.with_name(f"{base.name}.aside-{os.getpid()}")
    if base.exists():
        base.rename(aside)
    try:
        base.mkdir(0o777)
        os.chown(base, 65534, 65534)
        layout = make_layout(tmp_path, [layer(file("a"))])
        kvmrkt.ok("image", "import", f"oci:{layout}:latest", "--name", "auto")  # auto: unpacked on disk instead
        assert not list(base.iterdir())
        kvmrkt.write_config('[images]\nscratch = "memory"\n')
        kvmrkt.ok("image", "rm", "auto")
        _refused(kvmrkt, ["image", "import", f"oci:{layout}:latest", "--name", "memory"], 3,
                 "is not a 0700 directory owned by uid 0", _store_files(kvmrkt))
        assert base.stat().st_uid == 65534 and not list(base.iterdir())
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=True)
        if aside.exists():
            aside.rename(base)


def _wait_unpacking(k: Kvmrkt, proc: subprocess.Popen[str]) -> Path:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for entry in _scratch_left(k):
            tree = entry / "rootfs"
            if entry.name.startswith("unpack-") and tree.is_dir() and len(os.listdir(tree)) > 100:
                return entry
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("prepare never started unpacking")


def test_kill_during_prepare_leaves_no_scratch(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    many = [file(f"f{i}", b"x" * 64) for i in range(40000)]
    layout = make_layout(tmp_path, [layer(*many)])
    for then in (["image", "gc"], ["image", "import", f"oci:{make_layout(tmp_path / 'small', [layer(file('a'))])}"]):
        proc = kvmrkt.start("prepare", f"oci:{layout}:latest")
        entry = _wait_unpacking(kvmrkt, proc)
        proc.kill()
        proc.communicate(timeout=30)
        assert entry.exists()  # the killed maker's tree, until the next build or gc
        kvmrkt.ok(*then)
        assert not entry.exists(), then
        assert not _scratch_left(kvmrkt)
