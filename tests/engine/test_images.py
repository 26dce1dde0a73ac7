"""Image import failures the engine maps to image errors, leaving no image behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmrkt.errors import ImageError

from .conftest import Env


def test_a_failing_mkfs_erofs_is_an_image_error_and_leaves_no_image(env: Env, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mkfs.erofs"
    fake.write_text("#!/bin/sh\necho 'mkfs.erofs: too many inodes' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ImageError, match="cannot build the guest root filesystem") as caught:
        env.image("example.com/app:1")
    assert "too many inodes" in caught.value.message
    engine = env.engine()
    assert engine.images() == []
    assert list((env.config.data_dir / "cas" / "tmp").iterdir()) == []
