"""Runtime configuration: ``CONFIG_DIR/config.toml`` merged with command-line flags.

Role: load the config file strictly (unknown tables or keys are errors naming them), apply flag overrides and
hand the engine one frozen ``RuntimeConfig``. Trust boundary: the config file is owned by root/config
management and trusted once it parses; values are still type-checked so a typo cannot silently fall back to
a default.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmrkt.errors import ConfigError

DEFAULT_DATA_DIR = Path("/var/lib/kvmrkt")
DEFAULT_CONFIG_DIR = Path("/etc/kvmrkt")
DEFAULT_ASSETS_DIR = Path("/var/lib/kvmrkt/stage1")
DEFAULT_CNI_DIRS = ("/usr/lib/cni", "/opt/cni/bin")

# rkt's values that kvmrkt honours (each is checked where its check is made: grep the value), plus tpm for
# measured launch. Every value accepted here must switch something off; one that would not is refused below.
_INSECURE_GROUPS: dict[str, frozenset[str]] = {
    "all-fetch": frozenset({"image", "tls", "http"}),
    "all-run": frozenset({"capabilities", "paths", "seccomp"}),
}
INSECURE_VALUES = frozenset(
    {"none", "image", "tls", "http", "capabilities", "paths", "seccomp", "tpm"} | set(_INSECURE_GROUPS) | {"all"}
)
# rkt's (or planned) values with no check behind them in kvmrkt: accepting them would claim a bypass that does
# not happen (and record it in the measured launch), so they are refused with the reason.
UNSUPPORTED_INSECURE = {
    "pubkey": "kvmrkt fetches no keys (trusted keys come only from the trust policy), so there is no key "
              "check to skip; use --insecure-options=image to skip signature checks",
    "ondisk": "the store's blobs and rootfs images are always verified (digests, dm-verity) and this cannot be "
              "switched off",
    "selinux": "kvmrkt has no switch to skip sVirt labelling: a pod is labelled, or it does not start",
}
ACCELS = ("auto", "kvm", "tcg")
DEFAULT_UID_RANGE = "2000000000-2000065535"
UID_MAX = 2**32 - 2  # (uid_t)-1 means "unchanged" to the set*id calls
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*\Z")
KERNELS = ("minimal", "debian-cloud")
MIN_LOG_BYTES = 256 * 1024  # [pods] max_log_bytes: room for a marker line, the kept half and a read chunk


def parse_insecure_options(value: str) -> frozenset[str]:
    """Expand a comma list of ``--insecure-options`` values into the set of individual checks disabled.

    Raises:
        ConfigError: for an unknown value.
    """
    out: set[str] = set()
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            continue
        if item in UNSUPPORTED_INSECURE:
            raise ConfigError(f"--insecure-options={item} is not supported: {UNSUPPORTED_INSECURE[item]}",
                              hint="valid values: " + ", ".join(sorted(INSECURE_VALUES)))
        if item not in INSECURE_VALUES:
            raise ConfigError(
                f"unknown --insecure-options value {item!r}",
                hint="valid values: " + ", ".join(sorted(INSECURE_VALUES)),
            )
        if item == "all":
            for group in _INSECURE_GROUPS.values():
                out |= group
            out.add("tpm")
        elif item in _INSECURE_GROUPS:
            out |= _INSECURE_GROUPS[item]
        elif item != "none":
            out.add(item)
    return frozenset(out)


def parse_uid_range(text: str) -> tuple[int, int]:
    """``"2000000000-2000065535"`` -> (lo, hi), inclusive.

    Raises:
        ConfigError: malformed, empty, touching uid 0 or (uid_t)-1.
    """
    m = _RANGE.match(text)
    if not m:
        raise ConfigError(f"jail.uid_range {text!r}: expected FIRST-LAST, e.g. 2000000000-2000065535")
    lo, hi = int(m.group(1)), int(m.group(2))
    if not 0 < lo <= hi <= UID_MAX:
        raise ConfigError(f"jail.uid_range {text!r}: must be within 1-{UID_MAX}, first <= last")
    return lo, hi


@dataclass(frozen=True, slots=True)
class Stage1Config:
    """The ``[stage1]`` table."""

    backend: str = "qemu"
    accel: str = "auto"
    kernel: str = "minimal"
    assets_dir: Path = DEFAULT_ASSETS_DIR
    qemu: str = "qemu-system-x86_64"
    boot_timeout: float = 60.0
    stop_timeout: float = 10.0
    memory_overhead_mib: int = 128
    min_memory_mib: int = 256
    sandbox: bool = True
    libvirt_uri: str = "qemu:///system"
    # Start pods from VM templates (stage1_kvm.template) where one of the pod's shape was built; a shape without
    # one boots cold and is recorded for `kvmrkt stage1 template build`. templates_dir: default assets_dir/templates.
    templates: bool = True
    templates_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class ImagesConfig:
    """The ``[images]`` table: limits that stop hostile layers (zip bombs, inode floods) with a clear error."""

    max_total_bytes: int = 8 * 1024**3
    max_entries: int = 1_000_000
    max_ratio: int = 200
    max_depth: int = 256
    scratch: str = "auto"  # where trees are unpacked before the erofs build: auto | memory | disk


def _default_tcti() -> str:
    return "device:/dev/tpmrm0" if Path("/dev/tpmrm0").exists() else ""


@dataclass(frozen=True, slots=True)
class MeasureConfig:
    """The ``[measure]`` table: which TPM (a TCTI string), which PCR measured launch uses, and where its event
    log lives. The log belongs to the TPM's PCR, not to a data directory: every kvmrkt data directory that
    measures into one PCR must share ``log_dir`` (the default), or each sees the other's extends as tampering."""

    tcti: str = field(default_factory=_default_tcti)
    pcr: int = 15
    log_dir: Path = Path("/var/lib/kvmrkt/measure")


@dataclass(frozen=True, slots=True)
class SELinuxConfig:
    """The ``[selinux]`` table: ``mode`` auto (label where SELinux is enabled) or required (refuse to run a pod
    whose label cannot be applied); the MCS category range; optional context overrides (user:role:type)."""

    mode: str = "auto"
    categories: str = "c0.c1023"
    process_context: str = ""
    file_context: str = ""


@dataclass(frozen=True, slots=True)
class JailConfig:
    """The ``[jail]`` table: the host uids pods' VMMs run as (one per pod, the gid has the same number; a range
    no account, group or subordinate range uses), the cgroup parent their limits live under, the memory the VMM
    may use beyond guest RAM (measured: QEMU's code, TCG translation cache, device buffers) and the pids limit."""

    uid_range: str = DEFAULT_UID_RANGE
    cgroup_parent: str = "kvmrkt"
    memory_margin_mib: int = 256
    pids_max: int = 1024


def _host_memory_mib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 4096


@dataclass(frozen=True, slots=True)
class PodsConfig:
    """The ``[pods]`` table: the most guest memory and vCPUs one pod may ask for (defaults: half the host's
    memory, all its CPUs). A pod asking for more is refused, never silently granted. ``max_log_bytes``: the
    most each of a pod's logs (console, each app's stdout and stderr) keeps on the host; beyond it the log keeps
    its latest output under a marker (``stage1_kvm.output``)."""

    max_memory_mib: int = field(default_factory=lambda: max(_host_memory_mib() // 2, 256))
    max_vcpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_log_bytes: int = 64 * 1024**2


@dataclass(frozen=True, slots=True)
class NetworkSettings:
    """The ``[network]`` table: the ``--net`` used when none is given, and where CNI plugins are."""

    default: str = "default"
    plugin_dirs: tuple[str, ...] = DEFAULT_CNI_DIRS


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Everything a command needs to know about where things are and how to run them."""

    data_dir: Path = DEFAULT_DATA_DIR
    config_dir: Path = DEFAULT_CONFIG_DIR
    debug: bool = False
    insecure_options: frozenset[str] = frozenset()
    stage1: Stage1Config = field(default_factory=Stage1Config)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    selinux: SELinuxConfig = field(default_factory=SELinuxConfig)
    network: NetworkSettings = field(default_factory=NetworkSettings)
    jail: JailConfig = field(default_factory=JailConfig)
    pods: PodsConfig = field(default_factory=PodsConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view, as printed by ``kvmrkt config``."""
        s1 = {f.name: _plain(getattr(self.stage1, f.name)) for f in dataclasses.fields(self.stage1)}
        return {
            "paths": {"data_dir": str(self.data_dir), "config_dir": str(self.config_dir)},
            "debug": self.debug,
            "insecure_options": sorted(self.insecure_options),
            "stage1": s1,
            "images": dataclasses.asdict(self.images),
            "measure": {k: _plain(v) for k, v in dataclasses.asdict(self.measure).items()},
            "selinux": dataclasses.asdict(self.selinux),
            "network": {"default": self.network.default, "plugin_dirs": list(self.network.plugin_dirs)},
            "jail": dataclasses.asdict(self.jail),
            "pods": dataclasses.asdict(self.pods),
        }


def _plain(value: object) -> object:
    return str(value) if isinstance(value, Path) else value


def _check_table(table: dict[str, Any], allowed: dict[str, type | tuple[type, ...]], where: str, path: Path) -> None:
    for key, value in table.items():
        if key not in allowed:
            raise ConfigError(
                f"{path}: unknown key {where}{key!r}", hint="known keys: " + ", ".join(sorted(allowed))
            )
        want = allowed[key]
        if isinstance(value, bool) and want is not bool and not (isinstance(want, tuple) and bool in want):
            raise ConfigError(f"{path}: {where}{key} must be {_typename(want)}, not a boolean")
        if not isinstance(value, want):
            raise ConfigError(f"{path}: {where}{key} must be {_typename(want)}, not {type(value).__name__}")


def _typename(want: type | tuple[type, ...]) -> str:
    types = want if isinstance(want, tuple) else (want,)
    return " or ".join(t.__name__ for t in types)


_STAGE1_KEYS: dict[str, type | tuple[type, ...]] = {
    "backend": str,
    "accel": str,
    "kernel": str,
    "assets_dir": str,
    "qemu": str,
    "boot_timeout": (int, float),
    "stop_timeout": (int, float),
    "memory_overhead_mib": int,
    "min_memory_mib": int,
    "sandbox": bool,
    "libvirt_uri": str,
    "templates": bool,
    "templates_dir": str,
}


def load_config(
    *,
    config_dir: Path = DEFAULT_CONFIG_DIR,
    data_dir: Path | None = None,
    debug: bool = False,
    insecure_options: str = "",
    overrides: dict[str, Any] | None = None,
) -> RuntimeConfig:
    """Read ``config_dir/config.toml`` (absent is fine) and apply flag values on top.

    Args:
        config_dir: the ``--config-dir`` flag.
        data_dir: the ``--dir`` flag; None means the file's ``paths.data_dir`` or the default.
        debug: the ``--debug`` flag.
        insecure_options: the ``--insecure-options`` flag, a comma list.
        overrides: ``[stage1]`` keys set by flags (``--stage1``, ``--accel``), and ``selinux_mode``
            (``--selinux``); None values are ignored.

    Raises:
        ConfigError: unreadable or malformed file, unknown key, wrong type or invalid value.
    """
    path = config_dir / "config.toml"
    doc: dict[str, Any] = {}
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except FileNotFoundError:
        pass
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    _check_table(doc, {"paths": dict, "stage1": dict, "images": dict, "measure": dict, "selinux": dict,
                       "network": dict, "insecure_options": list, "jail": dict, "pods": dict}, "", path)
    sel = dict(doc.get("selinux", {}))
    _check_table(sel, {"mode": str, "categories": str, "process_context": str, "file_context": str}, "selinux.", path)
    overrides = dict(overrides or {})
    if overrides.get("selinux_mode"):
        sel["mode"] = overrides["selinux_mode"]
    overrides.pop("selinux_mode", None)
    if sel.get("mode", "auto") not in ("auto", "required"):
        raise ConfigError(f"selinux mode must be auto or required, not {sel.get('mode')!r}")
    meas = doc.get("measure", {})
    _check_table(meas, {"tcti": str, "pcr": int, "log_dir": str}, "measure.", path)
    if "log_dir" in meas:
        if not meas["log_dir"].startswith("/"):
            raise ConfigError(f"{path}: measure.log_dir must be an absolute path")
        meas = {**meas, "log_dir": Path(meas["log_dir"])}
    img = doc.get("images", {})
    _check_table(img, {"max_total_bytes": int, "max_entries": int, "max_ratio": int, "max_depth": int,
                       "scratch": str}, "images.", path)
    if any(isinstance(v, int) and v <= 0 for v in img.values()):
        raise ConfigError(f"{path}: images limits must be positive")
    if img.get("scratch", "auto") not in ("auto", "memory", "disk"):
        raise ConfigError(f"{path}: images.scratch must be auto, memory or disk")
    net = dict(doc.get("network", {}))
    _check_table(net, {"default": str, "plugin_dirs": list}, "network.", path)
    if not all(isinstance(d, str) for d in net.get("plugin_dirs", [])):
        raise ConfigError(f"{path}: network.plugin_dirs must be a list of strings")
    net["plugin_dirs"] = tuple(net.get("plugin_dirs", DEFAULT_CNI_DIRS))
    jail = doc.get("jail", {})
    _check_table(jail, {"uid_range": str, "cgroup_parent": str, "memory_margin_mib": int, "pids_max": int}, "jail.",
                 path)
    if any(isinstance(v, int) and v <= 0 for v in jail.values()):
        raise ConfigError(f"{path}: jail.memory_margin_mib and jail.pids_max must be positive")
    parse_uid_range(jail.get("uid_range", DEFAULT_UID_RANGE))
    parent = jail.get("cgroup_parent", "kvmrkt")
    if not parent or parent.startswith("/") or any(p in ("", ".", "..") for p in parent.split("/")):
        raise ConfigError(f"{path}: jail.cgroup_parent must be a relative cgroup path like kvmrkt or machine/kvmrkt")
    pods = doc.get("pods", {})
    _check_table(pods, {"max_memory_mib": int, "max_vcpus": int, "max_log_bytes": int}, "pods.", path)
    if any(v <= 0 for k, v in pods.items() if k != "max_log_bytes"):
        raise ConfigError(f"{path}: pods.max_memory_mib and pods.max_vcpus must be positive")
    if pods.get("max_log_bytes", MIN_LOG_BYTES) < MIN_LOG_BYTES:
        raise ConfigError(f"{path}: pods.max_log_bytes must be at least {MIN_LOG_BYTES} (256 KiB)",
                          hint="it bounds each pod log on the host; the default is 67108864 (64 MiB)")
    paths = doc.get("paths", {})
    _check_table(paths, {"data_dir": str}, "paths.", path)
    s1 = dict(doc.get("stage1", {}))
    _check_table(s1, _STAGE1_KEYS, "stage1.", path)
    for key, value in (overrides or {}).items():
        if value is not None:
            s1[key] = value
    for key in ("assets_dir", "templates_dir"):
        if key in s1:
            s1[key] = Path(s1[key])
    stage1 = Stage1Config(**s1)
    if stage1.accel not in ACCELS:
        raise ConfigError(f"invalid accel {stage1.accel!r}", hint="use one of: " + ", ".join(ACCELS))
    if stage1.kernel not in KERNELS:
        raise ConfigError(f"invalid kernel {stage1.kernel!r}", hint="use one of: " + ", ".join(KERNELS))
    if stage1.boot_timeout <= 0 or stage1.stop_timeout < 0:
        raise ConfigError(f"{path}: stage1.boot_timeout must be > 0 and stage1.stop_timeout >= 0")
    file_insecure = doc.get("insecure_options", [])
    if not all(isinstance(v, str) for v in file_insecure):
        raise ConfigError(f"{path}: insecure_options must be a list of strings")
    insecure = parse_insecure_options(",".join([*file_insecure, insecure_options]))
    return RuntimeConfig(
        data_dir=data_dir or Path(paths.get("data_dir", DEFAULT_DATA_DIR)),
        config_dir=config_dir,
        debug=debug,
        insecure_options=insecure,
        stage1=stage1,
        images=ImagesConfig(**img),
        measure=MeasureConfig(**meas),
        selinux=SELinuxConfig(**sel),
        network=NetworkSettings(**net),
        jail=JailConfig(**jail),
        pods=PodsConfig(**pods),
    )
