"""Pure translation of a pod into a VM description, and of the pod into the guest's pod config.

Role: decide memory, vCPUs, kernel command line, disks, shares and virtio-serial ports for a pod (``VMSpec``), and
render ``/kvmrkt/pod.cfg`` for the guest init, and a container's config (``guest_container_config``, for a container
created inside a running VM: ``guest/containers.c``). No I/O here: callers pass in host facts (accelerator, TSC
frequency, CPU count, paths). Trust boundary: input is a validated ``PodManifest``; every string written into the
guest config is %-escaped so an argument cannot inject config lines.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvmrkt.config import Stage1Config
from kvmrkt.errors import ManifestError
from kvmrkt.pods.confinement import guest_config
from kvmrkt.pods.manifest import AppSpec, PodManifest, Volume
from kvmrkt.stage1 import JailSpec, NetworkPlan, Nic

# Runtime files the backend keeps in the pod directory. Sockets are relative to the pod directory (QEMU runs
# with it as cwd), which keeps them under the 108-byte sun_path limit however deep the data dir is.
QMP_SOCKET = "qmp.sock"
CTL_SOCKET = "ctl.sock"
SIG_SOCKET = "sig.sock"
STDIN_SOCKET = "stdin.sock"
GUEST_STATUS = "guest-status"
CONSOLE_SOCKET = "console.sock"
CONSOLE_LOG = "console.log"
POD_INITRD = "initrd.img"
# The guest init refuses any other version: an older init would ignore the confinement lines (fail closed).
POD_CONFIG_VERSION = 6
# The pod's shared export (stage1_kvm.export): its directory in the pod directory, its 9p tag, the volume kinds
# bound into it (rbind: with the mounts under the source), and where a bind's source is inside it.
EXPORT_DIR = "shared"
EXPORT_TAG = "kvmrkt-shared"
BIND_KINDS = ("bind", "rbind")
# Containers created inside a running VM (guest/containers.c): their configs, in the export, and their names.
CONTAINERS_DIR = "ctr"
CONTAINER_KINDS = ("empty", *BIND_KINDS)
_CONTAINER_NAME = re.compile(r"[a-z0-9-]{1,40}")


def export_path(volume: Volume) -> str:
    """Where a bind volume's source is, relative to the export (the same on the host and in the guest):
    ``binds/<volume>/<the source's own name>``, so that the container's mount table names the source as runc's
    does (the mount's root ends with it)."""
    name = Path(volume.source or "").name
    return f"binds/{volume.name}/{name if name not in ('', '.', '..') else 'root'}"


def container_config_path(name: str) -> str:
    """Where a container's config is, relative to the export (the guest reads ``/kvmrkt/shared/ctr/<name>.cfg``).

    Raises:
        ManifestError: the name is not ``[a-z0-9-]{1,40}`` (the guest refuses any other).
    """
    check_container_name(name)
    return f"{CONTAINERS_DIR}/{name}.cfg"


def check_container_name(name: str) -> None:
    """Refuse a container name the guest would refuse (it names files there: no ``/``, no ``..``).

    Raises:
        ManifestError: the name is not ``[a-z0-9-]{1,40}``.
    """
    if not _CONTAINER_NAME.fullmatch(name):
        raise ManifestError(f"bad container name {name[:60]!r}",
                            hint="a container in a pod VM is named by 1 to 40 of [a-z0-9-]")


def app_log(app: str, stream: str) -> str:
    """Relative path of an app's stdout/stderr log in the pod directory (kept by ``stage1_kvm.output``)."""
    return f"logs/{app}.{stream}"


def out_socket(index: int, stream: str) -> str:
    """The socket QEMU serves app ``index``'s stdout/stderr port on (kvmrkt reads it into ``app_log``)."""
    return f"{stream}{index}.sock"


@dataclass(frozen=True, slots=True)
class Disk:
    """A read-only virtio-blk disk; the guest finds it by ``serial``."""

    id: str
    path: Path
    serial: str


@dataclass(frozen=True, slots=True)
class Share:
    """A host directory exported over virtio-9p. ``live``: the pod's shared export (``stage1_kvm.export``), into
    which the host binds files while the VM runs: QEMU remaps the device ids of the filesystems under it
    (``multidevs=remap``), and the jail binds it with its submounts."""

    id: str
    path: Path
    tag: str
    read_only: bool
    live: bool = False


@dataclass(frozen=True, slots=True)
class Port:
    """A virtio-serial port and its host end: a file QEMU writes (the guest status, which only the guest init
    writes), or a unix socket QEMU listens on (the agent's requests; app output, which kvmrkt reads and bounds)."""

    name: str
    kind: str
    path: str


@dataclass(frozen=True, slots=True)
class VMSpec:
    """Everything needed to start one pod VM."""

    name: str
    accel: str
    memory_mib: int
    vcpus: int
    kernel: Path
    initrd: str
    cmdline: str
    disks: tuple[Disk, ...]
    shares: tuple[Share, ...]
    ports: tuple[Port, ...]
    acpi: bool = False
    qmp_socket: str = QMP_SOCKET
    console_socket: str = CONSOLE_SOCKET
    sandbox: bool = True
    nics: tuple[Nic, ...] = ()
    user_forwards: tuple[tuple[str, str, int, int], ...] = ()
    netns: str | None = ""  # where QEMU runs: a namespace path, "" a new empty one, None the host's


# The lowest tick rate an x86 kernel can have (CONFIG_HZ_100). A preset loops_per_jiffy computed for it is too
# large for a kernel with a faster tick (kvmrkt's kernels: 250 Hz), so delays can only be longer than asked, never
# shorter (the admin-guide warns that a wrong lpj makes delays wrong).
MIN_GUEST_HZ = 100


def kernel_cmdline(*, accel: str, tsc_khz: int | None, debug: bool, vcpus: int = 1, acpi: bool = False) -> str:
    """The guest kernel command line (measured: it is part of the stage1 event). Each lever was measured with
    ``bench/kernel_boot.py`` (the kernel-only floor, and the guest clock under ``initcall_debug``):

    - ``no_timer_check`` (both accelerators): skips the IO-APIC timer check (``timer_irq_works``: a few ticks of
      busy-waiting, ~20 ms of guest time under TCG); the timer wiring is QEMU's microvm, known good.
    - ``tsc_early_khz`` (TCG): skips the TSC calibration against the PIT that hangs about one boot in six on
      nested hosts.
    - ``noapictimer`` (TCG, the minimal kernel): TCG has no TSC-deadline timer, so the kernel calibrates the
      local APIC timer for ~0.24 s of guest time before the first CPU is up (issue 16's profile saw it then
      disabled anyway, "verification failure"); without it the tick comes from the PIT through the
      IO-APIC, broadcast to other vCPUs. Not with ``acpi`` (Debian's cloud kernel hangs after reaching init
      without its APIC timer), nor under KVM, where the TSC-deadline timer skips the calibration.
    - ``tsc=reliable`` (TCG): TCG's TSC is one counter derived from the host's, kept monotonic by QEMU for every
      vCPU, but TCG's CPU model lacks ``constant_tsc``, so with two or more vCPUs the kernel declares it
      "unsynchronized" and the pod's clock falls back to refined-jiffies (4 ms resolution); this keeps the TSC
      and turns off the clocksource watchdog. Under KVM the clocksource is kvm-clock.
    - ``lpj`` (TCG, two or more vCPUs): the first CPU takes loops_per_jiffy from tsc_khz, each other one
      calibrates its delay loop for ~0.4 s of guest time (``calibrate_delay_direct() failed``); preset for
      ``MIN_GUEST_HZ`` so a delay is never shorter than asked. Under KVM the other CPUs copy the first one's.
    - ``noreplace-smp`` (TCG, one vCPU): an SMP kernel on one CPU rewrites every ``lock`` prefix of its text
      into a no-op, and each of those writes into already-translated code costs TCG a retranslation: 0.06 to
      0.2 s of guest time between ``x86/fpu`` and ``Freeing SMP alternatives memory`` (``--profile``), gone with
      it. The ``lock`` prefixes stay: correct on any number of CPUs, and a one-vCPU pod never gets another.

    Measured and not adopted: ``mitigations=off`` (the guest runs hostile code: never), ``nosmp`` (also turns
    off the IO-APIC that virtio-mmio interrupts use), ``maxcpus=1`` (a no-op for one vCPU), ``lpj`` for one
    vCPU (already skipped), ``clocksource=`` (no gain), ``lapic=notscdeadline`` (forces the calibration)."""
    parts = ["console=ttyS0", "panic=-1", "reboot=t", "rdinit=/init", "random.trust_cpu=on", "8250.nr_uarts=1",
             "no_timer_check"]
    parts.append("loglevel=7" if debug else "quiet")
    if accel == "tcg":
        parts += ["tsc=reliable", *(() if acpi else ("noapictimer",))]
        if vcpus == 1:
            parts.append("noreplace-smp")
        if tsc_khz:
            parts.append(f"tsc_early_khz={tsc_khz}")
            if vcpus > 1:
                parts.append(f"lpj={tsc_khz * 1000 // MIN_GUEST_HZ}")
    return " ".join(parts)


def build_vmspec(
    manifest: PodManifest,
    *,
    cfg: Stage1Config,
    jail: JailSpec,
    accel: str,
    kernel: Path,
    rootfs: Mapping[str, Path],
    interactive: bool,
    verity: Mapping[str, Mapping[str, str]] | None = None,
    debug: bool,
    tsc_khz: int | None,
    acpi: bool = False,
    network: NetworkPlan | None = None,
    shared_roots: Mapping[str, bool] | None = None,
    shared_export: Path | None = None,
) -> VMSpec:
    """Describe the VM for a pod (pure), sized as its ``jail`` says. ``acpi``: the guest kernel finds virtio-mmio
    devices through ACPI (Debian's cloud kernel) rather than on its command line (the minimal kernel);
    ``shared_export``: the pod's shared export directory (``stage1_kvm.export``), one more share."""
    network = network or NetworkPlan()
    netns = {"none": "", "user": None}.get(network.mode, network.netns)
    disks: list[Disk] = []
    roots: list[Share] = []
    for i, a in enumerate(manifest.apps):
        if shared_roots and a.name in shared_roots:
            roots.append(Share(f"root{i}", rootfs[a.name], f"root{i}", shared_roots[a.name]))
            continue
        disks.append(Disk(f"app{i}", rootfs[a.name], f"app{i}"))
        if verity and verity.get(a.name, {}).get("root"):
            disks.append(Disk(f"app{i}v", rootfs[a.name].with_suffix(".verity"), f"app{i}-verity"))
    shares = (*roots, *(
        Share(f"vol{i}", Path(v.source or ""), f"vol{i}", v.read_only)
        for i, v in enumerate(manifest.volumes)
        if v.kind == "host"
    ), *((Share("shared", shared_export, EXPORT_TAG, False, live=True),) if shared_export else ()))
    ports = [
        Port("kvmrkt.status", "file", GUEST_STATUS),
        Port("kvmrkt.ctl", "socket", CTL_SOCKET),
        Port("kvmrkt.sig", "socket", SIG_SOCKET),
    ]
    for i in range(len(manifest.apps)):
        ports.append(Port(f"kvmrkt.out.{i}", "socket", out_socket(i, "stdout")))
        ports.append(Port(f"kvmrkt.err.{i}", "socket", out_socket(i, "stderr")))
    if interactive:
        ports.append(Port("kvmrkt.in.0", "socket", STDIN_SOCKET))
    return VMSpec(
        name=f"kvmrkt-{manifest.uuid}",
        accel=accel,
        memory_mib=jail.memory_mib,
        vcpus=jail.vcpus,
        kernel=kernel,
        initrd=POD_INITRD,
        cmdline=kernel_cmdline(accel=accel, tsc_khz=tsc_khz, debug=debug, vcpus=jail.vcpus, acpi=acpi),
        disks=tuple(disks),
        shares=shares,
        ports=tuple(ports),
        sandbox=cfg.sandbox,
        acpi=acpi,
        nics=network.nics,
        user_forwards=network.forwards,
        netns=netns,
    )


def escape(value: str) -> str:
    """%-escape bytes the guest config treats specially (space, control, non-ASCII, '%'); the empty string
    is a lone '%' (a real '%' is always '%25', so this is unambiguous)."""
    out = []
    for b in value.encode():
        out.append(f"%{b:02X}" if b <= 0x20 or b >= 0x7F or b == 0x25 else chr(b))
    return "".join(out) or "%"


def _line(*fields: str | int) -> str:
    return " ".join(escape(str(f)) for f in fields) + "\n"


def guest_pod_config(
    manifest: PodManifest, *, interactive: bool, verity: Mapping[str, Mapping[str, str]] | None = None,
    network: NetworkPlan | None = None,
    shared_roots: Mapping[str, bool] | None = None,
    hold: bool = False,
    tty: bool = False,
    shared_export: bool = False,
) -> bytes:
    """Render ``/kvmrkt/pod.cfg`` for the guest init (see ``stage1_kvm/guest/config.c`` for the format). With
    ``verity`` (app -> root hash and salt), each app's root is opened through dm-verity; ``network`` gives the
    interfaces to configure and the files every app gets; ``shared_roots``, ``hold``, ``tty``, ``shared_export``: see
    ``RunOptions``."""
    lines = [_line("version", POD_CONFIG_VERSION), _line("interactive", int(interactive))]
    if hold:
        lines.append(_line("hold", 1))
    if tty:
        lines.append(_line("tty", 1))
    if manifest.hostname:
        lines.append(_line("hostname", manifest.hostname))
    if shared_export:
        lines.append(_line("shared", EXPORT_TAG))
    for nic in (network.nics if network else ()):
        lines.append(_line("net", nic.ifname, nic.mac, nic.mtu))
        lines.extend(_line("addr", ip, prefix) for ip, prefix in nic.addrs)
        lines.extend(_line("route", dst, prefix, gw or "-") for dst, prefix, gw in nic.routes)
    for path, content in (network.files if network else ()):
        lines.append(_line("file", path, content))
    host_index = 0
    for v in manifest.volumes:
        tag = "-"
        if v.kind == "host":
            tag = f"vol{host_index}"
            host_index += 1
        lines.append(_volume_line(v, tag))
    for i, app in enumerate(manifest.apps):
        lines.append(_line("app", app.name))
        if shared_roots and app.name in shared_roots:
            lines.append(_line("rootshare", f"root{i}", int(shared_roots[app.name])))
        else:
            lines.append(_line("serial", f"app{i}"))
        tree = (verity or {}).get(app.name, {})
        if tree.get("root") and not (shared_roots and app.name in shared_roots):
            lines.append(_line("verity", f"app{i}-verity", tree["root"], tree["salt"]))
        lines.extend(_app_lines(app))
    return "".join(lines).encode()


def _volume_line(v: Volume, tag: str = "-") -> str:
    return _line("volume", v.name, v.kind, export_path(v) if v.kind in BIND_KINDS else tag, int(v.read_only))


def _app_lines(app: AppSpec) -> list[str]:
    """An app's credentials, command, environment, mounts and confinement (after its ``app`` and root lines)."""
    lines = [_line("uid", app.uid), _line("gid", app.gid)]
    lines.extend(_line("group", g) for g in app.supplementary_gids)
    lines.append(_line("cwd", app.working_dir))
    lines.extend(_line("arg", a) for a in app.exec)
    lines.extend(_line("env", f"{k}={v}") for k, v in app.env)
    lines.extend(_line("mount", m.volume, m.target) for m in app.mounts)
    lines.extend(_line(*fields) for fields in guest_config(app.confinement))
    return lines


def guest_container_config(app: AppSpec, volumes: Sequence[Volume], *, root: str, read_only: bool,
                           join: str | None = None, shm: str | None = None) -> bytes:
    """Render a container's config (``container_config_path``) for ``guest/containers.c``: its volumes (names
    unique in the VM: the caller prefixes them with the container's name; kinds ``empty``, ``bind``, ``rbind``), its
    one app, its root (``root``: a directory bound into the export, its export-relative path; ``read_only``: under
    an overlay in guest memory), the running app whose IPC and UTS namespaces it ``join``s and whose ``/dev/shm``
    it binds (``shm``).

    Raises:
        ManifestError: a volume of another kind, or a root that is not a plain relative path in the export.
    """
    parts = root.split("/")
    if not root or root.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ManifestError(f"bad container root {root[:80]!r}: a relative path in the export, without . or ..")
    for v in volumes:
        if v.kind not in CONTAINER_KINDS:
            raise ManifestError(f"volume {v.name!r} of a container is of kind {v.kind!r}",
                                hint=f"a container in a pod VM has volumes of kinds {', '.join(CONTAINER_KINDS)}")
    lines = [_line("version", POD_CONFIG_VERSION), *(_volume_line(v) for v in volumes), _line("app", app.name),
             _line("rootdir", root, int(read_only))]
    lines += [_line("join", join)] if join else []
    lines += [_line("shm", shm)] if shm else []
    lines.extend(_app_lines(app))
    return "".join(lines).encode()
