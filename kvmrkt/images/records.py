"""Image records and the types every image module shares: what an image is once stored, where it came from,
the import gate's signature, progress callbacks.

Role: plain data (no I/O but reading an unpacked tree's /etc/passwd and /etc/group). Trust boundary: an
``ImageRecord`` is built by the store from verified content; its user and group tables come from a hostile tree
and are read with bounds, never through a symlink.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kvmrkt.digest import Digest
from kvmrkt.errors import ImageError


class Readable(Protocol):
    """Anything with ``read(size)`` returning bytes (files, HTTP responses, decompressors)."""

    def read(self, size: int = -1, /) -> bytes: ...


Progress = Callable[[str, int, int | None], None]
"""progress(what, done, total): called while copying or unpacking (total None when unknown)."""


def no_progress(_what: str, _done: int, _total: int | None) -> None:
    """A progress callback that shows nothing."""


@dataclass(frozen=True, slots=True)
class Provenance:
    """What the trust policy judges an image as: its transport and identity (the name it is stored under,
    which is also the reference policy scopes match). ``content``: the file holding the signed bytes, for
    detached signatures (appc). ``named`` False: the name is not known yet (it is inside the compressed ACI),
    ``identity`` only labels the image in messages, and the gate refuses what no scope could accept."""

    transport: str
    identity: str
    content: Path | None = None
    named: bool = True


@dataclass(frozen=True, slots=True)
class Staged:
    """Bytes copied into the store's work area, hashed, not yet a blob (see ``Store.staged_blob``)."""

    digest: Digest
    path: Path


Gate = Callable[[Provenance, Digest, dict[str, bytes]], None]
"""Called with the signed digest and its signatures before anything else of the image is read; raises to refuse."""


def UNSAFE_ACCEPT_ANYTHING(_prov: Provenance, _digest: Digest, _files: dict[str, bytes]) -> None:
    """UNSAFE: a gate that accepts every image without looking at it.

    Only for tests, and for a caller that has already judged these exact bytes elsewhere (it must say where, in
    a comment at the call). No import function defaults to it: every caller passes its gate explicitly.
    """


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """An image in the store: identity, how it runs by default, its layers and its guest rootfs."""

    id: str
    name: str
    source: str
    kind: str
    imported: float
    layers: tuple[str, ...]
    rootfs: str
    rootfs_size: int
    verity_root: str = ""
    verity_salt: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    group: str = ""
    ports: tuple[tuple[str, str, int], ...] = ()
    mount_points: tuple[tuple[str, str, bool], ...] = ()
    isolators: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    config_digest: str = ""
    dependencies: tuple[str, ...] = ()
    transport: str = ""
    identity: str = ""
    signed_digest: str = ""
    passwd: tuple[tuple[str, int, int], ...] = ()
    groups: tuple[tuple[str, int, tuple[str, ...]], ...] = ()
    skipped_devices: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as stored and as printed by ``image inspect``/``image list --format json``."""
        return {
            "id": self.id,
            "name": self.name,
            "source": self.source,
            "kind": self.kind,
            "imported": self.imported,
            "config": {
                "entrypoint": list(self.entrypoint),
                "cmd": list(self.cmd),
                "env": list(self.env),
                "workingDir": self.working_dir,
                "user": self.user,
                "group": self.group,
                "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in self.ports],
                "mountPoints": [{"name": n, "path": p, "readOnly": ro} for n, p, ro in self.mount_points],
                "isolators": [{"name": n, "value": v} for n, v in self.isolators],
                "labels": dict(self.labels),
            },
            "configDigest": self.config_digest,
            "layers": list(self.layers),
            "dependencies": list(self.dependencies),
            "trust": {"transport": self.transport, "identity": self.identity, "signedDigest": self.signed_digest},
            "rootfs": {"digest": self.rootfs, "size": self.rootfs_size, "format": "erofs",
                       "verity": {"rootHash": self.verity_root, "salt": self.verity_salt, "hashAlg": "sha256",
                                  "blockSize": 4096}},
            "passwd": [list(p) for p in self.passwd],
            "groups": [[g[0], g[1], list(g[2])] for g in self.groups],
            "skippedDevices": list(self.skipped_devices),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageRecord:
        """Parse a stored record."""
        c = d["config"]
        return cls(
            id=d["id"], name=d["name"], source=d["source"], kind=d.get("kind", "oci"), imported=float(d["imported"]),
            layers=tuple(d["layers"]), rootfs=d["rootfs"]["digest"], rootfs_size=int(d["rootfs"]["size"]),
            verity_root=d["rootfs"].get("verity", {}).get("rootHash", ""),
            verity_salt=d["rootfs"].get("verity", {}).get("salt", ""),
            entrypoint=tuple(c["entrypoint"]), cmd=tuple(c["cmd"]), env=tuple(c["env"]),
            working_dir=c["workingDir"], user=c["user"], group=c.get("group", ""),
            ports=tuple((p["name"], p["protocol"], int(p["port"])) for p in c.get("ports", [])),
            mount_points=tuple((m["name"], m["path"], bool(m["readOnly"])) for m in c.get("mountPoints", [])),
            isolators=tuple((i["name"], i["value"]) for i in c.get("isolators", [])),
            labels=tuple(sorted(c.get("labels", {}).items())), config_digest=d.get("configDigest", ""),
            dependencies=tuple(d.get("dependencies", [])),
            transport=d.get("trust", {}).get("transport", ""), identity=d.get("trust", {}).get("identity", ""),
            signed_digest=d.get("trust", {}).get("signedDigest", ""),
            passwd=tuple((p[0], int(p[1]), int(p[2])) for p in d.get("passwd", [])),
            groups=tuple((g[0], int(g[1]), tuple(g[2])) for g in d.get("groups", [])),
            skipped_devices=tuple(d.get("skippedDevices", [])),
        )  # fmt: skip

    def resolve_user(self, user: str, group: str | None) -> tuple[int, int, tuple[int, ...]]:
        """Numeric uid, gid and supplementary gids for ``user``/``group`` (names are looked up in the image's
        /etc/passwd and /etc/group, as the OCI image spec says).

        Raises:
            ImageError: a name the image does not define.
        """
        uid: int | None = None
        gid: int | None = None
        uname: str | None = None
        if user.isdigit():
            uid = int(user)
            for name, puid, pgid in self.passwd:
                if puid == uid:
                    uname, gid = name, pgid
                    break
        else:
            for name, puid, pgid in self.passwd:
                if name == user:
                    uname, uid, gid = name, puid, pgid
                    break
            if uid is None:
                raise ImageError(f"user {user!r} is not defined in the image's /etc/passwd ({self.name})")
        if group:
            if group.isdigit():
                gid = int(group)
            else:
                match = [g[1] for g in self.groups if g[0] == group]
                if not match:
                    raise ImageError(f"group {group!r} is not defined in the image's /etc/group ({self.name})")
                gid = match[0]
        supplementary = tuple(sorted({g[1] for g in self.groups if uname and uname in g[2]} - {gid or 0}))
        return uid, gid or 0, supplementary


def normalise_name(name: str) -> str:
    """``name`` means ``name:latest``; a name pinned by digest is kept as it is."""
    if "@" in name or ":" in name.rsplit("/", 1)[-1]:
        return name
    return f"{name}:latest"


def passwd_tables(root: Path) -> tuple[tuple[tuple[str, int, int], ...], tuple[tuple[str, int, tuple[str, ...]], ...]]:
    """The (name, uid, gid) entries of an unpacked tree's /etc/passwd and the (name, gid, members) of its
    /etc/group, for ``ImageRecord.resolve_user`` (malformed lines are skipped)."""

    def lines(rel: str) -> list[list[str]]:
        path = root / rel
        # The unpacked tree is hostile: never follow a symlink planted by a layer.
        if any(p.is_symlink() for p in (path, path.parent)) or not path.is_file() or path.stat().st_size > 1 << 20:
            return []
        return [ln.split(":") for ln in path.read_text("utf-8", "replace").splitlines() if ln and ln[0] != "#"]

    passwd = tuple(
        (f[0], int(f[2]), int(f[3])) for f in lines("etc/passwd") if len(f) >= 4 and f[2].isdigit() and f[3].isdigit()
    )
    groups = tuple(
        (f[0], int(f[2]), tuple(m for m in f[3].split(",") if m))
        for f in lines("etc/group")
        if len(f) >= 4 and f[2].isdigit()
    )
    return passwd, groups
