"""Pure parts of pod networking: flag parsing, net.d loading, CNI plugin stdin and results, the files every app
gets, guest routes, and how a network plan reaches QEMU, libvirt and the guest config."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvmrkt.config import Stage1Config
from kvmrkt.errors import ConfigError, NetworkError
from kvmrkt.net.netconf import (
    NetRequest,
    PortForward,
    PortRequest,
    hosts_file,
    load_networks,
    parse_dns,
    parse_nets,
    parse_port,
    plugin_config,
    resolv_conf,
    resolve_ports,
    result_dns,
    result_ips,
)
from kvmrkt.net.network import _parse_json_stream, guest_mac, routes_for_guest
from kvmrkt.pods.manifest import AppSpec, PodManifest
from kvmrkt.stage1 import NetworkPlan, Nic
from stage1_kvm.domain_xml import build_domain_xml
from stage1_kvm.vmspec import build_vmspec, guest_pod_config

from .test_vm import JAIL, argv_of

UUID = "0a9a8f5e-6b1f-4c1e-9a53-1c0f3b0f2d11"


def dns(**kw: object) -> object:
    base: dict[str, tuple[str, ...]] = {"dns": (), "search": (), "opts": (), "hosts": ()}
    base.update(kw)  # type: ignore[arg-type]
    return parse_dns(domain=None, **base)  # type: ignore[arg-type]


def test_parse_nets() -> None:
    assert parse_nets(("default",)) == (NetRequest("default"),)
    assert parse_nets(("a:IP=10.1.2.3;X=1,b", "c")) == (NetRequest("a", "IP=10.1.2.3;X=1"), NetRequest("b"),
                                                       NetRequest("c"))
    for bad, msg in [("host", "not possible"), ("none,default", "cannot be combined"), ("a,a", "twice"),
                     ("", "empty"), ("bad name", "invalid"), ("a:novalue", "KEY=VALUE"), ("user:X=1", "no CNI")]:
        with pytest.raises(ConfigError, match=msg):
            parse_nets((bad,))


def test_parse_and_resolve_ports() -> None:
    assert parse_port("http:8080") == PortRequest("http", 8080)
    assert parse_port("80:127.0.0.1:8080") == PortRequest("80", 8080, "127.0.0.1")
    for bad in ("80", "80:0", "80:65536", "80:notanip:8080", ":8080", "80:1:2:3"):
        with pytest.raises(ConfigError):
            parse_port(bad)
    image = [("http", "tcp", 80), ("53/udp", "udp", 53)]
    got = resolve_ports((PortRequest("http", 8080), PortRequest("53/udp", 5353), PortRequest("443", 8443)), image)
    assert got == (PortForward("tcp", 80, 8080), PortForward("udp", 53, 5353), PortForward("tcp", 443, 8443))
    assert got[0].cni() == {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}
    assert PortForward("tcp", 80, 8080, "127.0.0.1").cni()["hostIP"] == "127.0.0.1"
    with pytest.raises(ConfigError, match="no app image declares a port named 'https'"):
        resolve_ports((PortRequest("https", 1),), image)
    with pytest.raises(ConfigError, match="forwarded twice"):
        resolve_ports((PortRequest("80", 1), PortRequest("81", 1)), image)
    with pytest.raises(ConfigError, match="tcp or udp"):
        resolve_ports((PortRequest("80/sctp", 1),), image)


def test_resolv_conf_precedence() -> None:
    cni = [{}, {"nameservers": ["10.0.0.53"], "search": ["cni.test"]}]
    assert resolv_conf(dns(), [], user_mode=False, host_resolv="") is None  # the image's own file stays
    assert resolv_conf(dns(), cni, user_mode=False, host_resolv="") == "nameserver 10.0.0.53\nsearch cni.test\n"
    assert resolv_conf(dns(dns=("none",)), cni, user_mode=False, host_resolv="") is None
    assert resolv_conf(dns(dns=("192.0.2.1",), opts=("ndots:2",)), cni, user_mode=False, host_resolv="") == (
        "nameserver 192.0.2.1\noptions ndots:2\n")
    assert resolv_conf(dns(dns=("host",)), cni, user_mode=False, host_resolv="HOST\n") == "HOST\n"
    assert resolv_conf(dns(), [], user_mode=True, host_resolv="") == "nameserver 10.0.2.3\n"
    assert resolv_conf(dns(search=("a.test",)), [], user_mode=False, host_resolv="") == "search a.test\n"
    for bad in ({"dns": ("host", "192.0.2.1")}, {"dns": ("nope",)}, {"search": ("bad domain",)},
                {"opts": ("x\ny",)}, {"hosts": ("1.2.3.4=bad name",)}, {"hosts": ("notip=x",)}):
        with pytest.raises(ConfigError):
            dns(**bad)


def test_hosts_file() -> None:
    text = hosts_file(dns(hosts=("192.0.2.9=db.test",)), hostname="web.test", pod_ip="10.1.1.2", host_hosts="")  # type: ignore[arg-type]
    assert text == ("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n10.1.1.2\tweb.test web\n"
                    "192.0.2.9\tdb.test\n")
    text = hosts_file(dns(hosts=("host",)), hostname="h", pod_ip=None, host_hosts="1.1.1.1 x")  # type: ignore[arg-type]
    assert text == "1.1.1.1 x\n127.0.1.1\th\n"


def test_load_networks(tmp_path: Path) -> None:
    assert set(load_networks(tmp_path)) == {"default"}  # shipped with kvmrkt
    default = load_networks(tmp_path)["default"]
    assert default.ip_masq and not default.has_capability("portMappings")  # portmap is chained only for --port
    assert [p["type"] for p in default.plugins] == ["ptp", "kvmrkt-firewall"]
    assert default.plugins[0]["ipam"]["ranges"] == [[{"subnet": "172.16.28.0/24"}]]
    d = tmp_path / "net.d"
    d.mkdir()
    (d / "10-a.conf").write_text('{"cniVersion": "0.4.0", "name": "a", "type": "bridge", "bridge": "br0"}')
    (d / "20-default.conflist").write_text('{"cniVersion": "1.0.0", "name": "default", "plugins": [{"type": "ptp"}]}')
    (d / "README").write_text("ignored")
    nets = load_networks(tmp_path)
    assert nets["a"].plugins == ({"type": "bridge", "bridge": "br0"},) and nets["default"].plugins == ({"type": "ptp"},)
    assert nets["a"].with_portmap().plugins[-1]["type"] == "portmap"
    assert nets["a"].with_portmap().with_portmap() == nets["a"].with_portmap()
    for text, msg in [("{x", "not valid JSON"), ("[]", "JSON object"), ('{"type": "ptp"}', "name"),
                      ('{"name": "b", "plugins": []}', "non-empty"), ('{"name": "b", "type": "../x"}', "type"),
                      ('{"name": "none", "type": "ptp"}', "reserved"), ('{"name": "a", "type": "ptp"}', "twice"),
                      ('{"name": "b", "type": "kvmrkt-firewall", "masquerade": "yes"}', "true or false"),
                      ('{"name": "b", "type": "kvmrkt-firewall", "chain": "FORWARD"}', "does not take 'chain'")]:
        (d / "30-bad.conf").write_text(text)
        with pytest.raises(ConfigError, match=msg):
            load_networks(tmp_path)
    (d / "30-bad.conf").write_text('{"cniVersion": "0.2.0", "name": "old", "type": "ptp"}')
    with pytest.raises(ConfigError, match=r"portmap needs cniVersion 0\.3\.0"):
        load_networks(tmp_path)["old"].with_portmap()


def test_plugin_config_passes_only_declared_capabilities(tmp_path: Path) -> None:
    net = load_networks(tmp_path)["default"].with_portmap()
    runtime = {"portMappings": [{"hostPort": 1, "containerPort": 2, "protocol": "tcp"}], "bandwidth": {}}
    first = plugin_config(net, net.plugins[0], prev=None, runtime=runtime)
    assert first["name"] == "default" and first["cniVersion"] == "1.0.0"
    assert "runtimeConfig" not in first and "prevResult" not in first
    last = plugin_config(net, net.plugins[-1], prev={"ips": []}, runtime=runtime)
    assert last["runtimeConfig"] == {"portMappings": runtime["portMappings"]} and last["prevResult"] == {"ips": []}


def test_results_of_every_cni_version() -> None:
    assert result_ips({"ip4": {"ip": "10.1.0.2/24", "gateway": "10.1.0.1"}}) == [
        {"address": "10.1.0.2/24", "gateway": "10.1.0.1"}]
    assert result_ips({"ips": [{"address": "10.1.0.2/24"}, "junk"]}) == [{"address": "10.1.0.2/24", "gateway": ""}]
    with pytest.raises(NetworkError, match="invalid address"):
        result_ips({"ips": [{"address": "10.1.0.300/24"}]})
    assert result_dns({"dns": {"nameservers": ["1.1.1.1", 5, "a\nb"], "domain": "x.test"}}) == {
        "nameservers": ["1.1.1.1"], "domain": "x.test"}
    assert result_dns({"dns": "nonsense"}) == {}


def test_routes_for_guest_put_on_link_routes_first() -> None:
    # What `ip -j route show dev eth0` prints in a ptp pod namespace.
    routes = [{"dst": "default", "gateway": "172.16.28.1"}, {"dst": "172.16.28.0/24", "gateway": "172.16.28.1"},
              {"dst": "172.16.28.1", "scope": "link"}, {"dst": "10.9.0.0/16", "type": "blackhole"}]
    assert routes_for_guest(routes) == (("172.16.28.1", 32, ""), ("172.16.28.0", 24, "172.16.28.1"),
                                        ("0.0.0.0", 0, "172.16.28.1"))
    assert _parse_json_stream('[{"a": 1}]\n[]\n [2]') == [[{"a": 1}], [], [2]]
    assert guest_mac(UUID, 1) == "02:6b:0a:9a:8f:01"


def manifest() -> PodManifest:
    app = AppSpec(name="web", image_id="sha256:" + "a" * 64, image_name="busybox", rootfs_digest="sha256:" + "b" * 64,
                  exec=("/bin/true",))
    return PodManifest(uuid=UUID, apps=(app,), hostname="h1")


CNI_PLAN = NetworkPlan("cni", netns="/run/netns/kvmrkt-x", nics=(
    Nic("eth0", "aa:bb:cc:dd:ee:01", 1500, "tap0", (("172.16.28.2", 24),),
        (("172.16.28.1", 32, ""), ("0.0.0.0", 0, "172.16.28.1"))),
    Nic("eth1", "aa:bb:cc:dd:ee:02", 9000, "tap1", (("10.1.0.5", 16),), ())),
    files=(("/etc/hosts", "127.0.0.1 localhost\n"),))
USER_PLAN = NetworkPlan("user", nics=(Nic("eth0", "02:6b:00:00:00:00", 1500, None, (("10.0.2.15", 24),), ()),),
                        forwards=(("tcp", "127.0.0.1", 8080, 80), ("udp", "", 5353, 53)))


def vm(plan: NetworkPlan):  # type: ignore[no-untyped-def]
    m = manifest()
    return build_vmspec(m, cfg=Stage1Config(), jail=JAIL, accel="tcg", kernel=Path("/k"),
                        rootfs={"web": Path("/r.erofs")}, interactive=False, debug=False, tsc_khz=None, network=plan)


def test_network_plans_reach_qemu() -> None:
    cni = vm(CNI_PLAN)
    assert cni.netns == "/run/netns/kvmrkt-x"
    argv = argv_of(cni)
    assert argv[argv.index("-netdev") + 1] == "tap,id=net0,ifname=tap0,script=no,downscript=no"
    assert "virtio-net-device,netdev=net1,mac=aa:bb:cc:dd:ee:02" in argv
    user = argv_of(vm(USER_PLAN))
    assert user[user.index("-netdev") + 1] == ("user,id=net0,net=10.0.2.0/24,hostfwd=tcp:127.0.0.1:8080-:80,"
                                               "hostfwd=udp::5353-:53")
    assert vm(USER_PLAN).netns is None  # user mode: QEMU's own sockets are in the host namespace
    none = vm(NetworkPlan())
    assert none.netns == "" and "-netdev" not in argv_of(none)  # a new, empty namespace for QEMU


def test_network_plans_reach_the_guest_config() -> None:
    text = guest_pod_config(manifest(), interactive=False, network=CNI_PLAN).decode()
    assert ("net eth0 aa:bb:cc:dd:ee:01 1500\naddr 172.16.28.2 24\nroute 172.16.28.1 32 -\n"
            "route 0.0.0.0 0 172.16.28.1\nnet eth1 aa:bb:cc:dd:ee:02 9000\naddr 10.1.0.5 16\n") in text
    assert "file /etc/hosts 127.0.0.1%20localhost%0A\n" in text


def test_libvirt_domain_gets_user_mode_nic() -> None:
    dom = ET.fromstring(build_domain_xml(vm(USER_PLAN), uuid=UUID, pod_dir=Path("/p"), qemu="/q", jail=JAIL))
    iface = dom.find("devices/interface")
    assert iface is not None and iface.get("type") == "user"
    assert iface.find("mac").get("address") == "02:6b:00:00:00:00"  # type: ignore[union-attr]
    assert iface.find("address").get("type") == "virtio-mmio"  # type: ignore[union-attr]
    assert json.dumps(CNI_PLAN.files)  # plans are plain data


def test_names_with_a_trailing_newline_are_refused(tmp_path: Path) -> None:
    """Python's `$` matches before a final newline; every name check anchors with \\Z instead."""
    from kvmrkt.digest import Digest
    from kvmrkt.errors import ManifestError
    from kvmrkt.pods.manifest import check_name

    with pytest.raises(ManifestError):
        Digest.parse("sha256:" + "a" * 64 + "\n")
    with pytest.raises(ManifestError):
        check_name("app", "web\n")
    with pytest.raises(ConfigError):
        parse_nets(("de\nfault",))
    for bad in ("web\n", "a" * 65, "-web", "web.", "we b"):
        with pytest.raises(ManifestError, match="invalid hostname"):
            PodManifest(uuid=UUID, apps=manifest().apps, hostname=bad)
    (tmp_path / "net.d").mkdir()
    (tmp_path / "net.d" / "a.conf").write_text('{"name": "a", "type": "ptp\\n"}')
    with pytest.raises(ConfigError, match="type"):
        load_networks(tmp_path)
