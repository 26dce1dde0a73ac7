"""Tests for kvmrkt.images.scratch: iterative removal of deep trees, locked entries, and the sweep of dead ones."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmrkt.errors import ImageError
from kvmrkt.images.scratch import create, remove_path, sweep


def _chain(root: Path, depth: int) -> None:
    os.mkdir(root)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(depth):
        os.mkdir("d", dir_fd=fd)
        os.symlink("/etc", f"link{i}", dir_fd=fd)  # never followed
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
    os.close(fd)


def test_remove_deep_tree(tmp_path: Path) -> None:
    _chain(tmp_path / "deep", 3000)  # deeper than the recursion limit, paths longer than PATH_MAX
    remove_path(tmp_path / "deep")
    assert not (tmp_path / "deep").exists() and Path("/etc/passwd").exists()
    remove_path(tmp_path / "missing")


def test_sweep_removes_only_dead_entries(tmp_path: Path) -> None:
    base = tmp_path / "scratch"
    live = create(base, "unpack-")
    dead = create(base, "unpack-")
    blob = create(base, "blob-", directory=False)
    _chain(dead.path / "rootfs", 1200)
    os.close(dead.fd)  # what a kill -9 of its maker does: the lock goes, the tree stays
    os.close(blob.fd)
    assert sorted(sweep(base)) == sorted([dead.path.name, blob.path.name])
    assert live.path.is_dir() and not dead.path.exists() and not blob.path.exists()
    live.close()
    assert not live.path.exists() and sweep(base) == []


def test_create_refuses_a_base_that_is_not_its_own(tmp_path: Path) -> None:
    base = tmp_path / "open"
    base.mkdir(mode=0o777)
    base.chmod(0o777)
    with pytest.raises(ImageError, match="not a 0700 directory"):
        create(base, "unpack-")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ImageError):
        create(tmp_path / "link", "unpack-")
    assert not (tmp_path / "elsewhere").exists()
