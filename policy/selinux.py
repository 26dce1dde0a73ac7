"""sVirt-style SELinux labels: a unique MCS category pair per pod, and applying it.

Role: allocate ``s0:cX,cY`` (X<Y, drawn with ``secrets``) unique among live pods across concurrent kvmrkt
processes (a ``kvmrkt.net.leases`` table, ``DATA_DIR/selinux/mcs.json``), so pairs come back after gc and after a
crash.
Types come from the host policy when it defines them (libvirt's ``virtual_domain_context`` and
``virtual_image_context``), else the usual svirt defaults, overridable in config. Applying: pod files get the
file label as their ``security.selinux`` xattr (stored even where SELinux is off, as root), QEMU is executed in
the process label (through ``/proc/self/attr/exec``) only where SELinux is enabled; where it is not, the pod
records that the process label was not applied, and ``required`` mode refuses to run.

Trust boundary: labels confine the VM process, which runs untrusted guests; a failure to label when labelling
is required is fatal (``SELinuxError``, exit 6).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kvmrkt.errors import SELinuxError
from kvmrkt.net import leases

SELINUXFS = Path("/sys/fs/selinux")
DEFAULT_PROCESS = "system_u:system_r:svirt_t"
DEFAULT_FILE = "system_u:object_r:svirt_image_t"
XATTR = "security.selinux"


@dataclass(frozen=True, slots=True)
class Label:
    """A pod's labels: the same MCS pair on the process and on its files."""

    process: str
    file: str
    mcs: tuple[int, int]

    @property
    def level(self) -> str:
        return f"s0:c{self.mcs[0]},c{self.mcs[1]}"

    @property
    def process_label(self) -> str:
        return f"{self.process}:{self.level}"

    @property
    def file_label(self) -> str:
        return f"{self.file}:{self.level}"


def enabled() -> bool:
    """True when the host kernel runs SELinux."""
    return (SELINUXFS / "enforce").exists()


def parse_range(text: str) -> tuple[int, int]:
    """``c0.c1023`` -> (0, 1023).

    Raises:
        SELinuxError: malformed, or fewer than 8 categories (libvirt's minimum).
    """
    try:
        lo, hi = (int(p.strip().lstrip("c")) for p in text.split("."))
    except ValueError as exc:
        raise SELinuxError(f"invalid MCS category range {text!r}", hint="e.g. c0.c1023") from exc
    if not 0 <= lo < hi <= 1023 or hi - lo + 1 < 8:
        raise SELinuxError(f"MCS category range {text!r} needs at least 8 categories within c0.c1023")
    return lo, hi


def host_types() -> tuple[str, str]:
    """Process and file contexts (without level) from the host policy, or the svirt defaults."""
    try:
        policy = next(ln.split("=", 1)[1].strip() for ln in Path("/etc/selinux/config").read_text().splitlines()
                      if ln.startswith("SELINUXTYPE="))
    except (OSError, StopIteration):
        return DEFAULT_PROCESS, DEFAULT_FILE

    def read(name: str, default: str) -> str:
        try:
            first = Path(f"/etc/selinux/{policy}/contexts/{name}").read_text().split()[0]
            return ":".join(first.split(":")[:3])
        except (OSError, IndexError):
            return default

    return read("virtual_domain_context", DEFAULT_PROCESS), read("virtual_image_context", DEFAULT_FILE)


def allocate(path: Path, pod: str, live: Iterable[str] | None, *, categories: str = "c0.c1023",
             process: str | None = None, file: str | None = None) -> Label:
    """Allocate (or return the already allocated) pair for ``pod``; pairs of pods not in ``live`` are freed
    (``None``: free nothing).

    Raises:
        SELinuxError: bad range, or no free pair left.
    """
    lo, hi = parse_range(categories)
    default_process, default_file = host_types()
    n = hi - lo + 1

    def choose(table: dict[str, object]) -> list[int]:
        taken = {tuple(v) for v in leases.used(table) if isinstance(v, list)}
        if len(taken) >= n * (n - 1) // 2:
            raise SELinuxError("no free MCS category pair left", hint="collect exited pods (kvmrkt gc)")
        while True:
            a, b = lo + secrets.randbelow(n), lo + secrets.randbelow(n)
            pair = (min(a, b), max(a, b))
            if a != b and pair not in taken:
                return list(pair)

    value = leases.lease(path, pod, live, choose)
    return Label(process or default_process, file or default_file, (int(value[0]), int(value[1])))


def release(path: Path, pod: str) -> None:
    """Free a pod's pair (gc)."""
    leases.release(path, pod)


def label_files(paths: Iterable[Path], label: str) -> list[str]:
    """Set ``security.selinux`` on files (not following symlinks); returns the paths that could not be labelled."""
    failed = []
    for path in paths:
        try:
            os.setxattr(path, XATTR, label.encode() + b"\0", follow_symlinks=False)
        except OSError as exc:
            failed.append(f"{path}: {exc.strerror}")
    return failed


def read_label(path: Path) -> str:
    """The ``security.selinux`` xattr of a file, or "" when it has none."""
    try:
        return os.getxattr(path, XATTR, follow_symlinks=False).rstrip(b"\0").decode()
    except OSError:
        return ""


def exec_in(label: str) -> None:
    """In a child before exec: run the next program in ``label`` (needs SELinux enabled)."""
    with open("/proc/self/attr/exec", "w") as fh:
        fh.write(label)
