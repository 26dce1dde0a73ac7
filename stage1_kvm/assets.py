"""Guest assets (the stage1 image): the guest kernel and the base initramfs holding kvmrkt's guest init.

Role: build them once per machine and record their digests (``assets.json``), find them for a boot, and add a
pod's config to the base initramfs as a second cpio archive. With them, the host-side ``kvmrkt-vmm-guard``
(``vmm_guard.c``, static), which every pod's QEMU is started through. The default kernel (``minimal``) is built from
Debian's ``linux-source-6.1`` with ``kernel.config`` on top of ``tinyconfig`` and booted as an uncompressed
``vmlinux`` (PVH). The alternative (``debian-cloud``) is Debian's packaged cloud kernel, unpacked from its .deb
into the asset directory (never installed into the host's /boot), with the modules the guest needs put into
its initramfs; it needs ACPI to find virtio-mmio devices and has no 9p, so host volumes need ``minimal``.

Trust boundary: sources come from Debian packages installed as root; built files live in a root-only
directory, and their recorded digests are what later checks and measurements compare against.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmrkt.config import Stage1Config
from kvmrkt.digest import Digest
from kvmrkt.errors import AssetError
from kvmrkt.host import proc as _proc
from kvmrkt.host.files import write_json
from stage1_kvm.digestcache import file_digest

HERE = Path(__file__).resolve().parent
KERNEL_CONFIG = HERE / "kernel.config"
GUEST_DIR = HERE / "guest"  # the guest init: every *.c is compiled into it, with its *.h
GUARD_SOURCE = HERE / "vmm_guard.c"
GUARD_NAME = "kvmrkt-vmm-guard"
KERNEL_SOURCE_GLOB = "linux-source-6.1.tar.xz"
SOURCE_DIR = Path("/usr/src")
ASSETS_FILE = "assets.json"

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Assets:
    """A built, recorded set of guest assets."""

    kind: str
    kernel: Path
    initrd: Path
    kernel_digest: Digest
    initrd_digest: Digest
    key: str
    guard: Path
    guard_digest: Digest
    acpi: bool = False
    features: tuple[str, ...] = ()
    verified_in: Path | None = None  # where digests of unchanged files are remembered (stage1_kvm.digestcache)

    def verify(self) -> None:
        """Check the kernel, the initramfs and the VMM guard against the recorded digests: re-hashed, or, for a
        root-only file whose identity (inode, size, mtime, ctime) is the one hashed before, remembered.

        Raises:
            AssetError: a file changed since it was built.
        """
        for path, digest in ((self.kernel, self.kernel_digest), (self.initrd, self.initrd_digest),
                             (self.guard, self.guard_digest)):
            try:
                actual = (file_digest(path, digest.algorithm, self.verified_in) if self.verified_in is not None
                          else Digest.of_file(path, digest.algorithm))
            except OSError as exc:
                raise AssetError(f"guest asset {path} cannot be read: {exc.strerror}",
                                 hint=f"rebuild it with `kvmrkt stage1 build --kernel={self.kind}`") from None
            if not actual.matches(digest):
                raise AssetError(
                    f"guest asset {path} does not match its recorded digest {digest}",
                    hint=f"rebuild it with `kvmrkt stage1 build --kernel={self.kind}`",
                )


def load_assets(cfg: Stage1Config, kind: str | None = None) -> Assets:
    """Find the recorded assets for a kernel kind.

    Raises:
        AssetError: not built yet, or the record points to missing files.
    """
    kind = kind or cfg.kernel
    record = cfg.assets_dir / kind / ASSETS_FILE
    hint = f"build them with `kvmrkt stage1 build --kernel={kind}` (as root; `make setup` does it)"
    try:
        doc = json.loads(record.read_text())
        assets = Assets(
            kind=kind,
            kernel=Path(doc["kernel"]["path"]),
            initrd=Path(doc["initrd"]["path"]),
            kernel_digest=Digest.parse(doc["kernel"]["digest"]),
            initrd_digest=Digest.parse(doc["initrd"]["digest"]),
            key=doc["key"],
            guard=Path(doc["guard"]["path"]),
            guard_digest=Digest.parse(doc["guard"]["digest"]),
            acpi=bool(doc.get("machine", {}).get("acpi", False)),
            features=tuple(doc.get("features", ())),
            verified_in=cfg.assets_dir,
        )
    except FileNotFoundError as exc:
        raise AssetError(f"no guest assets for kernel {kind!r} in {cfg.assets_dir}", hint=hint) from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AssetError(f"unreadable asset record {record}: {exc}", hint=hint) from exc
    for path in (assets.kernel, assets.initrd, assets.guard):
        if not path.is_file():
            raise AssetError(f"guest asset {path} is missing", hint=hint)
    return assets


# --- initramfs ------------------------------------------------------------------------------------------


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1) -> bytes:
    namez = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + namez
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def cpio_archive(files: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive (what the kernel unpacks as initramfs) of (name, mode, data); owner root,
    mtime 0, so the same input gives the same bytes."""
    body = b"".join(_cpio_entry(n, m, d, i + 1) for i, (n, m, d) in enumerate(files))
    return body + _cpio_entry("TRAILER!!!", 0, b"", 0)


def pod_initrd(base: Path, pod_config: bytes, out: Path) -> None:
    """Write the base initramfs followed by a second archive holding ``/kvmrkt/pod.cfg``."""
    initrd_with(base, "pod.cfg", pod_config, out)


def initrd_with(base: Path, name: str, data: bytes, out: Path) -> None:
    """Write the base initramfs followed by a second archive holding ``/kvmrkt/<name>`` (0600)."""
    extra = cpio_archive([("kvmrkt", stat.S_IFDIR | 0o755, b""), (f"kvmrkt/{name}", stat.S_IFREG | 0o600, data)])
    with base.open("rb") as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst)
        dst.write(b"\0" * (-dst.tell() % 4))
        dst.write(extra)


def build_guard(assets_dir: Path, progress: Progress) -> Path:
    """Compile ``kvmrkt-vmm-guard`` (static, mode 0755: the pods' unprivileged uids execute it) unless the one
    there was built from the same source."""
    key = hashlib.sha256(b"kvmrkt-vmm-guard-v1\0" + GUARD_SOURCE.read_bytes()).hexdigest()[:16]
    out = assets_dir / f"{GUARD_NAME}-{key}"
    if out.is_file():
        return out
    progress("compiling the VMM guard (static)")
    gcc = _proc.which("gcc", hint="apt-get install gcc libc6-dev")
    tmp = out.with_name(f".{out.name}.tmp")
    _proc.run([gcc, "-static", "-O2", "-Wall", "-o", tmp, GUARD_SOURCE], what="compiling the VMM guard")
    _proc.run(["strip", tmp], what="strip")
    os.chmod(tmp, 0o755)  # noqa: S103 (executed by the pods' uids; nothing in it is secret)
    os.rename(tmp, out)
    records = "".join(r.read_text() for r in assets_dir.glob(f"*/{ASSETS_FILE}"))
    for old in assets_dir.glob(f"{GUARD_NAME}-*"):
        if old != out and old.name not in records:  # no recorded asset set points at it any more
            old.unlink()
    return out


def guest_init_sources() -> list[Path]:
    """The guest init's source files (``guest/*.c`` and ``guest/*.h``), sorted by name."""
    return sorted([*GUEST_DIR.glob("*.c"), *GUEST_DIR.glob("*.h")], key=lambda p: p.name)


def guest_init_key() -> bytes:
    """What the initramfs cache is keyed on: every guest init source file, its name and its bytes."""
    h = hashlib.sha256(b"kvmrkt-initrd-v2\0")
    for path in guest_init_sources():
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode() + data)
    return h.digest()


def compile_guest_init(binary: Path) -> None:
    """Compile the guest init (static, every ``guest/*.c`` in name order) to ``binary``, unstripped.

    Raises:
        CommandError: gcc failed (a warning is not an error; the sources compile without any under -Wall -Wextra).
    """
    gcc = _proc.which("gcc", hint="apt-get install gcc libc6-dev")
    sources = [p for p in guest_init_sources() if p.suffix == ".c"]
    _proc.run(
        [gcc, "-static", "-O2", "-Wall", "-Wextra", "-Wno-format-truncation", "-o", binary, *sources],
        what="compiling the guest init",
    )


def _build_initrd(workdir: Path, progress: Progress, modules: list[tuple[str, bytes]] | None = None) -> bytes:
    progress("compiling the guest init (static)")
    binary = workdir / "init"
    compile_guest_init(binary)
    _proc.run(["strip", binary], what="strip")
    d = stat.S_IFDIR | 0o755
    files = [("dev", d, b""), ("proc", d, b""), ("sys", d, b""), ("kvmrkt", d, b""),
             ("init", stat.S_IFREG | 0o755, binary.read_bytes())]  # fmt: skip
    if modules:
        files += [("lib", d, b""), ("lib/modules", d, b"")]
        files += [(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, data) for name, data in modules]
        files.append(("kvmrkt/modules", stat.S_IFREG | 0o644, "".join(f"{n}\n" for n, _ in modules).encode()))
    return cpio_archive(files)


# --- kernel -----------------------------------------------------------------------------------------------


def _config_args(text: str) -> list[str]:
    args: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            args += ["-d", line[1:]]
        elif "=" in line:
            name, value = line.split("=", 1)
            args += ["--set-val", name, value]
        else:
            args += ["-e", line]
    return args


def _wanted(text: str) -> list[str]:
    return [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(("#", "-")) and "=" not in ln
    ]


def _source_tarball() -> Path:
    path = SOURCE_DIR / KERNEL_SOURCE_GLOB
    if not path.is_file():
        raise AssetError(f"kernel source {path} not found", hint="apt-get install linux-source-6.1")
    return path


def _source_version() -> str:
    proc = _proc.run(["dpkg-query", "-W", "-f=${Version}", "linux-source-6.1"], what="dpkg-query")
    return proc.stdout.decode().strip()


def _build_minimal_kernel(workdir: Path, progress: Progress) -> Path:
    tarball = _source_tarball()
    progress(f"unpacking {tarball}")
    _proc.run(["tar", "-xf", tarball, "-C", workdir], timeout=900, what="unpacking the kernel source")
    src = next(p for p in workdir.iterdir() if p.is_dir() and p.name.startswith("linux-source"))
    text = KERNEL_CONFIG.read_text()
    make = ["make", "-C", str(src), "ARCH=x86_64"]
    progress("configuring (tinyconfig + stage1_kvm/kernel.config)")
    _proc.run([*make, "tinyconfig"], what="make tinyconfig")
    _proc.run([src / "scripts" / "config", "--file", src / ".config", *_config_args(text)], what="scripts/config")
    _proc.run([*make, "olddefconfig"], what="make olddefconfig")
    config = (src / ".config").read_text()
    missing = [o for o in _wanted(text) if f"CONFIG_{o}=y\n" not in config]
    if missing:
        raise AssetError(
            "kernel options not available in this source: " + ", ".join(missing),
            hint=f"edit {KERNEL_CONFIG}",
        )
    jobs = str(os.cpu_count() or 1)
    progress(f"compiling vmlinux with {jobs} jobs (a few minutes, once per machine)")
    _proc.run([*make, f"-j{jobs}", "vmlinux"], timeout=7200, what="compiling the guest kernel")
    return src / "vmlinux"


def _kernel_key() -> str:
    h = hashlib.sha256()
    h.update(b"kvmrkt-minimal-kernel-v1\0")
    h.update(_source_version().encode() + b"\0")
    h.update(KERNEL_CONFIG.read_bytes())
    return h.hexdigest()[:16]


# --- Debian's cloud kernel ---------------------------------------------------------------------------------

CLOUD_META_PACKAGE = "linux-image-cloud-amd64"
CLOUD_MODULES = ("virtio_mmio", "virtio_console", "virtio_blk", "virtio_net", "erofs", "overlay", "dm_verity")
_DEPENDS = re.compile(rb"(?:^|\0)depends=([^\0]*)\0")


def _cloud_package() -> tuple[str, str]:
    """The versioned kernel package behind the cloud meta package, and its candidate version."""
    deps = _proc.run(["apt-cache", "depends", CLOUD_META_PACKAGE], what="apt-cache depends").stdout.decode()
    match = re.search(r"Depends: (linux-image-\S+)", deps)
    if not match:
        raise AssetError(f"cannot find the kernel package behind {CLOUD_META_PACKAGE}", hint="run apt-get update")
    pkg = match.group(1)
    show = _proc.run(["apt-cache", "show", "--no-all-versions", pkg], what="apt-cache show").stdout.decode()
    version = re.search(r"^Version: (\S+)", show, re.M)
    return pkg, version.group(1) if version else "unknown"


def module_load_order(available: dict[str, bytes], wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """Modules and their dependencies (read from each module's ``depends=`` modinfo), dependencies first.

    Raises:
        AssetError: a wanted module or a dependency is not in the package.
    """
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name not in available:
            raise AssetError(f"kernel module {name} (needed by {' <- '.join(chain) or 'the guest'}) is not packaged")
        seen.add(name)
        match = _DEPENDS.search(available[name])
        for dep in (match.group(1).decode().split(",") if match else []):
            if dep:
                visit(dep.replace("-", "_"), (name, *chain))
        order.append((name, available[name]))

    for name in wanted:
        visit(name, ())
    return order


def _build_cloud_kernel(work: Path, pkg: str, progress: Progress) -> tuple[Path, list[tuple[str, bytes]]]:
    progress(f"downloading {pkg} (unpacked into the asset directory, not installed)")
    _proc.run(["apt-get", "download", pkg], cwd=work, timeout=1800, what="apt-get download")
    deb = next(work.glob("*.deb"))
    tree = work / "deb"
    _proc.run(["dpkg-deb", "-x", deb, tree], what="dpkg-deb -x")
    kernel = next((tree / "boot").glob("vmlinuz-*"))
    available = {ko.stem.replace("-", "_"): ko.read_bytes() for ko in (tree / "lib" / "modules").rglob("*.ko")}
    return kernel, module_load_order(available, CLOUD_MODULES)


def build_assets(cfg: Stage1Config, kind: str, *, force: bool = False, progress: Progress = lambda _m: None) -> Assets:
    """Build (or reuse from cache) the guest assets of a kernel kind and record their digests.

    The kernel is cached by a key over the source package version and ``kernel.config``; the initramfs by a
    key over the guest init sources. ``force`` rebuilds both.

    Raises:
        AssetError: a build step failed or an unknown kind.
        CommandError: a build program failed (its stderr tail is included).
    """
    if kind not in ("minimal", "debian-cloud"):
        raise AssetError(f"unknown guest kernel kind {kind!r}", hint="use --kernel=minimal or --kernel=debian-cloud")
    outdir = cfg.assets_dir / kind
    outdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(cfg.assets_dir, 0o700)
    init_key = hashlib.sha256(guest_init_key())
    if kind == "minimal":
        kkey = _kernel_key()
        source: dict[str, str] = {"package": "linux-source-6.1", "config": str(Digest.of_file(KERNEL_CONFIG))}
    else:
        pkg, version = _cloud_package()
        kkey = hashlib.sha256(f"{pkg}\0{version}\0{','.join(CLOUD_MODULES)}".encode()).hexdigest()[:16]
        init_key.update(kkey.encode())
        source = {"package": pkg, "version": version}
    ikey = init_key.hexdigest()[:16]
    kernel = outdir / f"{'vmlinux' if kind == 'minimal' else 'vmlinuz'}-{kkey}"
    initrd = outdir / f"initrd-{ikey}.img"
    with tempfile.TemporaryDirectory(dir=cfg.assets_dir, prefix=".build-") as tmp:
        work = Path(tmp)
        modules: list[tuple[str, bytes]] = []
        if kind == "debian-cloud" and (force or not kernel.is_file() or not initrd.is_file()):
            built_kernel, modules = _build_cloud_kernel(work, source["package"], progress)
            os.rename(built_kernel, kernel)
        if force or not initrd.is_file():
            (work / "initrd.img").write_bytes(_build_initrd(work, progress, modules))
            os.rename(work / "initrd.img", initrd)
        else:
            progress(f"initramfs {initrd.name} is up to date")
        if kind == "minimal" and (force or not kernel.is_file()):
            started = time.monotonic()
            os.rename(_build_minimal_kernel(work, progress), kernel)
            progress(f"kernel built in {time.monotonic() - started:.0f}s")
        elif kind == "minimal":
            progress(f"kernel {kernel.name} is up to date")
    guard = build_guard(cfg.assets_dir, progress)
    for path in (kernel, initrd):  # read by each pod's VMM uid through its jail (the directory stays root-only)
        os.chmod(path, 0o644)
    assets = Assets(
        kind, kernel, initrd, Digest.of_file(kernel), Digest.of_file(initrd), f"{kkey}-{ikey}", guard,
        Digest.of_file(guard), acpi=kind != "minimal", features=("9p",) if kind == "minimal" else (),
    )
    write_json(
        outdir / ASSETS_FILE,
        {
            "kind": kind,
            "key": assets.key,
            "kernel": {"path": str(kernel), "digest": str(assets.kernel_digest),
                       "format": "vmlinux (PVH)" if kind == "minimal" else "bzImage"},
            "initrd": {"path": str(initrd), "digest": str(assets.initrd_digest)},
            "guard": {"path": str(guard), "digest": str(assets.guard_digest)},
            "source": source,
            "machine": {"acpi": assets.acpi},
            "features": list(assets.features),
        },
    )
    for old in outdir.iterdir():
        if old.name.startswith(("vmlinux-", "initrd-")) and old not in (kernel, initrd):
            old.unlink()
    return assets
