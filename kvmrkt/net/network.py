"""Pod networking on the host: a network namespace per pod, the real CNI plugins run in it, a tap joined to
each CNI interface by tc mirred redirects (Kata's "tcfilter" model, so every plugin type works unchanged), and
teardown (CNI DEL, namespace removal) that also works after ``kvmrkt run`` was SIGKILLed.

Role: the only module that creates or removes host network state. What it creates is recorded in the pod
directory (``net.json``) *before* it is created, so gc can always undo it. Trust boundary: CNI configs come
from ``net.d`` (config management) and were validated by ``kvmrkt.net.netconf``; plugins are host programs run
as root with that config; their JSON output is parsed defensively. The guest never influences any of this:
the VM's QEMU runs inside the pod namespace, so it sees only the pod's own interfaces.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmrkt import jsondoc
from kvmrkt.config import RuntimeConfig
from kvmrkt.errors import CommandError, ConfigError, NetworkError
from kvmrkt.host import proc as _proc
from kvmrkt.net import firewall, taps
from kvmrkt.net.netconf import (
    ANY_V4,
    NONE,
    USER,
    USER_ADDR,
    USER_GATEWAY,
    USER_NET,
    USER_PREFIX,
    DnsOptions,
    NetOptions,
    NetworkConfig,
    PortForward,
    hosts_file,
    load_networks,
    parse_nets,
    plugin_config,
    resolv_conf,
    resolve_ports,
    result_dns,
    result_ips,
    supports_prev_result,
)
from kvmrkt.net.nsguard import check_pod_namespace
from kvmrkt.net.taps import NETNS_DIR
from kvmrkt.pods.manifest import PodManifest
from kvmrkt.pods.pod import Pod
from kvmrkt.stage1 import NetworkPlan, Nic

JOIN = "join"
STATE = "net.json"
CNI_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Attachment:
    """One CNI network a pod joins, under the interface name ``ifname`` in the pod namespace."""

    net: NetworkConfig
    ifname: str
    args: str = ""
    runtime: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Intent:
    """A validated plan for a pod's networking, made before anything is created. Modes: none, user, cni (kvmrkt
    makes a namespace and runs CNI), join (a namespace someone else made, at path ``netns``: an OCI bundle's)."""

    mode: str
    attachments: tuple[Attachment, ...] = ()
    forwards: tuple[PortForward, ...] = ()
    dns: DnsOptions = field(default_factory=DnsOptions)
    netns: str = ""
    files: bool = True  # write hostname/hosts/resolv.conf into the apps (not into an OCI bundle's rootfs)


def netns_name(uuid: str) -> str:
    """The pod's namespace name (``ip netns exec kvmrkt-UUID ...`` works on it)."""
    return f"kvmrkt-{uuid}"


def guest_mac(uuid: str, index: int) -> str:
    """A stable locally administered MAC for a user-mode NIC."""
    raw = bytes.fromhex(uuid.replace("-", "")[:8])
    return "02:6b:" + ":".join(f"{b:02x}" for b in raw[:3]) + f":{index:02x}"


def _parse_json_stream(text: str) -> list[Any]:
    """Several JSON documents one after the other (``ip -json -batch`` prints one per command)."""
    dec = json.JSONDecoder()
    out: list[Any] = []
    i = 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        doc, i = dec.raw_decode(text, i)
        out.append(doc)


def routes_for_guest(routes: list[dict[str, Any]]) -> tuple[tuple[str, int, str], ...]:
    """IPv4 routes of one interface in the pod namespace (``ip -j route show dev IF``) as guest routes:
    on-link routes first, so gateways are reachable when the routes through them are added."""
    out: list[tuple[str, int, str]] = []
    for r in routes:
        if r.get("type", "unicast") != "unicast" or not isinstance(r.get("dst"), str):
            continue
        dst = "0.0.0.0/0" if r["dst"] == "default" else r["dst"]
        try:
            net = ipaddress.IPv4Network(dst, strict=False)
        except ValueError:
            continue
        out.append((str(net.network_address), net.prefixlen, str(r.get("gateway") or "")))
    return tuple(sorted(out, key=lambda r: (r[2] != "", -r[1])))


class PodNetworks:
    """Sets up and tears down the networks of pods."""

    def __init__(self, config: RuntimeConfig, *, warn: Callable[[str], None] = lambda _m: None) -> None:
        self.config = config
        self.warn = warn

    # --- planning (no side effects) -----------------------------------------------------------------

    def intent(self, opts: NetOptions, image_ports: list[tuple[str, str, int]], *, modes: frozenset[str],
               user_forwards: bool) -> Intent:
        """Check the requested networks, ports and DNS flags before anything is created.

        Raises:
            ConfigError: unknown network, mode the backend cannot run, bad port.
        """
        nets = opts.nets or parse_nets((self.config.network.default,))
        forwards = resolve_ports(opts.ports, image_ports)
        first = nets[0].name
        mode = first if first in (NONE, USER) else "cni"
        if mode not in modes:
            raise ConfigError(f"this stage1 backend cannot run --net={','.join(n.name for n in nets)}",
                              hint="use --stage1=qemu, or --net=none / --net=user")
        if mode == NONE:
            if forwards:
                raise ConfigError("--port needs a network: --net=none has none", hint="use --net=default")
            return Intent(NONE, dns=opts.dns)
        if mode == USER:
            if forwards and not user_forwards:
                raise ConfigError("this stage1 backend cannot forward ports with --net=user",
                                  hint="use --stage1=qemu")
            return Intent(USER, forwards=forwards, dns=opts.dns)
        known = load_networks(self.config.config_dir)
        missing = [n.name for n in nets if n.name not in known]
        if missing:
            raise ConfigError(f"unknown network(s): {', '.join(missing)}",
                              hint=f"define them in {self.config.config_dir / 'net.d'}; known: "
                                   + ", ".join(sorted(known)))
        configs = [known[n.name] for n in nets]
        # rkt's rule: forwards go to the first network that masquerades, else the last one.
        fwd_index = next((i for i, c in enumerate(configs) if c.ip_masq), len(configs) - 1)
        attachments = []
        for i, (req, net) in enumerate(zip(nets, configs, strict=True)):
            runtime: dict[str, Any] = {}
            if forwards and i == fwd_index:
                net = net.with_portmap()
                runtime["portMappings"] = [f.cni() for f in forwards]
            attachments.append(Attachment(net, f"eth{i}", req.args, runtime))
        return Intent("cni", tuple(attachments), forwards, opts.dns)

    # --- setup ---------------------------------------------------------------------------------------

    def setup(self, pod: Pod, manifest: PodManifest, intent: Intent, *, owner: tuple[int, int]) -> NetworkPlan:
        """Create the pod's networking and describe it for the VM; its taps belong to ``owner`` (uid, gid: the
        pod's unprivileged VMM opens them without privileges).

        Every step is recorded in the pod directory before it is taken; on failure the caller runs
        ``teardown`` (which is also what gc runs).

        Raises:
            NetworkError: a plugin, ``ip`` or ``tc`` failed.
        """
        state: dict[str, Any] = {"mode": intent.mode, "active": True, "netns": "", "networks": [],
                                 "forwards": [f.cni() for f in intent.forwards]}
        hostname = manifest.hostname
        if intent.mode == NONE:
            pod.write_json(STATE, {**state, "active": False})
            files = self._files(intent.dns, hostname, None, [], user_mode=False) if intent.files else ()
            return NetworkPlan(NONE, files=files)
        if intent.mode == USER:
            nic = Nic("eth0", guest_mac(pod.uuid, 0), 1500, None, ((USER_ADDR, USER_PREFIX),),
                      ((USER_NET, USER_PREFIX, ""), (ANY_V4, 0, USER_GATEWAY)))
            state["networks"] = [{"name": USER, "ifname": "eth0", "mac": nic.mac,
                                  "ips": [{"address": f"{USER_ADDR}/{USER_PREFIX}", "gateway": USER_GATEWAY}]}]
            pod.write_json(STATE, {**state, "active": False})
            return NetworkPlan(USER, nics=(nic,),
                               forwards=tuple((f.protocol, f.host_ip, f.host_port, f.pod_port)
                                              for f in intent.forwards),
                               files=self._files(intent.dns, hostname, USER_ADDR, [], user_mode=True))
        if intent.mode == JOIN:
            return self._join(pod, intent.netns, owner)
        name = netns_name(pod.uuid)
        netns = str(NETNS_DIR / name)
        state["netns"] = name
        state["networks"] = [{"name": a.net.name, "ifname": a.ifname, "args": a.args, "runtime": a.runtime,
                              "config": a.net.to_dict(), "result": None} for a in intent.attachments]
        pod.write_json(STATE, state)
        self._iproute("netns", "add", name)
        for entry, att in zip(state["networks"], intent.attachments, strict=True):
            entry["added"] = True
            pod.write_json(STATE, state)
            entry["result"] = self._add(pod.uuid, netns, att)
            entry["ips"] = result_ips(entry["result"])
            pod.write_json(STATE, state)
        nics = self._join_taps(netns, [a.ifname for a in intent.attachments], owner, lo_up=True)
        for entry, nic in zip(state["networks"], nics, strict=True):
            entry["mac"] = nic.mac
            entry["tap"] = nic.tap
        pod.write_json(STATE, state)
        first_ip = next((a for n in nics for a, _ in n.addrs), None)
        dns = [result_dns(e["result"]) for e in state["networks"]]
        return NetworkPlan("cni", netns=netns, nics=nics,
                           files=self._files(intent.dns, hostname, first_ip, dns, user_mode=False))

    def _join(self, pod: Pod, netns: str, owner: tuple[int, int]) -> NetworkPlan:
        """Carry every interface of an existing namespace into the VM; the namespace, its addresses and routes
        stay its owner's (no files are written: the engine that made it manages resolv.conf and hosts). Only a
        namespace that is provably the pod's own is touched (``nsguard``)."""
        check_pod_namespace(netns)
        links = json.loads(self._iproute("-j", "link", "show", netns=netns) or "[]")
        ifnames = [str(link["ifname"]) for link in links
                   if link.get("link_type") == "ether" and not str(link["ifname"]).startswith("tap")]
        nets = [{"name": n, "ifname": n, "tap": f"tap{i}"} for i, n in enumerate(ifnames)]
        state: dict[str, Any] = {"mode": JOIN, "active": True, "netns": netns, "forwards": [], "networks": nets}
        pod.write_json(STATE, state)
        nics = self._join_taps(netns, ifnames, owner)
        for entry, nic in zip(state["networks"], nics, strict=True):
            entry.update(mac=nic.mac, ips=[{"address": f"{ip}/{p}", "gateway": ""} for ip, p in nic.addrs])
        pod.write_json(STATE, state)
        return NetworkPlan("cni", netns=netns, nics=nics)

    def _files(self, dns: DnsOptions, hostname: str, pod_ip: str | None, cni_dns: list[dict[str, Any]], *,
               user_mode: bool) -> tuple[tuple[str, str], ...]:
        files = [("/etc/hostname", hostname + "\n"),
                 ("/etc/hosts", hosts_file(dns, hostname=hostname, pod_ip=pod_ip,
                                           host_hosts=_read_host_file("/etc/hosts") if dns.hosts_host else ""))]
        resolv = resolv_conf(dns, cni_dns, user_mode=user_mode,
                             host_resolv=_read_host_file("/etc/resolv.conf") if dns.dns_host else "")
        if resolv is not None:
            files.append(("/etc/resolv.conf", resolv))
        return tuple(files)

    @staticmethod
    def _iproute(*args: str, tool: str = "ip", stdin: str | None = None, netns: str | None = None) -> str:
        return taps.iproute(*args, tool=tool, stdin=stdin, netns=netns)

    def _join_taps(self, netns: str, ifnames: list[str], owner: tuple[int, int], *,
                   lo_up: bool = False) -> tuple[Nic, ...]:
        """A tap per interface of the namespace at ``netns`` owned by ``owner`` (uid, gid), with every frame
        redirected between the two (tc mirred), and the interface's MAC, MTU, IPv4 addresses and routes read
        back for the guest; ``lo_up``: the namespace is ours, its loopback is brought up with the taps."""
        shows = "".join(f"addr show dev {name}\nroute show dev {name}\n" for name in ifnames)
        docs = _parse_json_stream(self._iproute("-j", "-batch", "-", stdin=shows, netns=netns))
        if len(docs) != 2 * len(ifnames):
            raise NetworkError(f"could not read the interfaces in {netns}")
        made, redirects, nics = [], [], []
        for i, name in enumerate(ifnames):
            link, routes = docs[2 * i], docs[2 * i + 1]
            if not link:
                raise NetworkError(f"no interface {name} in {netns}")
            info = link[0]
            tap = f"tap{i}"
            mtu = int(info.get("mtu", 1500))
            made.append(f"tuntap add dev {tap} mode tap user {owner[0]} group {owner[1]}\n"
                        f"link set dev {tap} mtu {mtu} up\n")
            redirects.append(taps.redirects(name, tap))
            addrs = tuple((a["local"], int(a["prefixlen"])) for a in info.get("addr_info", [])
                          if a.get("family") == "inet")
            if not addrs:
                self.warn(f"interface {name} in {netns} has no IPv4 address; the guest configures IPv4 only")
            nics.append(Nic(name, str(info["address"]), mtu, tap, addrs, routes_for_guest(routes)))
        self._iproute("-batch", "-", stdin=("link set dev lo up\n" if lo_up else "") + "".join(made), netns=netns)
        try:
            self._iproute("-batch", "-", tool="tc", stdin="".join(redirects), netns=netns)
        except NetworkError as exc:
            raise NetworkError(f"cannot redirect the interfaces of {netns} to the VM: {exc.message}",
                               hint="each network namespace can carry one VM (is another container using it?)"
                               ) from None
        return tuple(nics)

    # --- CNI ----------------------------------------------------------------------------------------

    def _plugin(self, kind: str) -> Path:
        for d in self.config.network.plugin_dirs:
            path = Path(d) / kind
            if os.access(path, os.X_OK):
                return path
        raise ConfigError(f"CNI plugin {kind!r} not found in {', '.join(self.config.network.plugin_dirs)}",
                          hint="apt-get install containernetworking-plugins, or set network.plugin_dirs")

    def _cni(self, command: str, net: NetworkConfig, plugin: dict[str, Any], conf: dict[str, Any], *, uuid: str,
             netns: str, ifname: str, args: str) -> dict[str, Any]:
        if plugin["type"] == firewall.TYPE:  # built in: run here, not as a program
            if command == "ADD":
                return firewall.add(conf, pod=uuid)
            firewall.delete(conf, pod=uuid)
            return {}
        env = {
            "CNI_COMMAND": command, "CNI_CONTAINERID": uuid, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
            "CNI_ARGS": ";".join(filter(None, ["IgnoreUnknown=1", args])),
            "CNI_PATH": ":".join(self.config.network.plugin_dirs),
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }  # fmt: skip
        proc = _proc.run([self._plugin(plugin["type"])], input_bytes=json.dumps(conf).encode(), env=env,
                         timeout=CNI_TIMEOUT, check=False)
        out = proc.stdout.decode("utf-8", "replace")
        try:
            doc = jsondoc.loads(out) if out.strip() else {}
        except ValueError:
            doc = None
        if proc.returncode != 0:
            msg = doc.get("msg") if isinstance(doc, dict) else None
            detail = doc.get("details") if isinstance(doc, dict) else None
            text = msg or _proc.tail(proc.stderr or out, 3) or f"exit code {proc.returncode}"
            raise NetworkError(f"CNI {command} for network {net.name!r}: plugin {plugin['type']} failed: {text}"
                               + (f" ({detail})" if detail else ""), hint=f"network config: {net.source}")
        if not isinstance(doc, dict):
            raise NetworkError(f"CNI {command} for network {net.name!r}: plugin {plugin['type']} printed "
                               "something that is not a JSON object")
        return doc

    def _add(self, uuid: str, netns: str, att: Attachment) -> dict[str, Any]:
        prev: dict[str, Any] | None = None
        for plugin in att.net.plugins:
            conf = plugin_config(att.net, plugin, prev=prev, runtime=att.runtime)
            prev = self._cni("ADD", att.net, plugin, conf, uuid=uuid, netns=netns, ifname=att.ifname, args=att.args)
        return prev or {}

    # --- teardown -----------------------------------------------------------------------------------

    def teardown(self, pod: Pod) -> None:
        """Undo whatever ``setup`` recorded: CNI DEL for every network (plugins in reverse order), then the
        namespace (and with it the taps; lent ones in the host's namespace too: ``taps.sweep``). Idempotent.

        Raises:
            NetworkError: some step failed; the record stays active so the next gc tries again.
        """
        state = pod.read_json(STATE)
        if not isinstance(state, dict) or not state.get("active"):
            return
        errors: list[str] = []
        try:
            taps.sweep(pod.uuid)  # a libvirt pod's taps, if its launch was killed while they were lent
        except NetworkError as exc:
            errors.append(exc.message)
        if state.get("mode") == JOIN:
            if not errors:
                self._unjoin(pod, state)
                return
        else:
            errors += self._delete_networks(pod, state)
        if errors:
            pod.write_json(STATE, {**state, "teardown_errors": errors})
            raise NetworkError(f"network teardown of pod {pod.uuid} incomplete: " + "; ".join(errors),
                               hint="fix the cause and run `kvmrkt gc` again")
        pod.write_json(STATE, {**state, "active": False, "teardown_errors": []})

    def _delete_networks(self, pod: Pod, state: dict[str, Any]) -> list[str]:
        """CNI DEL of every network added (plugins in reverse order), then our namespace; returns the errors."""
        errors: list[str] = []
        name = str(state.get("netns") or "")
        netns = str(NETNS_DIR / name) if name else ""
        for entry in reversed(state.get("networks", [])):
            if not entry.get("added"):
                continue
            net = NetworkConfig.from_dict(entry["config"])
            prev = entry.get("result") if supports_prev_result(net) else None
            for plugin in reversed(net.plugins):
                conf = plugin_config(net, plugin, prev=prev, runtime=entry.get("runtime") or {})
                try:
                    self._cni("DEL", net, plugin, conf, uuid=pod.uuid,
                              netns=netns if os.path.exists(netns) else "", ifname=entry["ifname"],
                              args=entry.get("args", ""))
                except (NetworkError, ConfigError, CommandError) as exc:
                    errors.append(exc.message)
        if name and (NETNS_DIR / name).exists():
            try:
                self._iproute("netns", "delete", name)
            except NetworkError as exc:
                errors.append(exc.message)
        return errors

    def _unjoin(self, pod: Pod, state: dict[str, Any]) -> None:
        """Remove the taps and redirects added to a namespace that is not ours (gone already: nothing to do)."""
        netns = str(state["netns"])
        if os.path.exists(netns):
            cmds = "".join(f"qdisc del dev {e['ifname']} ingress\n" for e in state["networks"])
            links = "".join(f"link delete dev {e['tap']}\n" for e in state["networks"])
            for tool, batch in (("tc", cmds), ("ip", links)):
                with contextlib.suppress(NetworkError):  # parts may be gone with the container's interfaces
                    self._iproute("-force", "-batch", "-", tool=tool, stdin=batch, netns=netns)
        pod.write_json(STATE, {**state, "active": False})

    # --- status -------------------------------------------------------------------------------------

    @staticmethod
    def status(pod: Pod) -> dict[str, Any]:
        """What ``status`` shows: the mode, namespace and each network's interface, MAC and addresses."""
        state = pod.read_json(STATE)
        if not isinstance(state, dict):
            return {"mode": None, "networks": []}
        nets = [{"name": e.get("name"), "interface": e.get("ifname"), "mac": e.get("mac"),
                 "ips": [ip["address"] for ip in e.get("ips", [])],
                 "gateway": next((ip["gateway"] for ip in e.get("ips", []) if ip.get("gateway")), None)}
                for e in state.get("networks", [])]
        return {"mode": state.get("mode"), "netns": state.get("netns") or None, "active": state.get("active"),
                "port_forwards": state.get("forwards", []), "networks": nets,
                **({"teardown_errors": state["teardown_errors"]} if state.get("teardown_errors") else {})}


def _read_host_file(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the host's {path}: {exc}") from None
