"""kvmrkt.net.nsguard: a network namespace is rewired only when it is provably the pod's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmrkt.errors import ConfigError
from kvmrkt.net.nsguard import check_pod_namespace


def test_kvmrkts_own_namespace_is_refused() -> None:
    # CRI hands app containers /proc/<sandbox pid>/ns/net; for a VM runtime that pid is a host process.
    with pytest.raises(ConfigError, match="kvmrkt's own"):
        check_pod_namespace("/proc/self/ns/net")


def test_a_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot use network namespace"):
        check_pod_namespace(str(tmp_path / "nothing-here"))


def test_a_file_that_is_not_a_namespace_is_refused(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ConfigError, match="not a network namespace"):
        check_pod_namespace(str(tmp_path / "plain"))


def fake_proc(tmp: Path, own: Path, procs: dict[str, tuple[Path, str]]) -> Path:
    """A /proc whose namespaces are files on one device (as nsfs inodes are): ``procs`` maps pid -> (ns, comm)."""
    proc = tmp / "proc"
    for pid, (ns, comm) in {"self": (own, "kvmrkt-oci"), **procs}.items():
        (proc / pid / "ns").mkdir(parents=True)
        (proc / pid / "ns" / "net").symlink_to(ns)
        (proc / pid / "comm").write_text(comm + "\n")
    return proc


def namespaces(tmp: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        (tmp / name).write_text(name)
        out.append(tmp / name)
    return out


def test_the_nodes_namespace_is_refused(tmp_path: Path) -> None:
    node, own = namespaces(tmp_path, "node", "own")
    proc = fake_proc(tmp_path, own, {"1": (node, "systemd")})
    with pytest.raises(ConfigError, match="the node's"):
        check_pod_namespace(str(node), proc=proc)


def test_a_namespace_someone_lives_in_is_refused(tmp_path: Path) -> None:
    node, own, pod = namespaces(tmp_path, "node", "own", "pod")
    proc = fake_proc(tmp_path, own, {"1": (node, "systemd"), "4242": (pod, "sshd")})
    with pytest.raises(ConfigError, match=r"process 4242 \(sshd\) lives in it"):
        check_pod_namespace(str(pod), proc=proc)


def test_a_fresh_namespace_of_the_pod_is_accepted(tmp_path: Path) -> None:
    node, own, pod = namespaces(tmp_path, "node", "own", "pod")
    proc = fake_proc(tmp_path, own, {"1": (node, "systemd"), "77": (own, "containerd")})
    check_pod_namespace(str(pod), proc=proc)
