"""Images out of the store: an image's own manifest, its unpacked root filesystem, an archive of it.

Role: ``kvmrkt image cat-manifest``, ``extract``/``render`` and ``export``. Trust boundary: the stored blobs were
checked by digest at import and are re-checked as they are read (``Store.open_blob``); the destination paths
come from the operator: an existing path is never unpacked into or written through (a new directory, or a temp
file renamed over the target).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

from kvmrkt.digest import Digest
from kvmrkt.errors import ConfigError, ImageError
from kvmrkt.host.files import temp_beside
from kvmrkt.images import oci
from kvmrkt.images.records import ImageRecord, Progress, no_progress
from kvmrkt.images.store import Store


def image_manifest(store: Store, record: ImageRecord) -> dict[str, Any]:
    """The image's own manifest (OCI manifest or appc image manifest)."""
    if record.kind == "aci":
        from kvmrkt.images.aci import MAX_MANIFEST

        with store.open_blob(Digest.parse(record.id)) as reader, tarfile.open(
            fileobj=reader, mode="r|"  # type: ignore[call-overload]
        ) as tar:
            for member in tar:
                if member.name.lstrip("./") == "manifest" and member.isreg() and member.size <= MAX_MANIFEST:
                    fh = tar.extractfile(member)
                    assert fh is not None
                    return oci.load_json(fh.read(), "ACI manifest")
        raise ImageError("ACI manifest not found")
    return oci.load_json(store.read_blob(Digest.parse(record.id)), "manifest")


def extract(store: Store, record: ImageRecord, dest: Path, *, rootfs_only: bool,
            progress: Progress = no_progress) -> Path:
    """Unpack an image's root filesystem (with dependencies) into a new directory ``dest``.

    Without ``rootfs_only`` the tree goes to ``dest/rootfs`` beside ``dest/manifest`` (rkt's layout).
    Raises:
        ConfigError: ``dest`` exists.
    """
    if os.path.lexists(dest):  # a dangling symlink too: never unpack through one
        raise ConfigError(f"{dest} already exists", hint="choose a new directory")
    with store.tmpdir() as tmp:
        tree = Path(tmp) / "rootfs"
        tree.mkdir(mode=0o700)
        store.render(record, tree, progress)
        if rootfs_only:
            shutil.move(str(tree), dest)
        else:
            dest.mkdir(mode=0o700)
            (dest / "manifest").write_text(json.dumps(image_manifest(store, record), indent=2) + "\n")
            shutil.move(str(tree), dest / "rootfs")
    return dest


def export(store: Store, record: ImageRecord, out: Path, *, overwrite: bool = False) -> Path:
    """Write an image as an archive: an ACI for appc images, an ``oci-archive`` for OCI images."""
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists", hint="use --overwrite")
    fd, tmp = temp_beside(out, 0o644)  # then renamed over ``out``: a symlink there is replaced, not followed
    if record.kind == "aci":
        with store.open_blob(Digest.parse(record.id)) as reader, os.fdopen(fd, "wb") as fh:
            shutil.copyfileobj(reader, fh)
    else:
        with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w") as tar:
            def add(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))

            add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            manifest = store.read_blob(Digest.parse(record.id))
            index = {"schemaVersion": 2, "manifests": [{
                "mediaType": oci.MT_OCI_MANIFEST, "digest": record.id, "size": len(manifest),
                "annotations": {oci.REF_NAME: record.name.rsplit(":", 1)[-1]}}]}  # fmt: skip
            add("index.json", json.dumps(index).encode())
            for digest in (record.id, record.config_digest, *record.layers):
                d = Digest.parse(digest)
                with store.open_blob(d) as reader:
                    info = tarfile.TarInfo(f"blobs/{d.algorithm}/{d.hex}")
                    info.size, info.mode = store.blob_path(d).stat().st_size, 0o644
                    tar.addfile(info, reader)
    os.replace(tmp, out)
    return out
