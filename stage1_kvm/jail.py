"""The VMM jail: what a pod's QEMU can see and who it runs as (Firecracker's jailer, done in the spawn hook).

Role: ``plan`` (pure) rewrites a ``VMSpec``'s host paths to paths inside the jail and lists what the jail holds:
the kernel, the pod's initramfs and images read-only, its shared directories, the few system files a dynamically
linked QEMU needs (``/usr`` read-only, ``nosuid``, ``nodev``; the loader cache), a ``/proc`` in which it sees only
itself (``hidepid=invisible,subset=pid``: its 9p server works through ``/proc/self/fd``) and only the device nodes
the VM uses (``/dev/null``, ``/dev/urandom``; ``/dev/net/tun`` with taps; ``/dev/kvm`` under KVM). ``confine`` returns
the hook that runs in the forked child as root just before QEMU is executed: join the pod's cgroups, enter a
private mount namespace, mount a small tmpfs as the jail root, bind what the plan lists, make the device nodes
(owned by the pod's uid), make the root read-only, ``pivot_root`` into it and detach the old root, then drop
the capability bounding set, every group and every id to the pod's uid/gid and set ``no_new_privs``. Nothing is
mounted in the host's namespace, so nothing can leak: the mounts die with QEMU. ``bind_on_host``/``unbind_on_host``
realise the same inputs for the libvirt backend, whose QEMU libvirtd starts in a namespace of its own.

Trust boundary: QEMU runs the untrusted guest, and under TCG it is not a security boundary (QEMU's own policy):
this jail is. Paths come from the store, the assets and the pod directory; the guest never names one.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kvmrkt.host.mounts import mounts_under
from kvmrkt.pods.pod import Pod
from kvmrkt.stage1 import JailSpec
from stage1_kvm import cgroups, shares
from stage1_kvm.vmspec import VMSpec

# <sys/mount.h>, <sched.h>, <linux/prctl.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_PRIVATE, MS_SLAVE, MS_SHARED = 1 << 18, 1 << 19, 1 << 20
MNT_DETACH = 2
CLONE_NEWNS = 0x00020000
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
SYS_PIVOT_ROOT = 155  # x86_64
CAP_LAST = 63

# The system files a dynamically linked QEMU needs (merged-/usr layout, as Debian 12 has it).
SYSTEM_DIRS = ("usr",)
SYSTEM_FILES = ("etc/ld.so.cache",)
SYSTEM_LINKS = (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"), ("sbin", "usr/sbin"))
DEV_NULL, DEV_URANDOM, DEV_TUN, DEV_KVM = ("null", 1, 3), ("urandom", 1, 9), ("net/tun", 10, 200), ("kvm", 10, 232)


@dataclass(frozen=True, slots=True)
class Bind:
    """A host file or directory bound into the jail at ``target`` (relative to the jail root); ``recursive``: with
    the mounts under it (the pod's shared export, whose binds the host makes)."""

    source: Path
    target: str
    directory: bool
    writable: bool = False
    recursive: bool = False


@dataclass(frozen=True, slots=True)
class Layout:
    """What one pod's jail holds: the VM's inputs, the system files, the device nodes (name, major, minor)."""

    inputs: tuple[Bind, ...]
    system: tuple[Bind, ...]
    devices: tuple[tuple[str, int, int], ...]

    def entries(self) -> list[str]:
        """The top-level names of the jail root (what ``/proc/<pid>/root`` lists)."""
        names = {b.target.split("/", 1)[0] for b in (*self.inputs, *self.system)}
        names |= {link for link, _ in SYSTEM_LINKS} | {"dev", "proc"}
        return sorted(names)


GUARD = "kvmrkt-vmm-guard"  # in the jail's root: QEMU is started through it (stage1_kvm/vmm_guard.c)
RECORD = "jail.json"  # in the pod directory: what the jail set up, so that any part can be undone (gc)
ROOT = "jail"  # an empty directory of the pod's: QEMU's private root is mounted on it in its own namespace


def isolation_class(accel: str) -> str:
    """What separates the guest from the host, in words for ``status`` and the measured stage1 event."""
    if accel == "kvm":
        return "kvm: hardware virtualisation, inside the VMM jail"
    return ("tcg: emulation, which QEMU's security policy does not count as a security boundary; the VMM jail "
            "(its own unprivileged uid, no capabilities, seccomp, a private mount namespace, cgroup limits) is the "
            "boundary")


def guarded(qemu: str, argv: Sequence[str]) -> list[str]:
    """QEMU's argv as started inside the jail: through the guard, which executes ``qemu`` with ``argv``."""
    return [f"/{GUARD}", qemu, *argv]


def plan(spec: VMSpec, pod_dir: Path, *, prefix: str = "/", resolv_conf: bool = False,
         guard: Path | None = None, vmm: Path | None = None) -> tuple[VMSpec, Layout]:
    """The spec as QEMU sees it inside the jail (paths under ``prefix``) and the jail's layout (pure).

    ``resolv_conf``: bind the host's ``/etc/resolv.conf`` (QEMU user-mode networking forwards DNS to it);
    ``guard``: bind the VMM guard as ``/kvmrkt-vmm-guard``; ``vmm``: the QEMU executable, bound at its own path
    when it is not under ``/usr`` (its libraries must then be there too).
    """
    def at(rel: str) -> str:
        return str(Path(prefix) / rel)

    inputs = [Bind(spec.kernel, "kernel", False), Bind(pod_dir / spec.initrd, "initrd.img", False)]
    disks = []
    for d in spec.disks:
        inputs.append(Bind(d.path, f"images/{d.id}", False))
        disks.append(replace(d, path=Path(at(f"images/{d.id}"))))
    shares = []
    for s in spec.shares:
        inputs.append(Bind(s.path, f"shares/{s.id}", True, writable=not s.read_only, recursive=s.live))
        shares.append(replace(s, path=Path(at(f"shares/{s.id}"))))
    system = [Bind(Path("/") / d, d, True) for d in SYSTEM_DIRS]
    system += [Bind(Path("/") / f, f, False) for f in SYSTEM_FILES]
    if resolv_conf:
        system.append(Bind(Path("/etc/resolv.conf"), "etc/resolv.conf", False))
    if guard is not None:
        system.append(Bind(guard, GUARD, False))
    if vmm is not None and vmm.is_absolute() and not vmm.is_relative_to("/usr"):
        system.append(Bind(vmm, str(vmm.relative_to("/")), False))
    devices = [DEV_NULL, DEV_URANDOM]
    if any(n.tap for n in spec.nics):
        devices.append(DEV_TUN)
    if spec.accel == "kvm":
        devices.append(DEV_KVM)
    jailed = replace(spec, kernel=Path(at("kernel")), initrd=at("initrd.img"), disks=tuple(disks),
                     shares=tuple(shares))
    return jailed, Layout(tuple(inputs), tuple(system), tuple(devices))


def readable(layout: Layout) -> None:
    """Make the read-only input files readable by any uid that can reach them: the VMM's uid reads them through
    its jail; on the host they stay behind their root-only directories (store, assets, pod directory), which is
    what keeps them from other users, not their own modes."""
    for b in layout.inputs:
        if not b.directory:
            st = os.stat(b.source)
            if not st.st_mode & stat.S_IROTH:
                os.chmod(b.source, stat.S_IMODE(st.st_mode) | 0o444)


# --- the host side: what the jail sets up outside QEMU, recorded so that gc can undo it -----------------------

class PodJail:
    """A pod's jail as recorded in its directory (``jail.json``): ids, limits, cgroup, shares, host bind root."""

    def __init__(self, pod: Pod, data_dir: Path) -> None:
        self.pod, self.data_dir = pod, data_dir

    def _rec(self) -> dict[str, Any]:
        rec = self.pod.read_json(RECORD, {})
        return rec if isinstance(rec, dict) else {}

    def record(self, **fields: Any) -> None:
        """Add facts to the record (before the thing they name is created)."""
        self.pod.write_json(RECORD, {**self._rec(), **fields})

    def up(self, spec: VMSpec, jail: JailSpec, layout: Layout, *, cgroup: bool = True) -> cgroups.PodCgroup | None:
        """The record (first), the cgroup with the limits (unless the VMM's manager places it), access to the
        shared directories, readable inputs.

        Raises:
            JailError: a part could not be set up (``down`` undoes what was done).
        """
        self.record(uid=jail.uid, gid=jail.gid, limits=jail.to_dict(), cgroup=None,
                    shares=[str(s.path) for s in spec.shares])
        cg = None
        if cgroup:
            cg = cgroups.create(jail.cgroup_parent, self.pod.uuid, jail)
            self.record(cgroup=cg.to_dict())
        live = Pod.live_uuids(self.data_dir)
        for s in spec.shares:
            if s.live:
                continue  # the pod's own export (stage1_kvm.export): its modes let the VMM's group in
            shares.grant(self.data_dir, self.pod.uuid, live, s.path, jail.uid, write=not s.read_only)
        readable(layout)
        return cg

    def down(self) -> bool:
        """Undo ``up`` (and a host bind root) once the VM is gone; idempotent. False if something is left for the
        next gc."""
        rec = self._rec()
        ok = True
        cg = cgroups.PodCgroup.from_dict(rec.get("cgroup"))
        if cg is not None:
            ok = cg.remove()
        if rec:
            ok = not shares.revoke(self.data_dir, self.pod.uuid) and ok
        if rec.get("root"):
            ok = unbind_on_host(Path(rec["root"])) and ok
        if rec.get("export"):  # the shared export (stage1_kvm.export) and everything bound under it: named in the
            # pod directory, which moves between phase folders (and its mounts with it)
            ok = unbind_on_host(self.pod.file(Path(str(rec["export"])).name)) and ok
        with contextlib.suppress(OSError):
            self.pod.file(ROOT).rmdir()
        return ok

    def oom(self) -> str | None:
        """Why the VM died, if the kernel killed it for exceeding its cgroup memory limit."""
        rec = self._rec()
        cg = cgroups.PodCgroup.from_dict(rec.get("cgroup"))
        if cg is None or not cg.oom_kills():
            return None
        limit = (rec.get("limits") or {}).get("memory_limit_mib")
        return (f"the VM was killed by the host kernel: QEMU used more than the pod's memory limit of {limit} MiB "
                f"(guest memory + [jail] memory_margin_mib), enforced by its cgroup")

    def status(self, accel: str | None) -> dict[str, Any] | None:
        """The jail for ``status``: ids, limits, the cgroup as the kernel reports it now, the isolation class."""
        rec = self._rec()
        if not rec:
            return None
        cg = cgroups.PodCgroup.from_dict(rec.get("cgroup"))
        if cg is None:
            facts = None
        elif cg.dirs["memory"].exists():
            facts = cg.facts()
        else:  # the VM is gone, and its cgroup with it
            facts = {"path": str(cg.dirs["memory"]), "removed": True}
        return {"uid": rec.get("uid"), "gid": rec.get("gid"), "limits": rec.get("limits"), "cgroup": facts,
                "shares": rec.get("shares", []), "isolation": isolation_class(accel) if accel else None}


# --- the child side -----------------------------------------------------------------------------------------

class _Fail(Exception):
    pass


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    return libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise _Fail(f"{what}: {os.strerror(ctypes.get_errno())}")


def _mount(libc: ctypes.CDLL, src: str | None, dst: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(libc.mount(src.encode() if src else None, dst.encode(), fstype.encode() if fstype else None, flags,
                      data.encode() if data else None), f"mount {src or fstype or ''} on {dst}")


def _bind(libc: ctypes.CDLL, b: Bind, root: str) -> None:
    dst = os.path.join(root, b.target)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if b.directory:
        os.makedirs(dst, exist_ok=True)
    else:
        os.close(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    _mount(libc, str(b.source), dst, None, MS_BIND | (MS_REC if b.recursive else 0), None)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (0 if b.writable else MS_RDONLY)
    _mount(libc, None, dst, None, flags, None)


def _populate(libc: ctypes.CDLL, root: str, binds: Sequence[Bind]) -> None:
    for b in binds:
        _bind(libc, b, root)


def _drop_privileges(libc: ctypes.CDLL, uid: int, gid: int) -> None:
    for cap in range(CAP_LAST + 1):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:  # EINVAL: past the last
            raise _Fail(f"dropping capability {cap}: {os.strerror(ctypes.get_errno())}")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # clears the permitted, effective and ambient sets
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def confine(root: Path, layout: Layout, uid: int, gid: int, cgroup_procs: Sequence[str]) -> Callable[[], None]:
    """The spawn hook (see the module docstring); ``root`` is an empty host directory the jail's tmpfs is mounted
    on in the private namespace (the host sees it empty). On failure it writes why to stderr and exits 126."""

    def hook() -> None:
        try:
            libc = _libc()
            for procs in cgroup_procs:
                with open(procs, "w") as fh:
                    fh.write(str(os.getpid()))
            _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
            _mount(libc, None, "/", None, MS_REC | MS_SLAVE, None)
            r = str(root)
            _mount(libc, "kvmrkt-jail", r, "tmpfs", MS_NOSUID, "mode=0755,size=256k,nr_inodes=256")
            _populate(libc, r, (*layout.system, *layout.inputs))
            for link, target in SYSTEM_LINKS:
                os.symlink(target, os.path.join(r, link))
            # QEMU's 9p server reaches files through /proc/self/fd: a /proc of its own, in which it sees only
            # processes of its uid (itself) and nothing but the per-process directories.
            os.mkdir(os.path.join(r, "proc"), 0o555)
            _mount(libc, "proc", os.path.join(r, "proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   "hidepid=invisible,subset=pid")
            for name, major, minor in layout.devices:
                node = os.path.join(r, "dev", name)
                os.makedirs(os.path.dirname(node), exist_ok=True)
                os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(major, minor))
                os.chown(node, uid, gid)
            _mount(libc, None, r, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID, None)
            os.chdir(r)
            _check(libc.syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")
            _check(libc.umount2(b".", MNT_DETACH), "detaching the old root")
            os.chdir("/")
            _drop_privileges(libc, uid, gid)
        except (_Fail, OSError) as exc:
            with contextlib.suppress(OSError):
                os.write(2, f"kvmrkt: cannot set up the VMM jail: {exc}\n".encode())
            os._exit(126)

    return hook


# --- the libvirt backend: the same inputs, bound in the host's namespace ------------------------------------

def bind_on_host(root: Path, layout: Layout, gid: int) -> None:
    """Bind a pod's inputs under ``root`` (mode 0750, group ``gid``: only the pod's VMM and root get in) in the
    host's mount namespace, for a VMM that another process (libvirtd) starts.

    Raises:
        OSError: a bind failed (``unbind_on_host`` undoes what was done).
    """
    root.mkdir(parents=True, exist_ok=True, mode=0o750)
    os.chown(root, 0, gid)
    os.chmod(root, 0o750)  # noqa: S103 (the group is the pod's own)
    try:
        _populate(_libc(), str(root), layout.inputs)
    except _Fail as exc:
        raise OSError(str(exc)) from None


def unbind_on_host(root: Path) -> bool:
    """Detach every mount under ``root`` (innermost first), then remove the mount points and ``root``. Nothing is
    deleted while anything is still mounted there (a shared directory's files are never touched); returns False
    then, for gc to try again."""
    if not root.exists():
        return True
    libc = _libc()
    for point in sorted(mounts_under(root), key=len, reverse=True):
        libc.umount2(point.encode(), MNT_DETACH)
    if mounts_under(root):
        return False
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(dirpath, name))
    with contextlib.suppress(OSError):
        root.rmdir()
    return not root.exists()
