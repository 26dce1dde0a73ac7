"""VM templates: a pod VM restored from a snapshot of a VM that booted kvmrkt's init up to its wait for a pod.

Role: a template is kept per *shape*, everything about a pod's VM that its guest state depends on: QEMU (binary),
accelerator, memory, vCPUs, kernel, base initramfs, kernel command line, and the device layout (disk ids and
serials, 9p shares and tags, virtio-serial ports, NIC count). ``shape_of`` derives it from a pod's ``VMSpec``; a
pod whose shape has a template is started by restoring it (QEMU ``-incoming defer``, the state passed as a
descriptor, ``cont`` only once its digest matched), then handed its pod over the ctl port (``handoff_frame``:
its config, 64 bytes from the host's RNG that the guest mixes in and reseeds its CRNG with before anything
runs, the wall clock). The guest half is ``guest/template.c``: the template's init detaches virtio-blk and
virtio-net before the snapshot and reattaches them after the handoff, so a clone probes its own disks (capacity,
serial) and MAC from its own command line. Paths, sockets, disk files and tap devices are the clone's own: the
migration stream holds device state, never a backend.

``build`` boots the template VM (placeholder disks, an empty share, NICs plugged into nothing), waits for the
guest's ``TEMPLATE`` status, stops it and migrates it to a file. A cold launch of a shape without a template
records the shape as wanted (``want``), so ``kvmrkt stage1 template build`` builds what this host runs.

Trust boundary: templates are kvmrkt's own. They live under the root-only assets directory (``templates/<key>``,
0700, files 0600), are refused unless root owns them with no group/other access, and their state is hashed on
every use while QEMU reads it (the VM is resumed only when the digest matches the one recorded at build time, so
an altered template never runs). The template VM runs only kvmrkt's init on kvmrkt's placeholder inputs, nothing
a pod supplies, so it is built outside the pod jail; every clone runs jailed like any pod. The clone's pod config
is the bytes a cold boot would put in its initramfs (and is measured the same way); the template's digest is in
the stage1 event, so a verifier can tell a clone from a booted pod.

Caveat that comes with cloning (as Firecracker's snapshot documentation says): the guest kernel's own secrets
that are fixed at boot (its stack canary, its hash seeds, the address-space layout of the guest init) are the
same in every clone of a template; the apps' processes are all started after the reseed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmrkt.config import Stage1Config
from kvmrkt.digest import Digest
from kvmrkt.errors import TemplateError
from kvmrkt.host import proc as _proc
from kvmrkt.stage1 import Nic
from stage1_kvm import agent, monitor
from stage1_kvm.assets import Assets, initrd_with
from stage1_kvm.qemu_argv import build_argv
from stage1_kvm.vmspec import GUEST_STATUS, QMP_SOCKET, Disk, Port, Share, VMSpec

FORMAT = 1
TEMPLATES = "templates"
WANTED = "wanted"
META = "template.json"
STATE = "state"
INITRD = "initrd.img"
SEED_BYTES = 64

Progress = Callable[[str], None]


def templates_dir(cfg: Stage1Config) -> Path:
    return cfg.templates_dir or cfg.assets_dir / TEMPLATES


def _qemu_identity(qemu: str) -> list[Any]:
    st = os.stat(qemu)
    return [os.path.realpath(qemu), st.st_size, st.st_mtime_ns]


def shape_of(spec: VMSpec, *, assets: Assets, qemu: str) -> dict[str, Any] | None:
    """The pod VM's shape (JSON-able), or None when no template can stand for it (user-mode networking: its
    NAT state would be the template's)."""
    if spec.user_forwards or any(nic.tap is None for nic in spec.nics):
        return None
    return {
        "format": FORMAT,
        "qemu": _qemu_identity(qemu),
        "accel": spec.accel,
        "memory_mib": spec.memory_mib,
        "vcpus": spec.vcpus,
        "kernel": str(assets.kernel_digest),
        "initrd": str(assets.initrd_digest),
        "cmdline": spec.cmdline,
        "acpi": spec.acpi,
        "sandbox": spec.sandbox,
        "disks": [[d.id, d.serial] for d in spec.disks],
        "shares": [[s.id, s.tag, s.read_only, s.live] for s in spec.shares],
        "ports": [[p.name, p.kind, p.path] for p in spec.ports],
        "nics": [[n.ifname, n.mtu] for n in spec.nics],
    }


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")  # ids, serials, tags, port names and socket file names
_SHAPE_KEYS = {"format", "qemu", "accel", "memory_mib", "vcpus", "kernel", "initrd", "cmdline", "acpi", "sandbox",
               "disks", "shares", "ports", "nics"}


def valid_shape(shape: Any) -> bool:
    """Whether a recorded shape has exactly the form ``shape_of`` writes: its strings become QEMU options and
    file names in the build directory, so nothing but plain names and bounded numbers is accepted."""

    def name(v: Any) -> bool:
        return isinstance(v, str) and bool(_NAME.fullmatch(v))

    def number(v: Any, top: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= top

    try:
        return (isinstance(shape, dict) and set(shape) == _SHAPE_KEYS and shape["format"] == FORMAT
                and shape["accel"] in ("tcg", "kvm") and number(shape["memory_mib"], 1 << 22)
                and number(shape["vcpus"], 512) and isinstance(shape["acpi"], bool)
                and isinstance(shape["sandbox"], bool) and isinstance(shape["kernel"], str)
                and isinstance(shape["initrd"], str) and isinstance(shape["cmdline"], str)
                and shape["cmdline"].isprintable() and len(shape["cmdline"]) < 4096
                and isinstance(shape["qemu"], list) and len(shape["qemu"]) == 3
                and all(name(i) and name(serial) for i, serial in shape["disks"])
                and all(name(i) and name(tag) and isinstance(ro, bool) and isinstance(live, bool)
                        for i, tag, ro, live in shape["shares"])
                and all(name(n) and kind in ("file", "socket") and name(path) for n, kind, path in shape["ports"])
                and all(name(ifname) and number(mtu, 65535) for ifname, mtu in shape["nics"]))
    except (TypeError, ValueError):  # a list of the wrong length, or not a list
        return False


def current(shape: dict[str, Any], assets: Assets, qemu: str) -> bool:
    """Whether a recorded shape is for the guest assets and the QEMU installed now."""
    return (shape.get("format") == FORMAT and shape.get("kernel") == str(assets.kernel_digest)
            and shape.get("initrd") == str(assets.initrd_digest) and shape.get("qemu") == _qemu_identity(qemu))


def shape_key(shape: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Template:
    """A built template: its key (of its shape), directory, state digest and size, template initramfs digest."""

    key: str
    path: Path
    shape: dict[str, Any]
    digest: str
    size: int
    initrd_digest: str
    created: float

    @property
    def state(self) -> Path:
        return self.path / STATE

    def describe(self) -> dict[str, Any]:
        s = self.shape
        return {"key": self.key, "digest": self.digest, "size": self.size, "initrd": self.initrd_digest,
                "created": self.created, "memory_mib": s["memory_mib"], "vcpus": s["vcpus"], "accel": s["accel"],
                "disks": len(s["disks"]), "nics": len(s["nics"]), "ports": len(s["ports"]),
                "kernel": s["kernel"], "path": str(self.path)}


def _root_only(path: Path, *, directory: bool) -> bool:
    """Root owns it, nobody else may write or read it, and it is what it claims to be (no symlink)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    kind = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    return kind and st.st_uid == 0 and not st.st_mode & 0o077


def _load(path: Path) -> Template:
    """Read a template's record.

    Raises:
        TemplateError: it is not kvmrkt's own (ownership, modes) or its record is unreadable.
    """
    meta_path, state = path / META, path / STATE
    if not (_root_only(path, directory=True) and _root_only(meta_path, directory=False)
            and _root_only(state, directory=False)):
        raise TemplateError(f"template {path} is not root's own (owner root, no access for group or others)",
                            hint=f"remove it: kvmrkt stage1 template rm {path.name}")
    try:
        meta = json.loads(meta_path.read_text())
        return Template(key=path.name, path=path, shape=meta["shape"], digest=meta["state"]["digest"],
                        size=int(meta["state"]["size"]), initrd_digest=meta["initrd"], created=meta["created"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TemplateError(f"template {path}: unreadable record: {exc}",
                            hint=f"remove it: kvmrkt stage1 template rm {path.name}") from exc


def find(cfg: Stage1Config, shape: dict[str, Any]) -> Template | None:
    """The template for this shape, if one was built (None: boot cold).

    Raises:
        TemplateError: one is there but is not kvmrkt's own, or was built for another shape.
    """
    path = templates_dir(cfg) / shape_key(shape)
    if not path.exists():
        return None
    tmpl = _load(path)
    if tmpl.shape != shape:
        raise TemplateError(f"template {path} was built for another shape than its name says",
                            hint=f"remove it: kvmrkt stage1 template rm {path.name}")
    return tmpl


def want(cfg: Stage1Config, shape: dict[str, Any]) -> None:
    """Record that a pod of this shape booted cold, for ``build_wanted`` (best effort: never fails a launch)."""
    with contextlib.suppress(OSError):
        wanted = templates_dir(cfg) / WANTED
        wanted.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = wanted / f"{shape_key(shape)}.json"
        if not path.exists():
            tmp = wanted / f".{path.name}.{os.getpid()}"
            tmp.write_text(json.dumps(shape, sort_keys=True))
            os.chmod(tmp, 0o600)
            tmp.replace(path)


def wanted(cfg: Stage1Config) -> list[dict[str, Any]]:
    """The recorded shapes: only root's own records (in a root-only directory) of the form ``shape_of`` writes;
    anything else (planted, edited, torn) is ignored."""
    directory = templates_dir(cfg) / WANTED
    if not _root_only(directory, directory=True):
        return []
    out = []
    for path in sorted(directory.glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            if _root_only(path, directory=False):
                shape = json.loads(path.read_text())
                if valid_shape(shape):
                    out.append(shape)
    return out


def listing(cfg: Stage1Config) -> list[Template]:
    """Every template built here (ones that are not root's own are listed by ``TemplateError``)."""
    root = templates_dir(cfg)
    return [_load(p) for p in sorted(root.iterdir()) if p.is_dir() and p.name != WANTED] if root.is_dir() else []


def remove_all(cfg: Stage1Config) -> None:
    """Remove every template and every recorded shape."""
    root = templates_dir(cfg)
    for path in root.glob("*") if root.is_dir() else ():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


def remove(cfg: Stage1Config, key: str) -> bool:
    """Remove one template (and its wanted record); False if there was none."""
    if not key.isalnum():
        raise TemplateError(f"bad template key {key[:40]!r}", hint="kvmrkt stage1 template list shows them")
    path = templates_dir(cfg) / key
    (templates_dir(cfg) / WANTED / f"{key}.json").unlink(missing_ok=True)
    if not path.is_dir() or path.is_symlink():
        return False
    shutil.rmtree(path)
    return True


# --- restoring a clone ---------------------------------------------------------------------------------------


def restore(pod_dir: Path, tmpl: Template, *, timeout: float, before_cont: Callable[[], None],
            alive: Callable[[], bool] | None = None) -> None:
    """Load the template into the QEMU just started with ``-incoming defer`` in ``pod_dir`` and resume it, once
    its state hashed to the recorded digest (hashed while QEMU reads it; QEMU gets a read-only descriptor) and
    ``before_cont`` returned (the measured launch's gate). ``alive`` tells whether that QEMU still runs.

    Raises:
        TemplateError: the state is altered (the VM was never resumed), or QEMU failed to load it.
        Stage1Error: QEMU's monitor failed; whatever ``before_cont`` raised (the VM was not resumed).
    """
    deadline = time.monotonic() + timeout
    fd = os.open(tmpl.state, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        digest: list[str] = []

        def hash_state() -> None:
            with os.fdopen(os.dup(fd), "rb") as fh:
                digest.append(str(Digest.of_stream(fh)))

        hasher = threading.Thread(target=hash_state, daemon=True)
        with monitor.connect(pod_dir, deadline, alive) as q:
            incoming = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)  # its own offset
            try:
                q.cmd("getfd", {"fdname": "template"}, fd=incoming)
            finally:
                os.close(incoming)
            hasher.start()
            q.cmd("migrate-incoming", {"uri": "fd:template"})
            q.until(lambda: q.query("query-status").get("status") not in ("inmigrate", "prelaunch", "restore-vm"),
                    deadline, "loading the template")
            hasher.join(max(0.0, deadline - time.monotonic()))
            status = q.query("query-status").get("status")
            if status != "paused":
                migration = q.query("query-migrate")
                why = str(migration.get("error-desc", migration.get("status", "?")))[:500]
                raise TemplateError(f"QEMU could not load template {tmpl.key} ({agent.printable(str(status)[:40])}): "
                                    f"{agent.printable(why)}")
            if not digest or digest[0] != tmpl.digest:
                raise TemplateError(
                    f"template {tmpl.key} is altered: its state hashes to {digest[0] if digest else '(unread)'}, "
                    f"{tmpl.digest} was recorded when it was built; the VM was not resumed",
                    hint=f"remove it and build it again: kvmrkt stage1 template rm {tmpl.key}; "
                         "kvmrkt stage1 template build")
            before_cont()
            q.cmd("cont")
    finally:
        os.close(fd)


def handoff_frame(config: bytes) -> bytes:
    """The first bytes a clone reads on its ctl port (``guest/template.c``): its pod config, a fresh seed, the
    wall clock."""
    now = time.time_ns()
    seed = secrets.token_bytes(SEED_BYTES).hex()
    return f"POD {len(config)} {seed} {now // 10**9} {now % 10**9}\n".encode() + config


# --- building a template -------------------------------------------------------------------------------------


def template_spec(shape: dict[str, Any], *, kernel: Path, initrd: Path, work: Path) -> VMSpec:
    """The template VM for ``shape``: its devices, with placeholder backends in ``work``."""
    placeholder = work / "placeholder.img"
    placeholder.write_bytes(b"\0" * 4096)
    empty = work / "share"
    empty.mkdir(mode=0o700, exist_ok=True)
    return VMSpec(
        name=f"kvmrkt-template-{shape_key(shape)}", accel=shape["accel"], memory_mib=shape["memory_mib"],
        vcpus=shape["vcpus"], kernel=kernel, initrd=str(initrd), cmdline=shape["cmdline"],
        disks=tuple(Disk(i, placeholder, serial) for i, serial in shape["disks"]),
        shares=tuple(Share(i, empty, tag, ro, live) for i, tag, ro, live in shape["shares"]),
        ports=tuple(Port(name, kind, path) for name, kind, path in shape["ports"]),
        acpi=shape["acpi"], sandbox=shape["sandbox"],
        nics=tuple(Nic(ifname, f"52:54:00:00:00:{i + 1:02x}", mtu, tap="") for i, (ifname, mtu)
                   in enumerate(shape["nics"])),
        netns=None,
    )


def build(cfg: Stage1Config, assets: Assets, shape: dict[str, Any], *, qemu: str,
          progress: Progress = lambda _m: None) -> Template:
    """Boot the template VM for ``shape``, snapshot it at the guest's wait for a pod, record it.

    Raises:
        TemplateError: the shape is for other assets or another QEMU, or the VM failed to get there.
    """
    if not valid_shape(shape):
        raise TemplateError("not a shape kvmrkt records (a plain name or a bounded number was expected where "
                            "something else is)", hint="kvmrkt stage1 template rm --all, then run the pods again")
    if not current(shape, assets, qemu):
        raise TemplateError("this shape was recorded for another kernel, initramfs or QEMU than the current ones",
                            hint="run a pod of that shape once (it is recorded again), then build")
    from stage1_kvm.qemu import runtime_fds

    key = shape_key(shape)
    root = templates_dir(cfg)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    work = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
    proc: subprocess.Popen[bytes] | None = None
    try:
        progress(f"booting template {key} ({shape['memory_mib']} MiB, {shape['vcpus']} vCPU)")
        initrd = work / INITRD
        initrd_with(assets.initrd, "template", f"{FORMAT}\n".encode(), initrd)
        spec = template_spec(shape, kernel=assets.kernel, initrd=initrd, work=work)
        deadline = time.monotonic() + cfg.boot_timeout
        with runtime_fds(work, spec) as fds:
            argv = build_argv(spec, fds=fds, qemu=qemu, nic_backends=False)
            with (work / "qemu.log").open("wb") as log:
                proc = subprocess.Popen(argv, cwd=work, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                        pass_fds=list(fds.values()))
        status = work / GUEST_STATUS
        while b"TEMPLATE" not in status.read_bytes():
            if proc.poll() is not None or b"FATAL" in status.read_bytes() or time.monotonic() > deadline:
                raise TemplateError(f"the template VM did not reach its wait for a pod: "
                                    f"{status.read_bytes()[-300:].decode(errors='replace').strip() or 'no status'}"
                                    f"\n{_proc.tail((work / 'qemu.log').read_bytes())}")
            time.sleep(0.01)
        progress(f"saving template {key}")
        state = work / STATE
        with monitor.connect(work, deadline, lambda: proc.poll() is None) as q:
            q.cmd("stop")
            out = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                q.cmd("getfd", {"fdname": "template"}, fd=out)
            finally:
                os.close(out)
            q.cmd("migrate", {"uri": "fd:template"})
            q.until(lambda: q.query("query-migrate").get("status") in ("completed", "failed", "cancelled"),
                    deadline, "saving the template")
            result = q.query("query-migrate")
            if result.get("status") != "completed":
                raise TemplateError(f"saving the template failed: {result.get('error-desc', result.get('status'))}")
            q.cmd("quit")
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        meta = {"format": FORMAT, "shape": shape, "created": time.time(),
                "state": {"digest": str(Digest.of_file(state)), "size": state.stat().st_size},
                "initrd": str(Digest.of_file(initrd))}
        for junk in ("share", "placeholder.img", GUEST_STATUS, *(p[2] for p in shape["ports"]), QMP_SOCKET,
                     spec.console_socket, "qemu.log"):
            path = work / junk
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        (work / META).write_text(json.dumps(meta, indent=2, sort_keys=True))
        for path in work.iterdir():
            os.chmod(path, 0o600)
        final = root / key
        try:
            if final.exists():
                shutil.rmtree(final)
            work.rename(final)
        except OSError as exc:  # another build of the same shape won the race
            raise TemplateError(f"template {key} could not be put in place: {exc}",
                                hint="is another `kvmrkt stage1 template build` running? try again") from exc
        (root / WANTED / f"{key}.json").unlink(missing_ok=True)
        return _load(final)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


__all__ = ["Template", "build", "current", "find", "handoff_frame", "listing", "remove", "remove_all", "restore",
           "shape_key", "shape_of", "templates_dir", "valid_shape", "want", "wanted"]
