"""Failure modes: each gives a clear error and a distinct exit code, and leaves no VM behind."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import Kvmrkt


def test_unknown_image(kvmrkt: Kvmrkt) -> None:
    res = kvmrkt("run", "no-such-image")
    assert res.rc == 3
    assert "no image 'no-such-image'" in res.err and "kvmrkt image list" in res.err
    assert not list((kvmrkt.data / "pods").glob("*/*"))


def test_missing_guest_assets(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    kvmrkt.write_config(f'[stage1]\nassets_dir = "{tmp_path / "empty"}"\n')
    res = kvmrkt("run", "busybox", "--exec", "/bin/true")
    assert res.rc == 8
    assert "no guest assets" in res.err and "kvmrkt stage1 build" in res.err


def test_qemu_missing(kvmrkt: Kvmrkt) -> None:
    kvmrkt.write_config('[stage1]\nqemu = "/nonexistent/qemu-system-x86_64"\n')
    res = kvmrkt("run", "busybox", "--exec", "/bin/true")
    assert res.rc == 2
    assert "/nonexistent/qemu-system-x86_64" in res.err


def test_qemu_fails_to_start_shows_its_stderr(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    fake = tmp_path / "qemu-broken"
    fake.write_text("#!/bin/sh\necho 'qemu: could not load kernel: bad magic' >&2\nexit 1\n")
    fake.chmod(0o755)
    kvmrkt.write_config(f'[stage1]\nqemu = "{fake}"\n')
    res = kvmrkt("run", "busybox", "--exec", "/bin/true")
    assert res.rc == 8
    assert "bad magic" in res.err and "exited with code 1" in res.err


def test_accel_kvm_where_unusable(kvmrkt: Kvmrkt) -> None:
    from stage1_kvm.qemu import probe_kvm

    reason = probe_kvm()
    res = kvmrkt("run", "--accel=kvm", "busybox", "--exec", "/bin/true", timeout=60)
    if reason is None:
        assert res.rc == 0, res.err
    else:
        assert res.rc == 8
        assert "--accel=kvm cannot be used" in res.err


def test_boot_timeout(kvmrkt: Kvmrkt) -> None:
    kvmrkt.write_config("[stage1]\nboot_timeout = 0.05\n")
    res = kvmrkt("run", "busybox", "--exec", "/bin/true")
    assert res.rc == 8
    assert "did not report ready" in res.err


def test_not_running_pods(kvmrkt: Kvmrkt) -> None:
    uuid = kvmrkt.ok("prepare", "--quiet", "busybox", "--exec", "/bin/true").out.strip()
    for cmd in (["enter", uuid, "true"], ["stop", uuid]):
        res = kvmrkt(*cmd)
        assert res.rc == 7 and "prepared" in res.err
    assert kvmrkt("status", "0000dead").rc == 7


def test_bad_flags(kvmrkt: Kvmrkt) -> None:
    assert kvmrkt("run", "busybox", "--bogus").rc == 2
    assert kvmrkt("--insecure-options=nonsense", "run", "busybox").rc == 2
    res = kvmrkt("run", "--interactive", "busybox", "busybox")
    assert res.rc == 2
    assert "exactly one app" in res.err
    assert json.loads(kvmrkt.ok("list", "--format", "json").out) == []


def _copy_layout(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _blob_of_layer(layout: Path) -> Path:
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_text())
    return layout / "blobs" / "sha256" / manifest["layers"][0]["digest"].split(":")[1]


def test_import_rejects_tampered_and_broken_layouts(kvmrkt: Kvmrkt, busybox_layout: Path, tmp_path: Path) -> None:
    kvmrkt.ok("image", "rm", "busybox")  # blobs already in the store are not read again from a layout
    tampered = _copy_layout(busybox_layout, tmp_path / "tampered")
    blob = _blob_of_layer(tampered)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    res = kvmrkt("image", "import", f"oci:{tampered}:latest", "--name", "tampered")
    assert res.rc == 3 and "does not match its digest" in res.err

    missing = _copy_layout(busybox_layout, tmp_path / "missing")
    _blob_of_layer(missing).unlink()
    res = kvmrkt("image", "import", f"oci:{missing}:latest", "--name", "missing")
    assert res.rc == 3 and "missing" in res.err

    broken = _copy_layout(busybox_layout, tmp_path / "broken")
    (broken / "index.json").write_text("{not json")
    res = kvmrkt("image", "import", f"oci:{broken}:latest")
    assert res.rc == 2 and "not valid JSON" in res.err

    assert kvmrkt("image", "import", f"oci:{busybox_layout}:nosuchtag").rc == 3
    assert json.loads(kvmrkt.ok("image", "list", "--format", "json").out) == []
    assert not list((kvmrkt.data / "cas" / "tmp").iterdir())
    assert not list((kvmrkt.data / "cas" / "rootfs").iterdir())


def test_image_rm_refuses_images_in_use(kvmrkt: Kvmrkt) -> None:
    uuid = kvmrkt.ok("prepare", "--quiet", "busybox", "--exec", "/bin/true").out.strip()
    res = kvmrkt("image", "rm", "busybox")
    assert res.rc == 3 and uuid in res.err
    kvmrkt.ok("rm", uuid)
    kvmrkt.ok("image", "rm", "busybox")
    assert json.loads(kvmrkt.ok("image", "list", "--format", "json").out) == []
    assert not list((kvmrkt.data / "cas" / "rootfs").iterdir())


def test_guest_text_reaches_the_terminal_without_escape_sequences(kvmrkt: Kvmrkt) -> None:
    """A hostile exec path or working directory (an image's Entrypoint/WorkingDir) holding ESC: the guest's
    error about it, and the guest console shown by --debug, reach kvmrkt's stdout/stderr with ESC rendered."""
    for flags, code, shown in (
        (["--exec", "/bin/no\x1b[2J\x1b]0;pwned\x07pe"], 127, "cannot execute /bin/no\\x1b[2J\\x1b]0;pwned\\x07pe"),
        (["--working-dir", "/no\x1b[31mdir", "--exec", "/bin/true"], 125, "chdir /no\\x1b[31mdir"),
    ):
        res = kvmrkt("--debug", "run", "busybox", *flags)
        assert res.rc == code, res.err
        assert shown in res.err, [ln for ln in res.err.splitlines() if "kvmrkt" in ln]
        assert "\x1b" not in res.err + res.out and "\x07" not in res.err + res.out
