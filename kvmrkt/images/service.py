"""The image commands: import and fetch through the trust gate, list, remove, collect, verify.

Role: what ``kvmrkt image ...`` and ``fetch`` do, on top of the store (``store``), the sources (``sources``,
``registry``) and the trust gate (``kvmrkt.trust.gate``). Trust boundary: every import passes the gate before
anything but the manifest digest is read; an image still used by a pod that is not garbage is never removed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from kvmrkt.config import RuntimeConfig
from kvmrkt.digest import Digest
from kvmrkt.errors import ImageError, ImageNotFoundError
from kvmrkt.images import export, oci, sources
from kvmrkt.images.records import ImageRecord, Progress, no_progress, normalise_name
from kvmrkt.images.store import Store
from kvmrkt.trust.gate import TrustGate


class ImageService:
    """Images in the store, for one command. ``pods_using()`` maps image IDs to a pod (not yet garbage) using it."""

    def __init__(self, config: RuntimeConfig, store: Store, trust: TrustGate, *,
                 pods_using: Callable[[], dict[str, str]]) -> None:
        self.config = config
        self.store = store
        self.trust = trust
        self.pods_using = pods_using

    def import_image(self, ref: str, *, name: str | None = None, progress: Progress = no_progress) -> ImageRecord:
        """Import an image from a local source or a registry (``kvmrkt image import``).

        Raises:
            ConfigError: an unsupported reference form.
            ImageError: (and subclasses) the image is unusable.
        """
        if sources.is_remote(ref):
            return self.fetch(ref, name=name, pull_policy="update", progress=progress)
        with self.store.importing():
            return sources.import_local(self.store, ref, name=name, progress=progress, gate=self.trust.gate)

    def fetch(self, ref: str, *, name: str | None = None, pull_policy: str = "update",
              progress: Progress = no_progress) -> ImageRecord:
        """Fetch ``docker://``/``oci://`` references (or import local sources) into the store.

        ``pull_policy``: ``new`` uses the store's copy when there is one, ``update`` always asks the registry
        (only missing blobs are downloaded), ``never`` uses only the store.
        """
        if not sources.is_remote(ref):
            if sources.is_source(ref):
                with self.store.importing():
                    return sources.import_local(self.store, ref, name=name, progress=progress,
                                                gate=self.trust.gate)
            return self.store.resolve(ref)
        rref = oci.parse_registry_ref(ref.split("://", 1)[1])
        if pull_policy in ("new", "never"):
            known = self.store.remote(f"docker://{rref}")
            with contextlib.suppress(ImageNotFoundError):
                return self.store.get(known) if known else self.store.resolve(name or rref.name)
            if pull_policy == "never":
                raise ImageNotFoundError(f"{ref} is not in the store and --pull-policy=never forbids fetching it")
        from kvmrkt.images import registry  # network code only for network references

        with self.store.importing():
            return registry.fetch(self.store, rref, config_dir=self.config.config_dir,
                                  insecure=self.config.insecure_options, name=name, progress=progress,
                                  gate=self.trust.gate)

    def for_pod(self, ref: str, pull_policy: str, progress: Progress) -> ImageRecord:
        """The image an app names: fetched or imported when ``ref`` is a source, else from the store."""
        if sources.is_source(ref):
            return self.fetch(ref, pull_policy=pull_policy, progress=progress)
        return self.store.resolve(ref)

    def all(self) -> list[tuple[ImageRecord, list[str]]]:
        """All images in the store, each with every name that points at it."""
        return [(r, self.store.names(r.id)) for r in self.store.images()]

    def _dependencies(self) -> set[str]:
        return {dep for r in self.store.images() for dep in r.dependencies}

    def remove(self, ref: str) -> ImageRecord:
        """Remove an image (or one of its names) unless a pod that is not garbage (or another image) uses it.

        Raises:
            ImageError: the image is in use.
        """
        record = self.store.resolve(ref)
        names = self.store.names(record.id)
        if normalise_name(ref) in names and len(names) > 1:
            self.store.untag(ref)
            return replace(record, name=normalise_name(ref))
        user = self.pods_using().get(record.id)
        if user:
            raise ImageError(f"image {record.name} is used by {user}", hint="remove the pod first (kvmrkt rm / gc)")
        if record.id in self._dependencies():
            raise ImageError(f"image {record.name} is a dependency of another image")
        self.store.remove(record)
        return record

    def gc(self, *, grace_period: float) -> dict[str, list[str]]:
        """Remove images not used for ``grace_period`` seconds by any pod, then unreferenced files."""
        now = time.time()
        in_use = set(self.pods_using()) | self._dependencies()
        removed = []
        rows = self.store.db.execute("SELECT id, last_used FROM images").fetchall()
        for image_id, last_used in rows:
            if image_id not in in_use and now - last_used >= grace_period:
                try:
                    record = self.store.get(image_id)
                except ImageNotFoundError:
                    continue  # another gc (or image rm) removed it meanwhile
                self.store.remove(record)
                removed.append(f"{record.id} {record.name}")
        return {"images": removed, "files": self.store.gc_files()}

    def verify(self, ref: str) -> dict[str, Any]:
        """Re-hash every blob of an image and its guest rootfs (rebuilding the rootfs if it is damaged).

        Raises:
            DigestMismatchError: a blob is corrupt (it is deleted).
        """
        record = self.store.resolve(ref)
        checked = []
        for digest in (record.id if record.kind == "oci" else None, record.config_digest or None, *record.layers):
            if digest:
                with self.store.open_blob(Digest.parse(digest)) as reader:
                    while reader.read(1 << 20):
                        pass
                checked.append(digest)
        self.store.rootfs_path(record, rehash=True)
        return {"id": record.id, "name": record.name, "blobs": checked, "rootfs": record.rootfs, "ok": True}

    def manifest(self, ref: str) -> dict[str, Any]:
        """The image's own manifest (OCI manifest or appc image manifest)."""
        return export.image_manifest(self.store, self.store.resolve(ref))

    def extract(self, ref: str, dest: Path, *, rootfs_only: bool, progress: Progress = no_progress) -> Path:
        """Unpack an image's root filesystem into a new directory (see ``export.extract``)."""
        return export.extract(self.store, self.store.resolve(ref), dest, rootfs_only=rootfs_only, progress=progress)

    def export(self, ref: str, out: Path, *, overwrite: bool = False) -> Path:
        """Write an image as an archive (see ``export.export``)."""
        return export.export(self.store, self.store.resolve(ref), out, overwrite=overwrite)
