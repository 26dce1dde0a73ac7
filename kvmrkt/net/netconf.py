"""Pure parts of pod networking: ``--net``/``--port``/``--dns*``/``--hosts-entry`` parsing, CNI network
config loading, CNI result reading, and the files (resolv.conf, hosts, hostname) every app gets.

Role: turn flags and ``net.d`` files into validated values; no processes, no namespaces (``kvmrkt.net.network``
does that). Trust boundary: flags come from the operator and ``net.d`` from config management; both are
validated strictly here, with errors naming the flag or file. CNI plugin output is parsed defensively (it is
a host program's output, but malformed output must give an error, not a crash).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from kvmrkt import jsondoc
from kvmrkt.errors import ConfigError, NetworkError
from kvmrkt.pods.manifest import DNS_NAME_RE

NONE = "none"
USER = "user"
DEFAULT = "default"
FIREWALL_PLUGIN = "kvmrkt-firewall"  # the chained plugin kvmrkt runs itself (kvmrkt.net.firewall)
_FIREWALL_KEYS = frozenset({"type", "masquerade", "name", "cniVersion", "prevResult", "runtimeConfig"})
NET_DIR = "net.d"
_NET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}\Z")
# QEMU user-mode networking's fixed addresses (slirp defaults).
USER_NET, USER_ADDR, USER_PREFIX, USER_GATEWAY, USER_DNS = "10.0.2.0", "10.0.2.15", 24, "10.0.2.2", "10.0.2.3"
ANY_V4 = "0.0.0.0"  # noqa: S104 (a route destination, not a bind address)


@dataclass(frozen=True, slots=True)
class NetRequest:
    """One entry of ``--net``: a CNI network name and the CNI_ARGS given after ``:``."""

    name: str
    args: str = ""


@dataclass(frozen=True, slots=True)
class PortRequest:
    """One ``--port``: an image port name or a pod port number, to a host port (and optionally address)."""

    pod: str
    host_port: int
    host_ip: str = ""


@dataclass(frozen=True, slots=True)
class PortForward:
    """A resolved port forward."""

    protocol: str
    pod_port: int
    host_port: int
    host_ip: str = ""

    def cni(self) -> dict[str, Any]:
        """The entry of the CNI ``portMappings`` capability."""
        out: dict[str, Any] = {"hostPort": self.host_port, "containerPort": self.pod_port, "protocol": self.protocol}
        if self.host_ip:
            out["hostIP"] = self.host_ip
        return out


@dataclass(frozen=True, slots=True)
class DnsOptions:
    """``--dns`` (servers, or ``host``/``none``), ``--dns-search``, ``--dns-opt``, ``--dns-domain`` and
    ``--hosts-entry`` (``IP=HOSTNAME`` or ``host``)."""

    servers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    domain: str = ""
    hosts: tuple[tuple[str, str], ...] = ()
    dns_host: bool = False
    dns_none: bool = False
    hosts_host: bool = False


@dataclass(frozen=True, slots=True)
class NetOptions:
    """Everything networking-related that ``run``/``run-prepared`` take."""

    nets: tuple[NetRequest, ...] = ()  # empty: [network] default from config
    ports: tuple[PortRequest, ...] = ()
    dns: DnsOptions = field(default_factory=DnsOptions)


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """A CNI network as a conflist (a single-plugin ``.conf`` is turned into a one-element list)."""

    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]
    source: str

    @property
    def ip_masq(self) -> bool:
        return any(p.get("ipMasq") is True or (p.get("type") == FIREWALL_PLUGIN and p.get("masquerade") is True)
                   for p in self.plugins)

    def has_capability(self, cap: str) -> bool:
        return any(isinstance(p.get("capabilities"), dict) and p["capabilities"].get(cap) for p in self.plugins)

    def with_portmap(self) -> NetworkConfig:
        """This network with the CNI ``portmap`` plugin chained last when no plugin takes port mappings."""
        if self.has_capability("portMappings"):
            return self
        if _version_tuple(self.cni_version) < (0, 3, 0):
            raise ConfigError(f"network {self.name!r} ({self.source}) uses CNI {self.cni_version}; port forwarding "
                              "through portmap needs cniVersion 0.3.0 or later")
        portmap = {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True}
        return NetworkConfig(self.name, self.cni_version, (*self.plugins, portmap), self.source)

    def to_dict(self) -> dict[str, Any]:
        return {"cniVersion": self.cni_version, "name": self.name, "plugins": list(self.plugins),
                "source": self.source}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkConfig:
        return cls(d["name"], d["cniVersion"], tuple(d["plugins"]), d.get("source", ""))


def _version_tuple(v: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in v.split("."))
    except ValueError:
        return (0,)


# --- flags ----------------------------------------------------------------------------------------------


def parse_nets(values: tuple[str, ...]) -> tuple[NetRequest, ...]:
    """``--net`` values (each a comma list of ``NAME[:CNI_ARGS]``; ``none``, ``user`` and ``default`` are
    names too). ``none`` and ``user`` cannot be combined with anything else.

    Raises:
        ConfigError: bad name, ``host``, a network given twice, or ``none``/``user`` mixed with others.
    """
    out: list[NetRequest] = []
    for value in values:
        for item in value.split(","):
            name, _, args = item.strip().partition(":")
            if not name:
                raise ConfigError(f"--net: empty network name in {value!r}")
            if name == "host":
                raise ConfigError("--net=host is not possible: every kvmrkt pod is a VM with its own kernel and "
                                  "network stack", hint="use --net=default with --port, or --net=user")
            if not _NET_NAME_RE.match(name):
                raise ConfigError(f"--net: invalid network name {name[:80]!r}")
            if name in (NONE, USER) and args:
                raise ConfigError(f"--net={name} takes no CNI arguments")
            if any(r.name == name for r in out):
                raise ConfigError(f"--net: network {name!r} given twice (a pod joins each network once)")
            _check_cni_args(args)
            out.append(NetRequest(name, args))
    if len(out) > 1 and any(r.name in (NONE, USER) for r in out):
        raise ConfigError("--net=none and --net=user cannot be combined with other networks")
    return tuple(out)


def _check_cni_args(args: str) -> None:
    for pair in filter(None, args.split(";")):
        key, eq, _ = pair.partition("=")
        if not eq or not key:
            raise ConfigError(f"--net: CNI arguments must be KEY=VALUE;..., not {args!r}")


def parse_port(value: str) -> PortRequest:
    """``--port NAME:[HOSTIP:]HOSTPORT`` or ``PODPORT[/PROTO]:[HOSTIP:]HOSTPORT``.

    Raises:
        ConfigError: malformed value, port out of range, bad host address.
    """
    parts = value.split(":")
    if len(parts) not in (2, 3) or not parts[0]:
        raise ConfigError(f"--port {value!r}: expected NAME:[HOSTIP:]HOSTPORT or PODPORT:[HOSTIP:]HOSTPORT")
    host_ip = ""
    if len(parts) == 3:
        try:
            host_ip = str(ipaddress.IPv4Address(parts[1]))
        except ValueError:
            raise ConfigError(f"--port {value!r}: {parts[1]!r} is not an IPv4 address") from None
    return PortRequest(parts[0], _port_number(parts[-1], f"--port {value!r}"), host_ip)


def _port_number(text: str, where: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ConfigError(f"{where}: {text!r} is not a port number (1-65535)")
    return int(text)


def resolve_ports(
    requests: tuple[PortRequest, ...], image_ports: list[tuple[str, str, int]]
) -> tuple[PortForward, ...]:
    """Resolve ``--port`` against the ports the apps' images declare (name, protocol, port).

    A name must be declared by an image; a number (``80``, ``53/udp``) needs no declaration.

    Raises:
        ConfigError: unknown port name, bad protocol, or one host port used twice.
    """
    out: list[PortForward] = []
    for req in requests:
        num, _, proto = req.pod.partition("/")
        if num.isdigit():
            proto = proto or "tcp"
            if proto not in ("tcp", "udp"):
                raise ConfigError(f"--port {req.pod}: protocol must be tcp or udp")
            fwd = PortForward(proto, _port_number(num, f"--port {req.pod}"), req.host_port, req.host_ip)
        else:
            found = [(p, n) for name, p, n in image_ports if name == req.pod]
            if not found:
                names = sorted({name for name, _, _ in image_ports})
                raise ConfigError(f"--port: no app image declares a port named {req.pod!r}",
                                  hint="declared: " + ", ".join(names) if names else "use PODPORT:HOSTPORT")
            fwd = PortForward(found[0][0], found[0][1], req.host_port, req.host_ip)
        if any((f.protocol, f.host_port, f.host_ip) == (fwd.protocol, fwd.host_port, fwd.host_ip) for f in out):
            raise ConfigError(f"--port: host port {fwd.host_port}/{fwd.protocol} is forwarded twice")
        out.append(fwd)
    return tuple(out)


def parse_dns(*, dns: tuple[str, ...], search: tuple[str, ...], opts: tuple[str, ...], domain: str | None,
              hosts: tuple[str, ...]) -> DnsOptions:
    """Validate the DNS and hosts flags (rkt's semantics: ``--dns host`` copies the host's resolv.conf,
    ``--dns none`` ignores what CNI returns; ``--hosts-entry host`` copies the host's /etc/hosts).

    Raises:
        ConfigError: a bad address or name, or ``host``/``none`` mixed with servers.
    """
    servers: list[str] = []
    for value in dns:
        if value in ("host", "none"):
            if len(dns) > 1:
                raise ConfigError(f"--dns={value} cannot be combined with other --dns values")
            continue
        try:
            servers.append(str(ipaddress.ip_address(value)))
        except ValueError:
            raise ConfigError(f"--dns {value!r}: not an IP address (or host, none)") from None
    for name in (*search, *([domain] if domain else [])):
        if not DNS_NAME_RE.match(name):
            raise ConfigError(f"invalid DNS domain {name[:80]!r}")
    for opt in opts:
        if not re.fullmatch(r"[A-Za-z0-9_\-:.]+", opt):
            raise ConfigError(f"--dns-opt {opt[:80]!r}: not a resolv.conf option")
    entries: list[tuple[str, str]] = []
    for value in hosts:
        if value == "host":
            continue
        ip, eq, name = value.partition("=")
        try:
            ip = str(ipaddress.ip_address(ip))
            if not eq:
                raise ValueError
        except ValueError:
            raise ConfigError(f"--hosts-entry {value!r}: expected IP=HOSTNAME (or host)") from None
        if not DNS_NAME_RE.match(name):
            raise ConfigError(f"--hosts-entry {value!r}: {name!r} is not a host name")
        entries.append((ip, name))
    return DnsOptions(servers=tuple(servers), search=tuple(search), options=tuple(opts), domain=domain or "",
                      hosts=tuple(entries), dns_host=dns == ("host",), dns_none=dns == ("none",),
                      hosts_host="host" in hosts)


# --- CNI configs ----------------------------------------------------------------------------------------


def _load_one(path: Path, text: str) -> NetworkConfig:
    try:
        doc = jsondoc.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a CNI network config must be a JSON object")
    name = doc.get("name")
    if not isinstance(name, str) or not _NET_NAME_RE.match(name):
        raise ConfigError(f"{path}: missing or invalid \"name\"")
    version = doc.get("cniVersion", "0.1.0")
    if not isinstance(version, str):
        raise ConfigError(f"{path}: \"cniVersion\" must be a string")
    if "plugins" in doc:
        plugins = doc["plugins"]
        if not isinstance(plugins, list) or not plugins:
            raise ConfigError(f"{path}: \"plugins\" must be a non-empty list")
    else:
        plugins = [{k: v for k, v in doc.items() if k not in ("name", "cniVersion")}]
    for i, plugin in enumerate(plugins):
        if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str) or not re.match(
            r"[A-Za-z0-9_\-]+\Z", plugin["type"]
        ):
            raise ConfigError(f"{path}: plugin {i} has no valid \"type\"")
        if plugin["type"] == FIREWALL_PLUGIN:
            _check_firewall_plugin(plugin, f"{path}: plugin {i}")
    if name in (NONE, USER, "host", "all"):
        raise ConfigError(f"{path}: the network name {name!r} is reserved")
    return NetworkConfig(name, version, tuple(plugins), str(path))


def _check_firewall_plugin(plugin: dict[str, Any], where: str) -> None:
    """Refuse a ``kvmrkt-firewall`` entry with keys or values it does not take (its values become iptables
    rules)."""
    extra = sorted(set(plugin) - _FIREWALL_KEYS)
    if extra:
        raise ConfigError(f"{where}: plugin {FIREWALL_PLUGIN} does not take {', '.join(map(repr, extra))}",
                          hint='it takes only "masquerade": true|false')
    if not isinstance(plugin.get("masquerade", False), bool):
        raise ConfigError(f"{where}: plugin {FIREWALL_PLUGIN}: \"masquerade\" must be true or false")


def load_networks(config_dir: Path) -> dict[str, NetworkConfig]:
    """Every CNI network: ``CONFIG_DIR/net.d/*.conf|*.conflist|*.json`` (sorted by file name), plus kvmrkt's
    own ``default`` network unless a file there defines that name.

    Raises:
        ConfigError: unreadable or invalid file, or two files defining the same network.
    """
    out: dict[str, NetworkConfig] = {}
    net_dir = config_dir / NET_DIR
    files = sorted(p for p in net_dir.iterdir() if p.suffix in (".conf", ".conflist", ".json")) \
        if net_dir.is_dir() else []
    for path in files:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        net = _load_one(path, text)
        if net.name in out:
            raise ConfigError(f"network {net.name!r} is defined twice: {out[net.name].source} and {path}")
        out[net.name] = net
    if DEFAULT not in out:
        shipped = resources.files("kvmrkt.net").joinpath("net.d/99-default.conflist")
        out[DEFAULT] = _load_one(Path(str(shipped)), shipped.read_text())
    return out


def plugin_config(net: NetworkConfig, plugin: dict[str, Any], *, prev: dict[str, Any] | None,
                  runtime: dict[str, Any]) -> dict[str, Any]:
    """The stdin of one plugin in a chain: its config plus name, version, prevResult and the runtime config
    of the capabilities it declares (CNI spec, "Network configuration list runtime")."""
    conf = {k: v for k, v in plugin.items() if k != "capabilities" or v}
    conf["name"] = net.name
    conf["cniVersion"] = net.cni_version
    raw = plugin.get("capabilities")
    caps: dict[str, Any] = raw if isinstance(raw, dict) else {}
    rc = {k: v for k, v in runtime.items() if caps.get(k)}
    if rc:
        conf["runtimeConfig"] = rc
    if prev is not None:
        conf["prevResult"] = prev
    return conf


def supports_prev_result(net: NetworkConfig) -> bool:
    """Chained results (prevResult) exist from CNI 0.3.0; DEL gets one from 0.4.0."""
    return _version_tuple(net.cni_version) >= (0, 4, 0)


# --- CNI results ----------------------------------------------------------------------------------------


def result_ips(result: dict[str, Any]) -> list[dict[str, str]]:
    """Addresses in a CNI result of any version: [{"address": "10.1.2.3/24", "gateway": "10.1.2.1"}]."""
    ips: list[dict[str, str]] = []
    for key in ("ip4", "ip6"):  # 0.1.0 / 0.2.0
        entry = result.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("ip"), str):
            ips.append({"address": entry["ip"], "gateway": str(entry.get("gateway") or "")})
    for entry in result.get("ips") or []:  # 0.3.0 and later
        if isinstance(entry, dict) and isinstance(entry.get("address"), str):
            ips.append({"address": entry["address"], "gateway": str(entry.get("gateway") or "")})
    for ip in ips:
        try:
            ipaddress.ip_interface(ip["address"])
        except ValueError:
            raise NetworkError(f"CNI plugin returned an invalid address {ip['address'][:80]!r}") from None
    return ips


def result_dns(result: dict[str, Any]) -> dict[str, Any]:
    """The ``dns`` block of a CNI result, with only well-formed fields kept."""
    raw = result.get("dns")
    dns: dict[str, Any] = raw if isinstance(raw, dict) else {}
    out: dict[str, Any] = {}
    for key in ("nameservers", "search", "options"):
        values = dns.get(key)
        if isinstance(values, list):
            out[key] = [v for v in values if isinstance(v, str) and v and "\n" not in v]
    if isinstance(dns.get("domain"), str) and DNS_NAME_RE.match(dns["domain"]):
        out["domain"] = dns["domain"]
    return out


# --- files every app gets -------------------------------------------------------------------------------


def resolv_conf(dns: DnsOptions, cni_dns: list[dict[str, Any]], *, user_mode: bool, host_resolv: str) -> str | None:
    """The pod's /etc/resolv.conf, or None to leave each image's own file alone.

    Order of precedence (rkt's): ``--dns host`` copies the host's file; ``--dns`` servers; the first CNI result
    that returns nameservers (unless ``--dns none``); QEMU's built-in resolver in user mode. ``--dns-search``,
    ``--dns-opt`` and ``--dns-domain`` are added to whichever applies (alone, they make a file of their own).
    """
    if dns.dns_host:
        return host_resolv
    servers, search, options, domain = list(dns.servers), list(dns.search), list(dns.options), dns.domain
    if not servers and not dns.dns_none:
        for d in cni_dns:
            if d.get("nameservers"):
                servers = list(d["nameservers"])
                search = search or list(d.get("search", []))
                options = options or list(d.get("options", []))
                domain = domain or d.get("domain", "")
                break
        if not servers and user_mode:
            servers = [USER_DNS]
    if not (servers or search or options or domain):
        return None
    lines = [f"nameserver {s}" for s in servers]
    if domain:
        lines.append(f"domain {domain}")
    if search:
        lines.append("search " + " ".join(search))
    if options:
        lines.append("options " + " ".join(options))
    return "\n".join(lines) + "\n"


def hosts_file(dns: DnsOptions, *, hostname: str, pod_ip: str | None, host_hosts: str) -> str:
    """The pod's /etc/hosts: localhost, the pod's hostname on its first address, then ``--hosts-entry``
    entries (``--hosts-entry host`` starts from the host's file instead)."""
    if dns.hosts_host:
        text = host_hosts if host_hosts.endswith("\n") or not host_hosts else host_hosts + "\n"
    else:
        text = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    short = hostname.split(".")[0]
    names = hostname if short == hostname else f"{hostname} {short}"
    text += f"{pod_ip or '127.0.1.1'}\t{names}\n"
    text += "".join(f"{ip}\t{name}\n" for ip, name in dns.hosts)
    return text
