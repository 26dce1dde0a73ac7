"""The taps that carry a pod's frames, and how a libvirt pod's taps are lent to libvirtd.

A pod on CNI networks has, in its network namespace, a tap per CNI interface with every frame redirected between
the two by tc mirred (``redirects``; ``kvmrkt.net.network`` makes them). A QEMU pod's VMM runs in that namespace
and opens its taps there. libvirtd opens a domain's taps itself, by name, in its own (the host's) namespace; so a
libvirt pod's taps are *lent*: moved into the host's namespace under names of their own (``host_name``: ``kvt``,
ten hex digits of the pod's uuid, the interface's index) while the domain is created paused, then moved back into
the pod's namespace under their old names and wired again (``bring_back``; a device that leaves a namespace
loses its qdiscs, and the redirect towards it its target), and only then is the domain resumed. The guest never
runs while a tap is in the host's namespace, and a lent tap gets no IPv6 link-local address there
(``addrgenmode none``), so the host sends nothing through it. A launch killed in between leaves a ``kvt`` tap in
the host's namespace: ``sweep`` (network teardown, gc) deletes the pod's ones, and only tun devices.

Role: the ``ip``/``tc`` batches of taps. Trust boundary: interface and namespace names come from kvmrkt itself
(the pod's uuid, ``ethN``/``tapN``); the guest has no say in any of it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kvmrkt.errors import CommandError, NetworkError
from kvmrkt.host import proc as _proc

NETNS_DIR = Path("/run/netns")
NETNS_NAME = re.compile(r"kvmrkt-[0-9a-f-]{36}")  # network.netns_name(uuid): the namespaces kvmrkt makes
SYS_NET = Path("/sys/class/net")
MAX_NICS = 10  # one digit of host_name; a pod has at most this many CNI interfaces on the libvirt backend


def iproute(*args: str, tool: str = "ip", stdin: str | None = None, netns: str | None = None) -> str:
    """Run ``ip``/``tc`` (in the network namespace at path ``netns``: a namespace of kvmrkt's, named in
    ``NETNS_DIR``, by the tool's own ``-n NAME``; any other path through nsenter)."""
    argv = [_proc.which(tool, hint="apt-get install iproute2"), *args]
    if netns is not None:
        path = Path(netns)
        if path.parent == NETNS_DIR and NETNS_NAME.fullmatch(path.name):
            argv = [argv[0], "-n", path.name, *args]  # one program started instead of two
        else:
            argv = [_proc.which("nsenter", hint="apt-get install util-linux"), f"--net={netns}", *argv]
    try:
        proc = _proc.run(argv, timeout=30, input_bytes=stdin.encode() if stdin is not None else None)
    except CommandError as exc:
        raise NetworkError(f"{tool} {' '.join(args[:4])} failed: {exc.stderr_tail or exc.message}") from None
    return proc.stdout.decode()


def redirects(ifname: str, tap: str) -> str:
    """The ``tc -batch`` lines that send every frame arriving on ``ifname`` out of ``tap`` and back."""
    return "".join(f"qdisc add dev {src} ingress\n"
                   f"filter add dev {src} parent ffff: protocol all u32 match u32 0 0 "
                   f"action mirred egress redirect dev {dst}\n"
                   for src, dst in ((ifname, tap), (tap, ifname)))


def host_name(uuid: str, index: int) -> str:
    """The name of a pod's tap while it is lent to the host's namespace (15 characters at most)."""
    if not 0 <= index < MAX_NICS:
        raise NetworkError(f"the libvirt backend carries at most {MAX_NICS} CNI interfaces per pod")
    return f"kvt{uuid.replace('-', '')[:10]}{index}"


def lend(netns: str, taps: list[tuple[str, str]]) -> None:
    """Move each (tap, host name) from the pod's namespace at ``netns`` into this process's namespace."""
    batch = "".join(f"link set dev {tap} netns {os.getpid()} name {host}\n" for tap, host in taps)
    iproute("-batch", "-", stdin=batch, netns=netns)
    iproute("-batch", "-", stdin="".join(f"link set dev {host} addrgenmode none\n" for _, host in taps))


def bring_back(netns: str, nics: list[tuple[str, str, str]]) -> None:
    """Move each lent tap (interface, tap, host name) back into the pod's namespace as ``tap`` and redirect its
    interface's frames to it again."""
    iproute("-batch", "-", stdin="".join(f"link set dev {host} netns {netns} name {tap}\n" for _, tap, host in nics))
    iproute("-batch", "-", stdin="".join(f"link set dev {tap} up\n" for _, tap, _ in nics), netns=netns)
    wiring = "".join(f"qdisc del dev {ifname} ingress\n" + redirects(ifname, tap) for ifname, tap, _ in nics)
    iproute("-batch", "-", tool="tc", stdin=wiring, netns=netns)


def sweep(uuid: str) -> list[str]:
    """Delete the pod's taps left lent in this namespace (a launch killed between ``lend`` and ``bring_back``);
    returns their names. Only tun devices with the pod's names are touched."""
    left = [host_name(uuid, i) for i in range(MAX_NICS) if (SYS_NET / host_name(uuid, i) / "tun_flags").exists()]
    if left:
        iproute("-force", "-batch", "-", stdin="".join(f"link delete dev {name}\n" for name in left))
    return left
