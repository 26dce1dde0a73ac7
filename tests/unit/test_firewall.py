"""kvmrkt-firewall (the built-in chained CNI plugin): its rules, and the hostile results and configs it refuses
before any rule is made (iptables itself is exercised by tests/integration/test_network.py)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from kvmrkt.errors import NetworkError
from kvmrkt.net import firewall

POD = "0e2f6a3c-1111-4222-8333-444444444444"


def test_rules_name_the_pod_and_stay_within_iptables_limits() -> None:
    ch = firewall.chain("default", POD)
    assert len(ch) <= 28 and ch != firewall.chain("other", POD) and ch != firewall.chain("default", POD[:-1] + "5")
    nat, filt = firewall._rules("default", POD, ipaddress.ip_interface("172.16.28.5/24"), True)
    assert nat == [f'{ch} -d 172.16.28.0/24 -m comment --comment "name: \\"default\\" id: \\"{POD}\\"" -j ACCEPT',
                   f'{ch} ! -d 224.0.0.0/4 -m comment --comment "name: \\"default\\" id: \\"{POD}\\"" -j MASQUERADE',
                   f'POSTROUTING -s 172.16.28.5/32 -m comment --comment "name: \\"default\\" id: \\"{POD}\\"" -j {ch}']
    assert all(f'id: \\"{POD}\\"' in r for r in filt) and filt[1].startswith("FORWARD -s 172.16.28.5/32 ")
    assert firewall._rules("default", POD, ipaddress.ip_interface("fd00::5/64"), False)[0] == []


@pytest.mark.parametrize(("prev", "message"), [
    (None, "got no prevResult"),
    ({"ips": []}, "has no address"),
    ({"ips": [{"address": "172.16.28.5/24 -j ACCEPT\n*filter"}]}, "not one"),  # a rule smuggled in an address
    ({"ips": [{"address": "1.2.3.4/33"}]}, "not one"),
    ({"ip4": {"ip": "not-an-ip"}}, "not one"),
])
def test_a_result_without_clean_addresses_makes_no_rule(monkeypatch: pytest.MonkeyPatch, prev: Any,
                                                        message: str) -> None:
    ran: list[str] = []
    monkeypatch.setattr(firewall, "_restore", lambda version, text: ran.append(text))
    conf = {"name": "default", "type": firewall.TYPE, "masquerade": True, "prevResult": prev}
    with pytest.raises(NetworkError, match=message):
        firewall.add(conf, pod=POD)
    assert ran == []


def test_add_is_one_transaction_per_family_and_passes_the_result_on(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[tuple[int, str]] = []
    monkeypatch.setattr(firewall, "_restore", lambda version, text: ran.append((version, text)))
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "172.16.28.5/24"}, {"address": "fd00::5/64"}]}
    assert firewall.add({"name": "default", "masquerade": True, "prevResult": prev}, pod=POD) is prev
    assert [v for v, _ in ran] == [4, 6]
    assert ran[0][1].count("COMMIT") == 2 and f":{firewall.chain('default', POD)} - [0:0]" in ran[0][1]
    assert "MASQUERADE" in ran[1][1] and "ff00::/8" in ran[1][1]
