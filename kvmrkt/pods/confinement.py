"""How each app is confined inside the guest: capabilities, seccomp, masked and read-only paths, no_new_privs,
rlimits (pure).

Role: the defaults (the OCI/Docker default capability set, rkt's default seccomp blacklist plus the calls added
since, runc's masked and read-only ``/proc``/``/sys`` paths), rkt's knobs (``--caps-retain``/``--caps-remove``,
``--seccomp mode=retain|remove[,errno=E],SYSCALL|@SET,...``, the appc isolators ``os/linux/capabilities-*-set``,
``os/linux/seccomp-*-set``, ``os/linux/no-new-privileges``), the OCI process fields used by kvmrkt-oci, and
``--insecure-options=capabilities|paths|seccomp``, each of which lifts exactly its own layer. The result is an
``Confinement`` per app, kept in the pod manifest (so it is measured) and rendered for the guest init as
``pod.cfg`` lines, the seccomp filter compiled here into classic BPF for x86_64.

Trust boundary: image isolators, pod manifests and OCI bundles are untrusted requests; names are checked against
fixed tables (an unknown capability or system call is an error, never ignored), and the guest init applies the
result to apps it does not trust.
"""

from __future__ import annotations

import errno as errno_mod
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from kvmrkt import jsondoc
from kvmrkt.errors import ManifestError
from kvmrkt.host.syscalls import SYSCALLS_X86_64
from kvmrkt.pods import kernelsettings
from kvmrkt.pods.kernelsettings import NO_KERNEL_SETTINGS, KernelSettings

CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)  # fmt: skip  (index = capability number, Linux 6.1)
DEFAULT_CAPS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID",
    "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_NET_RAW", "CAP_SYS_CHROOT", "CAP_MKNOD", "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
)  # fmt: skip  (the OCI/Docker default set)

# rkt's @rkt/default-blacklist (its x86_64 members), plus what Linux added since that reaches outside an app:
# file handles and fd theft from other processes, the new mount API, io_uring, accounting and the kernel log.
DEFAULT_DENY = (
    "_sysctl", "add_key", "adjtimex", "bpf", "clock_adjtime", "clock_settime", "create_module", "delete_module",
    "fanotify_init", "finit_module", "get_kernel_syms", "get_mempolicy", "init_module", "ioperm", "iopl", "kcmp",
    "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie", "mbind", "mount", "move_pages",
    "name_to_handle_at", "nfsservctl", "open_by_handle_at", "perf_event_open", "pivot_root", "process_vm_readv",
    "process_vm_writev", "ptrace", "query_module", "quotactl", "reboot", "request_key", "set_mempolicy", "setns",
    "settimeofday", "swapoff", "swapon", "sysfs", "umount2", "unshare", "uselib", "userfaultfd", "ustat",
    "pidfd_getfd", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "acct", "syslog", "vhangup", "quotactl_fd",
    "process_madvise",
)  # fmt: skip
SYSCALL_SETS: dict[str, tuple[str, ...]] = {
    "@kvmrkt/default-blacklist": DEFAULT_DENY,
    "@rkt/default-blacklist": DEFAULT_DENY,
    "@appc.io/all": tuple(SYSCALLS_X86_64),
    "@appc.io/empty": (),
}
# A retain (allow) list always allows what it takes to start the app and to end it.
RETAIN_ALWAYS = ("execve", "exit", "exit_group")

DEFAULT_MASKED = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                  "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                  "/sys/devices/virtual/powercap")  # fmt: skip  (runc's)
DEFAULT_READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

RLIMITS = {"RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3, "RLIMIT_CORE": 4,
           "RLIMIT_RSS": 5, "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7, "RLIMIT_MEMLOCK": 8, "RLIMIT_AS": 9,
           "RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11, "RLIMIT_MSGQUEUE": 12, "RLIMIT_NICE": 13,
           "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15}  # fmt: skip
RLIM_INFINITY = 2**64 - 1

INSECURE_LAYERS = ("capabilities", "paths", "seccomp")

# classic BPF for seccomp (linux/filter.h, linux/seccomp.h, linux/audit.h)
_LD_ABS_W, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06
_RET_KILL_PROCESS, _RET_ERRNO, _RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_BIT = 0x40000000


@dataclass(frozen=True, slots=True)
class Seccomp:
    """A seccomp filter: ``remove`` denies ``syscalls`` (allows the rest), ``retain`` allows only them; denied
    calls fail with ``errno``."""

    mode: str
    syscalls: tuple[str, ...]
    errno: str = "EPERM"

    def __post_init__(self) -> None:
        if self.mode not in ("remove", "retain"):
            raise ManifestError(f"seccomp mode must be remove or retain, not {self.mode!r}")
        unknown = sorted(set(self.syscalls) - set(SYSCALLS_X86_64))
        if unknown:
            raise ManifestError(f"unknown system call(s) {', '.join(unknown[:5])}",
                                hint="names as in the x86_64 system call table (e.g. mkdir, openat), or a set: "
                                     + ", ".join(sorted(SYSCALL_SETS)))
        if not isinstance(getattr(errno_mod, self.errno, None), int) or not self.errno.startswith("E"):
            raise ManifestError(f"unknown errno {self.errno!r}", hint="e.g. EPERM, ENOSYS, ENOTSUP")


DEFAULT_SECCOMP = Seccomp("remove", tuple(sorted(DEFAULT_DENY)))


CAPSETS = ("effective", "permitted", "inheritable", "ambient")


@dataclass(frozen=True, slots=True)
class CapSets:
    """The capability sets besides the bounding set, as an OCI ``process.capabilities`` asks them; the guest sets
    them just before the exec (where the kernel's rules then apply: a root app gets bounding | inheritable |
    ambient as permitted and effective, another uid only its ambient set)."""

    effective: tuple[str, ...] = ()
    permitted: tuple[str, ...] = ()
    inheritable: tuple[str, ...] = ()
    ambient: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in CAPSETS:
            check_caps(getattr(self, name), where=name)
        if missing := _ordered(set(self.effective) - set(self.permitted)):
            raise ManifestError(f"effective capabilities not in the permitted set: {', '.join(missing[:5])}",
                                hint="the kernel keeps effective within permitted (capset(2))")
        if missing := _ordered(set(self.ambient) - (set(self.permitted) & set(self.inheritable))):
            raise ManifestError(f"ambient capabilities not both permitted and inheritable: {', '.join(missing[:5])}",
                                hint="the kernel raises an ambient capability only if it is permitted and "
                                     "inheritable (PR_CAP_AMBIENT)")

    def masks(self) -> tuple[str, ...]:
        """The four sets as hex bit masks (effective, permitted, inheritable, ambient)."""
        return tuple(f"{cap_mask(getattr(self, name)):x}" for name in CAPSETS)


@dataclass(frozen=True, slots=True)
class Confinement:
    """How one app is confined in the guest (besides its own mount, PID, IPC and UTS namespaces and a minimal
    ``/dev``, which always apply). ``capabilities``: its bounding set; ``capsets``: the other sets (None: kvmrkt's
    rule, the bounding set for a root app, no inheritable or ambient capability); ``seccomp``: None = no filter;
    ``rlimits``: (name, soft, hard), the guest's defaults for the others."""

    capabilities: tuple[str, ...] = DEFAULT_CAPS
    seccomp: Seccomp | None = DEFAULT_SECCOMP
    masked_paths: tuple[str, ...] = DEFAULT_MASKED
    readonly_paths: tuple[str, ...] = DEFAULT_READONLY
    no_new_privileges: bool = False
    rlimits: tuple[tuple[str, int, int], ...] = ()
    capsets: CapSets | None = None
    kernel: KernelSettings = NO_KERNEL_SETTINGS  # sysctls, OOM score, device nodes: the VM kernel's, the app's

    def __post_init__(self) -> None:
        check_caps(self.capabilities)
        if self.capsets and (beyond := _ordered(set(self.capsets.inheritable) - set(self.capabilities))):
            raise ManifestError(f"inheritable capabilities not in the bounding set: {', '.join(beyond[:5])}",
                                hint="the kernel keeps inheritable within bounding (capset(2))")
        for p in (*self.masked_paths, *self.readonly_paths):
            if not p.startswith("/") or ".." in p.split("/") or "\0" in p:
                raise ManifestError(f"masked/read-only path {p[:80]!r} must be absolute, without '..'")
        for name, soft, hard in self.rlimits:
            if name not in RLIMITS or not 0 <= soft <= hard <= RLIM_INFINITY:
                raise ManifestError(f"bad rlimit {name} {soft}/{hard}",
                                    hint="known: " + ", ".join(RLIMITS) + "; soft <= hard")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form in the pod manifest."""
        return {
            "capabilities": list(self.capabilities),
            "seccomp": None if self.seccomp is None else {
                "mode": self.seccomp.mode, "syscalls": list(self.seccomp.syscalls), "errno": self.seccomp.errno},
            "maskedPaths": list(self.masked_paths),
            "readonlyPaths": list(self.readonly_paths),
            "noNewPrivileges": self.no_new_privileges,
            "rlimits": [{"type": n, "soft": s, "hard": h} for n, s, h in self.rlimits],
        } | ({} if self.capsets is None else {
            "capabilitySets": {name: list(getattr(self.capsets, name)) for name in CAPSETS}}) | (
            {"kernel": self.kernel.to_dict()} if self.kernel else {})

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Confinement:
        """Parse the JSON form strictly.

        Raises:
            ManifestError: unknown, missing or mistyped fields, unknown names.
        """
        fields = {"capabilities", "seccomp", "maskedPaths", "readonlyPaths", "noNewPrivileges", "rlimits"}
        if not isinstance(d, dict) or set(d) - fields - {"capabilitySets", "kernel"} or fields - set(d):
            raise ManifestError(f"{where}: expected an object with exactly: {', '.join(sorted(fields))} "
                                "(and capabilitySets, kernel)")
        sets = d.get("capabilitySets")
        if sets is not None and (not isinstance(sets, dict) or set(sets) != set(CAPSETS) or not all(
                isinstance(sets[k], list) and all(isinstance(x, str) for x in sets[k]) for k in CAPSETS)):
            raise ManifestError(f"{where}.capabilitySets: expected {{{', '.join(CAPSETS)}}}, each a list of strings")
        sec = d["seccomp"]
        if sec is not None and (not isinstance(sec, dict) or set(sec) != {"mode", "syscalls", "errno"}):
            raise ManifestError(f"{where}.seccomp: expected null or {{mode, syscalls, errno}}")
        for key in ("capabilities", "maskedPaths", "readonlyPaths"):
            if not isinstance(d[key], list) or not all(isinstance(x, str) for x in d[key]):
                raise ManifestError(f"{where}.{key}: expected a list of strings")
        if not isinstance(d["noNewPrivileges"], bool) or not isinstance(d["rlimits"], list):
            raise ManifestError(f"{where}: noNewPrivileges must be a boolean, rlimits a list")
        rlimits = []
        for r in d["rlimits"]:
            if (not isinstance(r, dict) or set(r) != {"type", "soft", "hard"}
                    or not all(isinstance(r[k], int) and not isinstance(r[k], bool) for k in ("soft", "hard"))):
                raise ManifestError(f"{where}.rlimits[]: expected {{type, soft, hard}}")
            rlimits.append((str(r["type"]), r["soft"], r["hard"]))
        seccomp = None
        if sec is not None:
            if not isinstance(sec["syscalls"], list) or not all(isinstance(x, str) for x in sec["syscalls"]):
                raise ManifestError(f"{where}.seccomp.syscalls: expected a list of strings")
            seccomp = Seccomp(str(sec["mode"]), tuple(sec["syscalls"]), str(sec["errno"]))
        return cls(tuple(d["capabilities"]), seccomp, tuple(d["maskedPaths"]), tuple(d["readonlyPaths"]),
                   d["noNewPrivileges"], tuple(rlimits),
                   None if sets is None else CapSets(*(tuple(sets[k]) for k in CAPSETS)),
                   KernelSettings.from_dict(d["kernel"], f"{where}.kernel") if "kernel" in d else NO_KERNEL_SETTINGS)


def check_caps(names: Iterable[str], where: str = "") -> tuple[str, ...]:
    """Normalise capability names (``net_admin``, ``CAP_NET_ADMIN``); ``where`` names the field in the error.

    Raises:
        ManifestError: an unknown capability.
    """
    out = []
    for name in names:
        norm = name.strip().upper()
        norm = norm if norm.startswith("CAP_") else "CAP_" + norm
        if norm not in CAPABILITIES:
            raise ManifestError(f"{where}{': ' if where else ''}unknown capability {name[:40]!r}",
                                hint="e.g. CAP_NET_ADMIN, CAP_SYS_PTRACE (Linux 6.1's set)")
        out.append(norm)
    return tuple(out)


def expand_syscalls(items: Iterable[str]) -> tuple[str, ...]:
    """System call names and ``@sets`` -> sorted unique names.

    Raises:
        ManifestError: an unknown set or system call.
    """
    names: set[str] = set()
    for item in items:
        item = item.strip()
        if item.startswith("@"):
            if item not in SYSCALL_SETS:
                raise ManifestError(f"unknown system call set {item!r}", hint="known: " + ", ".join(SYSCALL_SETS))
            names.update(n for n in SYSCALL_SETS[item] if n in SYSCALLS_X86_64)
        elif item:
            names.add(item)
    return tuple(sorted(names))


def parse_seccomp_flag(text: str) -> Seccomp:
    """rkt's ``--seccomp mode=retain|remove[,errno=NAME],SYSCALL|@SET,...``.

    Raises:
        ManifestError: malformed, unknown names.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not parts[0].startswith("mode="):
        raise ManifestError(f"--seccomp {text!r}: expected mode=retain|remove[,errno=ERRNO],SYSCALL,...")
    mode = parts[0].split("=", 1)[1]
    err = "EPERM"
    if len(parts) > 1 and parts[1].startswith("errno="):
        err = parts[1].split("=", 1)[1].upper()
        parts = parts[1:]
    syscalls = expand_syscalls(parts[1:])
    if not syscalls:
        raise ManifestError(f"--seccomp {text!r}: no system calls given")
    return Seccomp(mode, syscalls, err)


def _isolator_set(value: str, name: str) -> tuple[list[str], str]:
    try:
        doc = jsondoc.loads(value)
        items = doc["set"]
        err = doc.get("errno", "EPERM")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ManifestError(f"image isolator {name}: expected {{\"set\": [...]}}") from exc
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items) or not isinstance(err, str):
        raise ManifestError(f"image isolator {name}: expected a list of names")
    return items, err


@dataclass(frozen=True, slots=True)
class Request:
    """What the operator asked for one app (``None``: not asked)."""

    caps_retain: tuple[str, ...] | None = None
    caps_remove: tuple[str, ...] | None = None
    seccomp: Seccomp | None = None


def resolve(request: Request, isolators: Iterable[tuple[str, str]], insecure: Iterable[str],
            base: Confinement | None = None) -> Confinement:
    """An app's confinement: ``base`` (default: kvmrkt's defaults), narrowed by the image's isolators, then the
    operator's flags (which win over isolators, as in rkt, and may widen), then each insecure option lifts its
    own layer. An image is not trusted to widen anything: its capability sets only remove capabilities, its
    seccomp sets only deny more calls, and no-new-privileges can only be switched on.

    Raises:
        ManifestError: conflicting or unknown names.
    """
    conf = narrow(base or Confinement(), isolators)
    if request.caps_retain is not None and request.caps_remove is not None:
        raise ManifestError("--caps-retain and --caps-remove cannot be combined")
    if request.caps_retain is not None:
        conf = replace(conf, capabilities=_ordered(check_caps(request.caps_retain)))
    elif request.caps_remove is not None:
        drop = set(check_caps(request.caps_remove))
        base_caps = (base or Confinement()).capabilities
        conf = replace(conf, capabilities=tuple(c for c in base_caps if c not in drop))
    if request.seccomp is not None:
        conf = replace(conf, seccomp=request.seccomp)
    return lift(conf, insecure)


def _ordered(caps: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(caps), key=CAPABILITIES.index))


def narrow(conf: Confinement, isolators: Iterable[tuple[str, str]]) -> Confinement:
    """Apply an image's appc isolators, which may only restrict ``conf``.

    Raises:
        ManifestError: a malformed isolator or unknown names.
    """
    iso = dict(isolators)
    for key in ("os/linux/capabilities-retain-set", "os/linux/capabilities-remove-set"):
        if key in iso:
            names = set(check_caps(_isolator_set(iso[key], key)[0]))
            keep = [c for c in conf.capabilities if (c in names) == key.endswith("retain-set")]
            conf = replace(conf, capabilities=tuple(keep))
    for key, mode in (("os/linux/seccomp-retain-set", "retain"), ("os/linux/seccomp-remove-set", "remove")):
        if key in iso:
            items, err = _isolator_set(iso[key], key)
            conf = replace(conf, seccomp=_stricter(conf.seccomp, Seccomp(mode, expand_syscalls(items), err.upper())))
    if iso.get("os/linux/no-new-privileges") == "true":
        conf = replace(conf, no_new_privileges=True)
    return conf


def _stricter(base: Seccomp | None, extra: Seccomp) -> Seccomp:
    """A filter that denies what either filter denies."""
    if base is None:
        return extra
    b, e = set(base.syscalls), set(extra.syscalls)
    if base.mode == "remove":
        return Seccomp("remove", tuple(sorted(b | e)), extra.errno) if extra.mode == "remove" else (
            Seccomp("retain", tuple(sorted(e - b)), extra.errno))
    return Seccomp("retain", tuple(sorted(b - e if extra.mode == "remove" else b & e)), extra.errno)


def lifted(insecure: Iterable[str]) -> list[str]:
    """The confinement layers ``--insecure-options`` lifts (for the warning every launch prints)."""
    return [layer for layer in INSECURE_LAYERS if layer in set(insecure)]


def lift(conf: Confinement, insecure: Iterable[str]) -> Confinement:
    """Apply ``--insecure-options``: ``capabilities`` -> every capability, ``seccomp`` -> no filter, ``paths`` ->
    nothing masked or read-only. Each lifts its own layer only."""
    lifted = set(insecure)
    if "capabilities" in lifted:
        conf = replace(conf, capabilities=CAPABILITIES, capsets=None)
    if "seccomp" in lifted:
        conf = replace(conf, seccomp=None)
    if "paths" in lifted:
        conf = replace(conf, masked_paths=(), readonly_paths=())
    return conf


def from_oci(process: Mapping[str, Any], linux: Mapping[str, Any], insecure: Iterable[str]) -> Confinement:
    """The OCI ``process``/``linux`` fields of a bundle's config.json mapped onto the same layers: the five
    capability sets, noNewPrivileges, rlimits, maskedPaths/readonlyPaths, sysctl/oomScoreAdj/devices
    (``kernelsettings``), and the seccomp profile (rules with
    argument conditions cannot be expressed per call here: allow rules count, conditional deny rules are left
    out, so the filter is never stricter than the app needs and the VM stays the boundary).

    Raises:
        ManifestError: unknown capabilities, system calls or rlimits.
    """
    conf = replace(_oci_capabilities(process.get("capabilities")), rlimits=_oci_rlimits(process.get("rlimits")))
    if isinstance(process.get("noNewPrivileges"), bool):
        conf = replace(conf, no_new_privileges=process["noNewPrivileges"])
    if isinstance(linux.get("maskedPaths"), list):
        conf = replace(conf, masked_paths=tuple(str(p) for p in linux["maskedPaths"]))
    if isinstance(linux.get("readonlyPaths"), list):
        conf = replace(conf, readonly_paths=tuple(str(p) for p in linux["readonlyPaths"]))
    if "seccomp" in linux:
        conf = replace(conf, seccomp=_oci_seccomp(linux["seccomp"]))
    return lift(replace(conf, kernel=kernelsettings.from_oci(process, linux)), insecure)


def _oci_capabilities(doc: Any) -> Confinement:
    """``process.capabilities``: the five sets (a set left out is empty, as in runc); without the object, kvmrkt's
    defaults."""
    if doc is None:
        return Confinement()
    if not isinstance(doc, dict):
        raise ManifestError("config.json: process.capabilities must be an object")
    sets: dict[str, tuple[str, ...]] = {}
    for key in ("bounding", *CAPSETS):
        names = doc.get(key) or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ManifestError(f"config.json: process.capabilities.{key} must be a list of strings")
        sets[key] = _ordered(check_caps(names, where=f"config.json: process.capabilities.{key}"))
    try:
        return Confinement(capabilities=sets.pop("bounding"), capsets=CapSets(**sets))
    except ManifestError as exc:
        raise ManifestError(f"config.json: process.capabilities: {exc.message}", hint=exc.hint) from None


def _oci_rlimits(doc: Any) -> tuple[tuple[str, int, int], ...]:
    """``process.rlimits``: each a Linux ``RLIMIT_*`` at most once, soft <= hard, both unsigned 64-bit."""
    if doc is None:
        return ()
    if not isinstance(doc, list):
        raise ManifestError("config.json: process.rlimits must be a list")
    out: list[tuple[str, int, int]] = []
    for i, r in enumerate(doc):
        where = f"config.json: process.rlimits[{i}]"
        if not isinstance(r, dict) or not isinstance(r.get("type"), str) or not all(
                isinstance(r.get(k), int) and not isinstance(r[k], bool) and 0 <= r[k] <= RLIM_INFINITY
                for k in ("soft", "hard")):
            raise ManifestError(f"{where}: expected {{type, soft, hard}} with limits from 0 to 2^64-1, "
                                f"got {str(r)[:80]}")
        kind, soft, hard = r["type"], r["soft"], r["hard"]
        if kind not in RLIMITS:
            raise ManifestError(f"{where}.type: unknown rlimit {kind[:40]!r}", hint="known: " + ", ".join(RLIMITS))
        if any(kind == seen for seen, _, _ in out):
            raise ManifestError(f"{where}.type: {kind} is given twice")
        if soft > hard:
            raise ManifestError(f"{where}: {kind} soft limit {soft} is above its hard limit {hard}")
        out.append((kind, soft, hard))
    return tuple(out)


_OCI_DENY = ("SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP")


def _oci_seccomp(doc: Any) -> Seccomp | None:
    if not isinstance(doc, dict):
        return None
    default = doc.get("defaultAction", "SCMP_ACT_ALLOW")
    retain = default in _OCI_DENY
    names: set[str] = set()
    for rule in doc.get("syscalls") or []:
        if not isinstance(rule, dict):
            continue
        allows = rule.get("action") not in _OCI_DENY
        if (retain and allows) or (not retain and not allows and not rule.get("args")):
            names.update(str(n) for n in rule.get("names") or [])
    known = {n for n in names if n in SYSCALLS_X86_64}  # profiles name calls of every architecture
    if retain:
        return Seccomp("retain", tuple(sorted(known)), "EPERM")
    return Seccomp("remove", tuple(sorted(known)), "EPERM") if known else None


def seccomp_program(spec: Seccomp) -> bytes:
    """Compile a filter to classic BPF (``struct sock_filter[]``) for x86_64: other architectures' calls kill the
    process, x32 calls are denied, then one compare per listed call."""
    err = getattr(errno_mod, spec.errno) & 0xFFFF
    deny = _RET_ERRNO | err
    names = set(spec.syscalls) | (set(RETAIN_ALWAYS) if spec.mode == "retain" else set())
    match, default = (_RET_ALLOW, deny) if spec.mode == "retain" else (deny, _RET_ALLOW)
    prog = [(_LD_ABS_W, 0, 0, 4), (_JEQ, 1, 0, _AUDIT_ARCH_X86_64), (_RET, 0, 0, _RET_KILL_PROCESS),
            (_LD_ABS_W, 0, 0, 0), (_JGE, 0, 1, _X32_BIT), (_RET, 0, 0, deny)]
    for nr in sorted(SYSCALLS_X86_64[n] for n in names):
        prog += [(_JEQ, 0, 1, nr), (_RET, 0, 0, match)]
    prog.append((_RET, 0, 0, default))
    return b"".join(struct.pack("<HBBI", *ins) for ins in prog)


def cap_mask(names: Iterable[str]) -> int:
    """The capability bit mask of a set of names."""
    return sum(1 << CAPABILITIES.index(n) for n in names)


def guest_config(conf: Confinement) -> list[tuple[str, ...]]:
    """The app's confinement as ``pod.cfg`` fields (see ``stage1_kvm/guest/apps.c``)."""
    out: list[tuple[str, ...]] = [("caps", f"{cap_mask(conf.capabilities):x}")]
    if conf.capsets is not None:
        out.append(("capsets", *conf.capsets.masks()))
    if conf.seccomp is not None:
        out.append(("seccomp", seccomp_program(conf.seccomp).hex()))
    if conf.no_new_privileges:
        out.append(("nnp", "1"))
    out += [("maskpath", p) for p in conf.masked_paths]
    out += [("ropath", p) for p in conf.readonly_paths]
    out += [("rlimit", str(RLIMITS[n]), str(min(s, RLIM_INFINITY)), str(min(h, RLIM_INFINITY)))
            for n, s, h in conf.rlimits]
    return out + kernelsettings.guest_config(conf.kernel)


def describe(conf: Confinement) -> dict[str, Any]:
    """A short view for ``status``: what is confined and what was lifted."""
    return {
        "capabilities": list(conf.capabilities) if conf.capabilities != CAPABILITIES else "all",
        "seccomp": None if conf.seccomp is None else f"{conf.seccomp.mode} {len(conf.seccomp.syscalls)} calls",
        "masked_paths": len(conf.masked_paths), "readonly_paths": len(conf.readonly_paths),
        "no_new_privileges": conf.no_new_privileges,
    }


DEFAULT = Confinement()
