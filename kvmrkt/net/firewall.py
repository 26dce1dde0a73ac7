"""kvmrkt's built-in chained CNI plugin ``kvmrkt-firewall``: what the ``firewall`` plugin and ``ptp``'s
``ipMasq`` do for a pod, as one atomic ``iptables-restore`` per address family instead of 29 ``iptables``
programs (each plugin probes, checks and appends rule by rule).

Role: for each address of the previous plugin's result (the pod's IPs): accept forwarded traffic from the pod and
replies to it (``FORWARD``, inserted first, so a host whose forward policy is DROP still routes pods), and with
``"masquerade": true`` a per-pod ``nat`` chain that masquerades everything leaving the pod's subnet (multicast
excepted), jumped to from ``POSTROUTING``. Every rule carries the comment CNI's plugins use
(``name: "NET" id: "POD"``), so leak checks and operators find them the same way. ADD is one transaction, so
DEL finds all of a pod's rules or none; DEL removes exactly the rules carrying the pod's comment (read back from
``iptables-save`` when the direct delete finds them gone), and is idempotent. Trust boundary: the config comes
from ``net.d`` (config management, validated by ``kvmrkt.net.netconf``); the addresses come from the previous plugin,
a host program, and are parsed as IP addresses before any becomes part of a rule; nothing comes from the guest.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any

from kvmrkt.errors import CommandError, ConfigError, NetworkError
from kvmrkt.host import proc as _proc
from kvmrkt.net.netconf import FIREWALL_PLUGIN, result_ips

TYPE = FIREWALL_PLUGIN
TOOLS = {4: ("iptables-restore", "iptables-save"), 6: ("ip6tables-restore", "ip6tables-save")}
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}


def chain(net: str, pod: str) -> str:
    """The pod's own chain (28 characters at most, as iptables requires)."""
    return "KVMRKT-" + hashlib.sha256(f"{net}\0{pod}".encode()).hexdigest()[:20].upper()


def _comment(net: str, pod: str) -> str:
    return f'-m comment --comment "name: \\"{net}\\" id: \\"{pod}\\""'


def _addresses(prev: Any) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """The pod's addresses in the previous plugin's result (any CNI version: ``netconf.result_ips``)."""
    if not isinstance(prev, dict):
        raise NetworkError(f"{TYPE} must follow a plugin that assigns addresses (it got no prevResult)")
    try:
        out = [ipaddress.ip_interface(ip["address"]) for ip in result_ips(prev)]
    except NetworkError as exc:
        raise NetworkError(f"{TYPE}: the previous plugin's result has an address that is not one "
                           f"({exc.message})") from None
    if not out:
        raise NetworkError(f"{TYPE}: the previous plugin's result has no address")
    return out


def _rules(net: str, pod: str, addr: ipaddress.IPv4Interface | ipaddress.IPv6Interface, masquerade: bool,
           ) -> tuple[list[str], list[str]]:
    """(nat, filter) rules for one address, as ``-A``/``-I`` lines without their verb's table."""
    c, ch, host = _comment(net, pod), chain(net, pod), addr.ip.compressed + f"/{addr.max_prefixlen}"
    filt = [f"FORWARD -d {host} -m conntrack --ctstate RELATED,ESTABLISHED {c} -j ACCEPT",
            f"FORWARD -s {host} {c} -j ACCEPT"]
    nat = [f"{ch} -d {addr.network.compressed} {c} -j ACCEPT",
           f"{ch} ! -d {MULTICAST[addr.version]} {c} -j MASQUERADE",
           f"POSTROUTING -s {host} {c} -j {ch}"] if masquerade else []
    return nat, filt


def _restore(version: int, text: str) -> None:
    _proc.run([_proc.which(TOOLS[version][0], hint="apt-get install iptables"), "--noflush", "-w", "5"],
              input_bytes=text.encode(), timeout=30, what=TOOLS[version][0])


def _transaction(net: str, pod: str, addrs: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
                 masquerade: bool, *, adding: bool) -> str:
    """The ``iptables-restore`` input that installs (``adding``) or deletes the rules for ``addrs`` (one family)."""
    nat, filt = [], []
    for a in addrs:
        n, f = _rules(net, pod, a, masquerade)
        nat += [("-I " if r.startswith("POSTROUTING") else "-A ") + r if adding else f"-D {r}" for r in n]
        filt += [("-I " if adding else "-D ") + r for r in f]
    ch, text = chain(net, pod), ""
    if nat:
        text = "*nat\n" + (f":{ch} - [0:0]\n" if adding else "") + "\n".join(nat) \
            + ("" if adding else f"\n-X {ch}") + "\nCOMMIT\n"
    return text + "*filter\n" + "\n".join(filt) + "\nCOMMIT\n"


def add(conf: dict[str, Any], *, pod: str) -> dict[str, Any]:
    """CNI ADD: install the pod's rules (one transaction per address family) and pass the result through.

    Raises:
        NetworkError: no usable prevResult, or iptables refused the rules (nothing was installed).
    """
    net, masquerade = str(conf["name"]), conf.get("masquerade") is True
    prev = conf.get("prevResult")
    addrs = _addresses(prev)
    for version in (4, 6):
        mine = [a for a in addrs if a.version == version]
        if not mine:
            continue
        try:
            _restore(version, _transaction(net, pod, mine, masquerade, adding=True))
        except CommandError as exc:
            raise NetworkError(f"{TYPE}: iptables refused the rules of pod {pod}: {exc.stderr_tail or exc.message}",
                               hint="is the iptables package installed and the kernel's netfilter usable?") from None
    return prev if isinstance(prev, dict) else {}


def delete(conf: dict[str, Any], *, pod: str) -> None:
    """CNI DEL: remove every rule of the pod's (idempotent: rules already gone are fine). With a prevResult the
    rules are deleted as ADD made them, in one transaction; if that fails (or there is no prevResult), whatever
    still carries the pod's comment is found in ``iptables-save`` and removed.

    Raises:
        NetworkError: iptables refused to remove rules that are there.
    """
    net, masquerade = str(conf["name"]), conf.get("masquerade") is True
    prev = conf.get("prevResult")
    try:
        addrs = _addresses(prev) if prev is not None else []
    except NetworkError:
        addrs = []
    for version in (4, 6):
        mine = [a for a in addrs if a.version == version]
        if addrs and not mine:
            continue  # ADD installed nothing for this family
        if mine:
            try:
                _restore(version, _transaction(net, pod, mine, masquerade, adding=False))
                continue
            except CommandError:
                pass  # some are gone already (a DEL repeated by gc): remove what is left, by its comment
        _sweep(version, net, pod)


def _sweep(version: int, net: str, pod: str) -> None:
    """Remove every rule carrying the pod's comment, and its chain, from what ``iptables-save`` shows."""
    save = TOOLS[version][1]
    try:
        out = _proc.run([_proc.which(save, hint="apt-get install iptables")], timeout=30).stdout.decode()
    except ConfigError:
        if version == 6:
            return  # no ip6tables: nothing of IPv6 was ever installed
        raise
    except CommandError as exc:
        raise NetworkError(f"{TYPE}: cannot read the rules ({save}): {exc.stderr_tail or exc.message}") from None
    marker, ch = f'id: \\"{pod}\\"', chain(net, pod)
    tables: dict[str, list[str]] = {}
    table = ""
    for line in out.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A ") and (marker in line or line.split()[1] == ch):
            tables.setdefault(table, []).append("-D " + line[3:])
        elif line.startswith(f":{ch} "):
            tables.setdefault(table, [])
            tables[table].append(f"-X {ch}")  # after the deletes above it: a chain is removed once empty
    if not tables:
        return
    text = "".join(f"*{t}\n" + "\n".join(sorted(lines, key=lambda x: x.startswith("-X"))) + "\nCOMMIT\n"
                   for t, lines in tables.items())
    try:
        _restore(version, text)
    except CommandError as exc:
        raise NetworkError(f"{TYPE}: cannot remove the rules of pod {pod}: {exc.stderr_tail or exc.message}") \
            from None
