"""Tests for kvmrkt.images.layers: layer tars are built in memory and applied to a scratch root (needs root)."""

from __future__ import annotations

import gzip
import io
import os
import pathlib
import re
import stat
import tarfile

import pytest

from kvmrkt.errors import LayerError
from kvmrkt.images.layers import LayerApplier, LayerLimits

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="applying layers (chown, setuid) needs root")

Member = tuple[tarfile.TarInfo, bytes | None]


def _info(
    name: str, kind: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int = 1_000_000
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, mtime
    return info


def reg(name: str, data: bytes = b"", **kw: int) -> Member:
    info = _info(name, tarfile.REGTYPE, **kw)
    info.size = len(data)
    return info, data


def dir_(name: str, **kw: int) -> Member:
    return _info(name, tarfile.DIRTYPE, **{"mode": 0o755, **kw}), None


def sym(name: str, target: str, **kw: int) -> Member:
    info = _info(name, tarfile.SYMTYPE, **{"mode": 0o777, **kw})
    info.linkname = target
    return info, None


def hard(name: str, target: str) -> Member:
    info = _info(name, tarfile.LNKTYPE)
    info.linkname = target
    return info, None


def node(name: str, kind: bytes) -> Member:
    info = _info(name, kind)
    info.devmajor, info.devminor = 1, 3
    return info, None


def layer(*members: Member, gz: bool = False) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return io.BytesIO(gzip.compress(raw, compresslevel=9) if gz else raw)


def apply(root: pathlib.Path, *layers: io.BytesIO, limits: LayerLimits | None = None) -> LayerApplier:
    applier = LayerApplier(root, limits or LayerLimits())
    for blob in layers:
        applier.apply(blob)
    applier.finish()
    return applier


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def root(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "root"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def outside(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "outside"
    path.mkdir(mode=0o755)
    (path / "secret").write_bytes(b"secret")
    return path


def assert_outside_untouched(outside: pathlib.Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_bytes() == b"secret"
    assert os.stat(outside / "secret").st_nlink == 1
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o755
    assert not (outside.parent / "escape").exists()


def test_basic_types(root: pathlib.Path) -> None:
    apply(
        root,
        layer(
            dir_("a", mode=0o750),
            reg("a/f", b"hello", mode=0o640),
            sym("a/s", "/nowhere/at/all"),
            hard("a/h", "./a//f"),
            (_info("a/p", tarfile.FIFOTYPE, mode=0o620), None),
            reg("./x//y/./z", b"deep"),
        ),
    )
    assert (root / "a/f").read_bytes() == b"hello"
    assert stat.S_IMODE(os.stat(root / "a/f").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(root / "a").st_mode) == 0o750
    assert os.readlink(root / "a/s") == "/nowhere/at/all"
    assert os.stat(root / "a/h").st_ino == os.stat(root / "a/f").st_ino
    assert stat.S_ISFIFO(os.lstat(root / "a/p").st_mode)
    assert stat.S_IMODE(os.lstat(root / "a/p").st_mode) == 0o620
    assert (root / "x/y/z").read_bytes() == b"deep"
    assert stat.S_IMODE(os.stat(root / "x/y").st_mode) == 0o755  # implicit parents
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700  # root untouched


def test_gzip_layer(root: pathlib.Path) -> None:
    apply(root, layer(reg("z", b"zipped" * 1000), gz=True))
    assert (root / "z").read_bytes() == b"zipped" * 1000


def test_modes_ownership_and_mtimes(root: pathlib.Path) -> None:
    apply(
        root,
        layer(
            reg("suid", b"x", mode=0o4755, uid=1234, gid=5678, mtime=1_234_567),
            reg("sgid", b"x", mode=0o2711, uid=1, gid=2),
            dir_("tmp", mode=0o1777, uid=7, gid=8),
            sym("ln", "suid", uid=42, gid=43, mtime=7_654_321),
        ),
    )
    st = os.stat(root / "suid")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (0o4755, 1234, 5678, 1_234_567)
    assert stat.S_IMODE(os.stat(root / "sgid").st_mode) == 0o2711
    st = os.stat(root / "tmp")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o1777, 7, 8)
    st = os.lstat(root / "ln")
    assert (st.st_uid, st.st_gid, st.st_mtime) == (42, 43, 7_654_321)


def test_whiteout_file_and_dir(root: pathlib.Path) -> None:
    lower = layer(reg("a/f"), reg("a/g"), dir_("d"), reg("d/x/y"))
    upper = layer(reg("a/.wh.f"), reg(".wh.d"), reg(".wh.never-existed"), reg("a/h"), reg("a/.wh.h"))
    apply(root, lower, upper)
    assert sorted(p.name for p in root.iterdir()) == ["a"]
    # a whiteout hides lower layers only: a/h from the same layer stays
    assert sorted(p.name for p in (root / "a").iterdir()) == ["g", "h"]


def test_opaque_dir_keeps_same_layer_entries(root: pathlib.Path) -> None:
    lower = layer(reg("o/old"), reg("o/sub/lower"), reg("o/kept/lower"), reg("other/stays"))
    upper = layer(
        dir_("o"), reg("o/early"), reg("o/kept/new"), reg("o/.wh..wh..opq"), reg("o/late"), reg("o/sub2/late")
    )
    apply(root, lower, upper)
    assert sorted(p.name for p in (root / "o").iterdir()) == ["early", "kept", "late", "sub2"]
    assert sorted(p.name for p in (root / "o/kept").iterdir()) == ["new"]
    assert (root / "other/stays").exists()


def test_later_layers_replace_entries(root: pathlib.Path, outside: pathlib.Path) -> None:
    lower = layer(reg("p/q/r"), reg("f", b"old"), sym("s", str(outside / "secret")), sym("d", str(outside)))
    upper = layer(reg("p", b"file"), reg("f", b"new"), reg("s", b"pwn"), dir_("d", mode=0o777))
    apply(root, lower, upper)
    assert (root / "p").read_bytes() == b"file"
    assert (root / "f").read_bytes() == b"new"
    assert (root / "s").read_bytes() == b"pwn" and not (root / "s").is_symlink()
    assert stat.S_ISDIR(os.lstat(root / "d").st_mode)
    assert_outside_untouched(outside)
    apply(root, layer(dir_("p")))
    assert stat.S_ISDIR(os.lstat(root / "p").st_mode)


@pytest.mark.parametrize("name", ["/etc/passwd", "../escape", "a/../../escape", "a/b/../c", "./../escape"])
def test_rejects_bad_names(root: pathlib.Path, outside: pathlib.Path, name: str) -> None:
    with pytest.raises(LayerError, match=re.escape(f"layer member {name!r}")):
        apply(root, layer(reg(name, b"x")))
    assert_outside_untouched(outside)


def test_rejects_symlink_parent_in_one_layer(root: pathlib.Path, outside: pathlib.Path) -> None:
    fds = open_fds()
    with pytest.raises(LayerError, match="l/pwned"):
        apply(root, layer(sym("l", "../outside"), reg("l/pwned", b"x")))
    assert_outside_untouched(outside)
    assert open_fds() == fds


@pytest.mark.parametrize(
    ("link", "target", "member"),
    [
        ("etc", "/", "etc{outside}/pwned"),
        ("etc", "{outside}", "etc/pwned"),
        ("a", "../outside", "a/pwned"),
        ("a", "../../../../../../../../..{outside}", "a/pwned"),
        ("d/a", "../../outside", "d/a/sub/pwned"),
        ("d/a", "../../outside", "d/a/pwned"),
    ],
)
def test_rejects_two_layer_symlink_attack(
    root: pathlib.Path, outside: pathlib.Path, link: str, target: str, member: str
) -> None:
    target, member = target.format(outside=outside), member.format(outside=outside)
    applier = LayerApplier(root)
    applier.apply(layer(sym(link, target)))
    assert os.readlink(root / link) == target  # symlinks may point anywhere, they are just never followed
    with pytest.raises(LayerError):
        applier.apply(layer(reg(member, b"pwned")))
    with pytest.raises(LayerError):
        applier.apply(layer(dir_(member)))
    with pytest.raises(LayerError):
        applier.apply(layer(reg(member.rsplit("/", 1)[0] + "/.wh.secret")))
    assert_outside_untouched(outside)


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ([hard("h", "../outside/secret")], r"\.\."),
        ([hard("h", "{outside}/secret")], "absolute"),
        ([hard("h", "missing")], "does not exist"),
        ([dir_("dir"), hard("h", "dir")], "is a directory"),
        ([sym("s", "{outside}"), hard("h", "s/secret")], "symlink"),
        ([sym("s", "../outside"), hard("h", "s/secret")], "symlink"),
    ],
)
def test_rejects_bad_hardlinks(
    root: pathlib.Path, outside: pathlib.Path, members: list[Member], match: str
) -> None:
    for info, _ in members:
        info.linkname = info.linkname.format(outside=outside)
    with pytest.raises(LayerError, match=match):
        apply(root, layer(*members))
    assert not os.path.lexists(root / "h")
    assert_outside_untouched(outside)


def test_devices_skipped_and_recorded(root: pathlib.Path) -> None:
    applier = apply(
        root, layer(node("dev/null", tarfile.CHRTYPE), node("./dev/sda", tarfile.BLKTYPE), reg("dev/k"))
    )
    assert applier.skipped_devices == ["dev/null", "dev/sda"]
    assert sorted(p.name for p in (root / "dev").iterdir()) == ["k"]


def test_gzip_bomb_rejected_by_ratio(root: pathlib.Path) -> None:
    bomb = layer(reg("bomb", bytes(50 * 1024 * 1024)), gz=True)
    assert len(bomb.getvalue()) < 200_000
    fds = open_fds()
    with pytest.raises(LayerError, match="decompresses more than 100x"):
        apply(root, bomb, limits=LayerLimits(max_ratio=100))
    assert open_fds() == fds
    assert os.stat(root / "bomb").st_size < 10 * 1024 * 1024


def test_ratio_applies_only_after_one_mib(root: pathlib.Path) -> None:
    apply(root, layer(reg("zeros", bytes(512 * 1024)), gz=True), limits=LayerLimits(max_ratio=100))
    assert os.stat(root / "zeros").st_size == 512 * 1024


def test_total_bytes_limit(root: pathlib.Path) -> None:
    applier = LayerApplier(root, LayerLimits(max_total_bytes=1000))
    applier.apply(layer(reg("a", b"x" * 600)))
    with pytest.raises(LayerError, match="'b'"):
        applier.apply(layer(reg("b", b"x" * 600)))
    assert not os.path.lexists(root / "b")


def test_entries_limit(root: pathlib.Path) -> None:
    applier = LayerApplier(root, LayerLimits(max_entries=3))
    applier.apply(layer(reg("a"), reg("b"), reg("c")))
    with pytest.raises(LayerError, match="more than 3 entries"):
        applier.apply(layer(reg("d")))
    assert not os.path.lexists(root / "d")


def test_header_size_checked_before_writing(root: pathlib.Path) -> None:
    info = _info("huge", tarfile.REGTYPE)
    info.size = 100 * 1024**3
    truncated = io.BytesIO(info.tobuf(format=tarfile.PAX_FORMAT) + b"x" * 4096)
    with pytest.raises(LayerError, match="'huge': size 107374182400 exceeds"):
        LayerApplier(root).apply(truncated)
    assert not os.path.lexists(root / "huge")


def test_finish_sets_directory_mtimes(root: pathlib.Path) -> None:
    applier = LayerApplier(root)
    applier.apply(
        layer(dir_("a", mtime=1000), dir_("a/b", mtime=2000), reg("a/b/f", mtime=3000), reg("c/d/e"))
    )
    applier.apply(layer(dir_("gone/sub", mtime=5), dir_("link/sub", mtime=5)))
    applier.apply(layer(reg("a/b/g"), reg("gone"), sym("link", "/")))  # stale records are skipped
    assert os.stat(root / "a/b").st_mtime != 2000
    fds = open_fds()
    applier.finish()
    assert open_fds() == fds
    assert os.lstat("/").st_mtime != 5
    assert [os.stat(root / p).st_mtime for p in ("a", "a/b", "a/b/f", "c", "c/d")] == [1000, 2000, 3000, 0, 0]


def test_rejects_unsupported_input(root: pathlib.Path) -> None:
    with pytest.raises(LayerError, match="zstd"):
        LayerApplier(root).apply(io.BytesIO(b"\x28\xb5\x2f\xfd" + bytes(100)))
    with pytest.raises(LayerError, match="not a valid tar"):
        LayerApplier(root).apply(io.BytesIO(b"garbage" * 200))
    with pytest.raises(LayerError, match="not a valid tar"):
        LayerApplier(root).apply(io.BytesIO(gzip.compress(b"garbage" * 200)))
    with pytest.raises(LayerError, match="unsupported tar member type"):
        apply(root, layer((_info("odd", b"Z"), None)))
    with pytest.raises(LayerError, match="invalid owner"):
        apply(root, layer(reg("neg", uid=-1)))
    with pytest.raises(LayerError, match="declared"):
        LayerApplier(root).apply(layer(reg("a", b"x")), compressed_size=100)
    assert list(root.iterdir()) == []
