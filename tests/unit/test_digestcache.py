"""stage1_kvm.digestcache and Assets.verify: an unchanged root-only asset is not re-hashed; a changed one always
is, whatever the record says and however its times were put back; a record or a file anyone but root could
have written is never believed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvmrkt.digest import Digest
from kvmrkt.errors import AssetError
from stage1_kvm import digestcache
from stage1_kvm.assets import Assets
from stage1_kvm.digestcache import RECORD, file_digest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="remembered digests are for root-owned files")


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the files actually read and hashed."""
    calls: list[int] = []
    real = digestcache._hash

    def counting(fd: int, algorithm: str) -> Digest:
        calls.append(fd)
        return real(fd, algorithm)

    monkeypatch.setattr(digestcache, "_hash", counting)
    return calls


def _assets_dir(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "stage1"
    root.mkdir(mode=0o700)
    kernel = root / "vmlinux"
    kernel.write_bytes(b"kernel " * 1000)
    kernel.chmod(0o644)
    return root, kernel


def _assets(root: Path, kernel: Path) -> Assets:
    initrd, guard = root / "initrd.img", root / "guard"
    initrd.write_bytes(b"initrd")
    guard.write_bytes(b"guard")
    return Assets("minimal", kernel, initrd, Digest.of_file(kernel), Digest.of_file(initrd), "k", guard,
                  Digest.of_file(guard), verified_in=root)


def test_an_unchanged_asset_is_hashed_once(tmp_path: Path, hashed: list[int]) -> None:
    root, kernel = _assets_dir(tmp_path)
    assets = _assets(root, kernel)
    assets.verify()
    assert len(hashed) == 3
    assets.verify()
    assets.verify()
    assert len(hashed) == 3
    assert (root / RECORD).stat().st_mode & 0o777 == 0o600


def test_a_changed_asset_is_refused_even_with_its_times_put_back(tmp_path: Path, hashed: list[int]) -> None:
    """The hostile case: same size, mtime restored; ctime moved, so it is hashed again and refused."""
    root, kernel = _assets_dir(tmp_path)
    assets = _assets(root, kernel)
    assets.verify()
    st = kernel.stat()
    with kernel.open("r+b") as fh:
        fh.write(b"evil!!")
    os.utime(kernel, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert kernel.stat().st_size == st.st_size and kernel.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(AssetError, match="does not match its recorded digest"):
        assets.verify()


def test_a_replaced_asset_is_hashed_again(tmp_path: Path) -> None:
    root, kernel = _assets_dir(tmp_path)
    good = file_digest(kernel, "sha256", root)
    (root / "new").write_bytes(b"kernel " * 999 + b"evil!!!")
    os.chmod(root / "new", 0o644)
    os.rename(root / "new", kernel)
    assert not file_digest(kernel, "sha256", root).matches(good)


def _forge(root: Path, kernel: Path, digest: str) -> None:
    """A record entry claiming ``digest`` for the kernel as it is now."""
    entry = {"identity": digestcache._identity(kernel.stat(), "sha256"), "digest": digest}
    path = root / RECORD
    path.write_text(json.dumps({str(kernel): entry}))
    path.chmod(0o600)


@pytest.mark.parametrize("weaken", ["record-readable", "record-not-root", "dir-open", "file-writable",
                                    "file-not-root", "record-symlink"])
def test_a_record_or_file_others_could_write_is_not_believed(tmp_path: Path, weaken: str) -> None:
    root, kernel = _assets_dir(tmp_path)
    forged = "0" * 64
    _forge(root, kernel, forged)
    record = root / RECORD
    if weaken == "record-readable":
        record.chmod(0o644)
    elif weaken == "record-not-root":
        os.chown(record, 1000, 1000)
    elif weaken == "dir-open":
        root.chmod(0o755)
    elif weaken == "file-writable":
        kernel.chmod(0o666)
        _forge(root, kernel, forged)  # the chmod moved its ctime
    elif weaken == "file-not-root":
        os.chown(kernel, 1000, 1000)
        _forge(root, kernel, forged)
    elif weaken == "record-symlink":
        (tmp_path / "elsewhere.json").write_text(record.read_text())
        record.unlink()
        record.symlink_to(tmp_path / "elsewhere.json")
    assert file_digest(kernel, "sha256", root) == Digest.of_file(kernel)


def test_the_forged_record_would_be_believed_from_root_itself(tmp_path: Path) -> None:
    """The counterpart of the test above: root's own record is what stands in for the bytes."""
    root, kernel = _assets_dir(tmp_path)
    _forge(root, kernel, "0" * 64)
    assert file_digest(kernel, "sha256", root).hex == "0" * 64


@pytest.mark.parametrize("text", ["not json", "[]", '{"x": 1}', '{"%s": {"identity": 1, "digest": "zz"}}'])
def test_a_damaged_record_means_hashing(tmp_path: Path, text: str) -> None:
    root, kernel = _assets_dir(tmp_path)
    (root / RECORD).write_text(text.replace("%s", str(kernel)))
    (root / RECORD).chmod(0o600)
    assert file_digest(kernel, "sha256", root) == Digest.of_file(kernel)
    assert file_digest(kernel, "sha256", root) == Digest.of_file(kernel)


def test_a_symlinked_asset_is_refused(tmp_path: Path) -> None:
    root, kernel = _assets_dir(tmp_path)
    assets = _assets(root, kernel)
    kernel.rename(root / "real")
    kernel.symlink_to(root / "real")
    with pytest.raises(AssetError, match="cannot be read"):
        assets.verify()
