"""PodNetworks._iproute: a namespace kvmrkt made (``/run/netns/kvmrkt-<uuid>``) is entered by ip/tc's own ``-n``;
any other path (a joined container's namespace, or a crafted one) still goes through nsenter with the path, never
turned into a name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvmrkt.config import load_config
from kvmrkt.net import network
from kvmrkt.net.network import PodNetworks

UUID = "0b5d9e1c-3f7a-4c2e-9a1b-2c3d4e5f6a7b"


@pytest.fixture
def ran(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[PodNetworks, list[list[str]]]:
    calls: list[list[str]] = []

    class Done:
        stdout = b""

    def run(argv: list[str], **_kw: Any) -> Done:
        calls.append(list(argv))
        return Done()

    monkeypatch.setattr(network._proc, "run", run)
    monkeypatch.setattr(network._proc, "which", lambda tool, **_kw: f"/usr/sbin/{tool}")
    return PodNetworks(load_config(config_dir=tmp_path, data_dir=tmp_path / "d"), warn=lambda _m: None), calls


def test_our_namespace_is_entered_by_name(ran: tuple[PodNetworks, list[list[str]]]) -> None:
    nets, calls = ran
    nets._iproute("-batch", "-", tool="tc", stdin="", netns=f"/run/netns/kvmrkt-{UUID}")
    nets._iproute("link", "show", netns=f"/run/netns/kvmrkt-{UUID}")
    assert calls == [["/usr/sbin/tc", "-n", f"kvmrkt-{UUID}", "-batch", "-"],
                     ["/usr/sbin/ip", "-n", f"kvmrkt-{UUID}", "link", "show"]]


@pytest.mark.parametrize("netns", [
    "/proc/4242/ns/net",  # a joined container's namespace
    f"/run/netns/../netns/kvmrkt-{UUID}",
    "/run/netns/kvmrkt-../../proc/1/ns/net",
    "/run/netns/other-engine",
    f"/run/netns/kvmrkt-{UUID}/x",
    f"run/netns/kvmrkt-{UUID}",
])
def test_any_other_path_goes_through_nsenter(ran: tuple[PodNetworks, list[list[str]]], netns: str) -> None:
    nets, calls = ran
    nets._iproute("link", "show", netns=netns)
    assert calls == [["/usr/sbin/nsenter", f"--net={netns}", "/usr/sbin/ip", "link", "show"]]
