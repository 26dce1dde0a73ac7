"""An OCI bundle's cgroupsPath and cgroup limits: parsing and refusals (``kvmrkt.ocirt.cgroupspec``), where a
placement's cgroup is and which files set its limits (``stage1_kvm.cgroups``, pure parts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvmrkt.errors import JailError, ManifestError
from kvmrkt.ocirt.cgroupspec import placement
from kvmrkt.stage1 import CgroupPlacement, JailSpec
from stage1_kvm import cgroups

JAIL = JailSpec(uid=2_000_000_000, gid=2_000_000_000, memory_mib=256, vcpus=1, memory_limit_mib=320, pids_max=1024)


def test_no_path_and_no_limits_is_no_placement() -> None:
    assert placement({}) == (None, ())
    assert placement({"resources": {"memory": {"limit": 1 << 26}, "devices": [{"allow": False}]}}) == (None, ())


def test_path_and_limits_are_read() -> None:
    place, unhonoured = placement({"cgroupsPath": "/k8s/pod1/c1", "resources": {
        "pids": {"limit": 1000}, "cpu": {"shares": 2048, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"},
        "memory": {"limit": 1 << 26, "swappiness": 60}, "blockIO": {"weight": 10}}})
    assert place == CgroupPlacement("/k8s/pod1/c1", 1000, 2048, 50000, 100000, "0-1", "0", join_creator=True)
    assert unhonoured == ("linux.resources.memory.swappiness", "linux.resources.blockIO.weight")


def test_limits_without_a_path_stay_in_the_jails_cgroup() -> None:
    place, _ = placement({"resources": {"pids": {"limit": 10}}})
    assert place == CgroupPlacement("", pids_max=10, join_creator=False)


@pytest.mark.parametrize(("linux", "words"), [
    ({"cgroupsPath": "kubepods.slice:cri-containerd:abc"}, "systemd"),
    ({"cgroupsPath": "/a/../../etc"}, "climbs out"),
    ({"cgroupsPath": "/"}, "names the hierarchy's root"),
    ({"cgroupsPath": "./"}, "names the hierarchy's root"),
    ({"cgroupsPath": 7}, "must be a string"),
    ({"resources": {"pids": {"limit": "1000"}}}, "pids.limit must be an integer"),
    ({"resources": {"pids": {"limit": True}}}, "pids.limit must be an integer"),
    ({"resources": {"cpu": {"shares": 1}}}, "shares must be at least 2"),
    ({"resources": {"cpu": {"period": 10}}}, "period at least 1000"),
    ({"resources": {"cpu": {"cpus": "0-1; rm"}}}, "cpu.cpus must be a list"),
    ({"resources": []}, "must be an object"),
])
def test_bad_values_are_refused_naming_the_field(linux: dict[str, Any], words: str) -> None:
    with pytest.raises(ManifestError, match=words):
        placement(linux)


def test_placement_directories() -> None:
    mount = Path("/sys/fs/cgroup/pids")
    assert cgroups.placement_dir(mount, "/cgrouptest", "/user.slice") == mount / "cgrouptest"
    assert cgroups.placement_dir(mount, "testdir/c", "/user.slice") == mount / "user.slice/testdir/c"
    assert cgroups.placement_dir(mount, "testdir/c", "/") == mount / "testdir/c"
    with pytest.raises(JailError):
        cgroups.placement_dir(mount, "../../x", "/")


def test_a_placements_limits_replace_the_jails() -> None:
    place = CgroupPlacement("/c", pids_max=1000, cpu_shares=2048, cpu_quota_us=50000, cpu_period_us=500000,
                            cpuset_cpus="0", cpuset_mems="0")
    jail = JailSpec(**{**{f: getattr(JAIL, f) for f in JAIL.__slots__}, "placement": place})  # type: ignore[arg-type]
    assert cgroups.limit_files(jail, 1, "pids") == [("pids.max", "1000")]
    assert cgroups.limit_files(jail, 1, "cpu") == [("cpu.cfs_period_us", "500000"), ("cpu.cfs_quota_us", "50000"),
                                                  ("cpu.shares", "2048")]
    assert cgroups.limit_files(jail, 1, "cpuset") == [("cpuset.cpus", "0"), ("cpuset.mems", "0")]
    assert cgroups.limit_files(jail, 2, "cpu") == [("cpu.max", "50000 500000"), ("cpu.weight", "79")]
    assert cgroups.controllers(jail) == ("memory", "cpu", "pids", "cpuset")
    assert cgroups.controllers(JAIL) == ("memory", "cpu", "pids")
    unlimited = JailSpec(**{**{f: getattr(JAIL, f) for f in JAIL.__slots__},  # type: ignore[arg-type]
                            "placement": CgroupPlacement("/c", pids_max=-1)})
    assert cgroups.limit_files(unlimited, 1, "pids") == [("pids.max", "max")]
    assert cgroups.limit_files(JAIL, 1, "pids") == [("pids.max", "1024")]
