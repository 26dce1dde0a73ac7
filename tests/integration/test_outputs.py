"""Files kvmrkt writes at paths a user gives it never follow a symlink planted there (or at a temp name beside
it) by someone else: each is replaced atomically or refused, and the root-owned file the symlink points to
stays as it was. The symlinks here are root's own in a non-sticky directory, which the kernel follows whatever
``fs.protected_symlinks`` says, so the tests hold on any host."""

from __future__ import annotations

import secrets
from pathlib import Path

from .conftest import Kvmrkt

PRECIOUS = b"root-owned, not to be overwritten\n"


def _plant(link: Path, tmp_path: Path) -> Path:
    target = tmp_path / f"precious-{link.name}"
    target.write_bytes(PRECIOUS)
    target.chmod(0o600)
    link.symlink_to(target)
    return target


def test_uuid_file_save_and_export_replace_a_planted_symlink(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    uuid_file = tmp_path / "uuid"
    target = _plant(uuid_file, tmp_path)
    uuid = kvmrkt.ok("prepare", "--quiet", "--uuid-file-save", str(uuid_file), "busybox").out.strip()
    assert target.read_bytes() == PRECIOUS
    assert not uuid_file.is_symlink() and uuid_file.read_text() == uuid + "\n"
    kvmrkt.ok("rm", uuid)

    out = tmp_path / "busybox.oci.tar"
    stale = _plant(out.with_name(f".{out.name}.tmp"), tmp_path)  # the temp name export used to write through
    export_target = _plant(out, tmp_path)
    kvmrkt.ok("image", "export", "--overwrite", "busybox", str(out))
    assert stale.read_bytes() == PRECIOUS and export_target.read_bytes() == PRECIOUS
    assert not out.is_symlink() and out.stat().st_size > 1000

    dangling = tmp_path / "extracted"
    dangling.symlink_to(tmp_path / "nowhere")
    res = kvmrkt("image", "extract", "--rootfs-only", "busybox", str(dangling))
    assert res.rc == 2 and "already exists" in res.err and not (tmp_path / "nowhere").exists()


def test_attest_outputs_replace_a_planted_symlink(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    evidence, t2 = tmp_path / "evidence.json", tmp_path / "t2"
    t2.mkdir()
    targets = [_plant(evidence, tmp_path), *(_plant(t2 / n, tmp_path) for n in ("quote.msg", "ak.pem"))]
    kvmrkt.ok("attest", "quote", "--nonce", secrets.token_hex(32), "-o", str(evidence), "--tpm2-tools-dir", str(t2))
    assert all(t.read_bytes() == PRECIOUS for t in targets)
    assert not evidence.is_symlink() and evidence.read_text().startswith("{")
    assert not (t2 / "quote.msg").is_symlink() and (t2 / "ak.pem").read_text().startswith("-----BEGIN")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "keys").symlink_to(elsewhere)
    res = kvmrkt("attest", "init", "--out-dir", str(tmp_path / "keys"))
    assert res.rc == 5 and "a symlink is refused" in res.err and not list(elsewhere.iterdir())
