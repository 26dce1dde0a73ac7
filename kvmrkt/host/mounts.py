"""The host's mount table, read: which mounts lie at or under a directory.

Role: the one reader of ``/proc/self/mountinfo`` for kvmrkt's own directories (a pod's shared export, the
libvirt backend's bind root), so that nothing is ever deleted through a mount. Trust boundary: the kernel's
table of this process's mount namespace; mount points are unescaped as the kernel escapes them (octal).
"""

from __future__ import annotations

import contextlib
from pathlib import Path


def mounts_under(root: Path) -> list[str]:
    """Mount points at or under ``root``, in the table's order (outermost first)."""
    out = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")
            if point == str(root) or point.startswith(f"{root}/"):
                out.append(point)
    return out
