"""Which network namespaces kvmrkt may rewire: only one that provably belongs to the pod being started.

Role: before kvmrkt-oci carries the interfaces of a namespace it was handed (an OCI bundle's
``linux.namespaces[network].path``) into a VM, it adds taps and redirects *every* Ethernet link's ingress there.
Done to the node's namespace, that steals the host's own interfaces. Trust boundary: the path comes from the
container engine's bundle and is not trusted: CRI hands app containers ``/proc/<sandbox pid>/ns/net``, which for
a VM runtime is a host process in the node's namespace. A namespace qualifies only if it is a network namespace,
is neither the node's (PID 1's) nor kvmrkt's own, and no process lives in it (a pod's fresh namespace, made by
CNI for this pod, holds none; one that does belongs to whoever runs there).
"""

from __future__ import annotations

import os
from pathlib import Path

from kvmrkt.errors import ConfigError

HINT = ("give the container a network namespace made for its pod (CRI's sandbox namespace, `ip netns add`), or "
        "none; kvmrkt never rewires a namespace that is not the pod's own")


def _ns_id(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def check_pod_namespace(path: str, *, proc: Path = Path("/proc")) -> None:
    """Refuse a network namespace kvmrkt cannot prove belongs to the pod (see the module docstring).

    Raises:
        ConfigError: not a network namespace, the node's or kvmrkt's own, or processes live in it.
    """
    try:
        target = _ns_id(path)
        own = _ns_id(proc / "self" / "ns" / "net")
    except OSError as exc:
        raise ConfigError(f"cannot use network namespace {path}: {exc.strerror}", hint=HINT) from None
    if target[0] != own[0]:  # every namespace lives on the nsfs device
        raise ConfigError(f"{path} is not a network namespace", hint=HINT)
    if target == own:
        raise ConfigError(f"refusing network namespace {path}: it is kvmrkt's own (the node's namespace, as CRI "
                          "hands it for a VM runtime's sandbox pid)", hint=HINT)
    try:
        node = _ns_id(proc / "1" / "ns" / "net")
    except OSError:
        node = own
    if target == node:
        raise ConfigError(f"refusing network namespace {path}: it is the node's (PID 1's)", hint=HINT)
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if _ns_id(entry / "ns" / "net") == target:
                comm = (entry / "comm").read_text().strip()
            else:
                continue
        except OSError:  # gone meanwhile, or not ours to look at
            continue
        raise ConfigError(f"refusing network namespace {path}: process {entry.name} ({comm}) lives in it, so it "
                          "is not a namespace made for this pod alone", hint=HINT)
