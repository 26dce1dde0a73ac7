"""An app's settings for the VM's own kernel (linux.sysctl, process.oomScoreAdj, linux.devices): parsing,
refusals that name the field, the manifest form and the guest's pod-config lines."""

from __future__ import annotations

from typing import Any

import pytest

from kvmrkt.errors import ManifestError
from kvmrkt.pods.confinement import Confinement, from_oci, guest_config
from kvmrkt.pods.kernelsettings import NO_KERNEL_SETTINGS, Device, KernelSettings
from kvmrkt.pods.kernelsettings import from_oci as settings_from_oci

DEVICES = [{"path": "/dev/test1", "type": "c", "major": 10, "minor": 666, "fileMode": 0o660, "uid": 1, "gid": 2},
           {"path": "/dev/sub/fifo", "type": "p"}, {"path": "/dev/fuse", "type": "u", "major": 10, "minor": 229}]


def test_settings_are_read_and_rendered_for_the_guest() -> None:
    s = settings_from_oci({"oomScoreAdj": 500}, {"sysctl": {"net.ipv4.ip_forward": "1", "kernel.shmmax": "65536"},
                                                "devices": DEVICES})
    assert s == KernelSettings((("kernel.shmmax", "65536"), ("net.ipv4.ip_forward", "1")), 500, (
        Device("/dev/test1", "c", 10, 666, 0o660, 1, 2), Device("/dev/sub/fifo", "p"),
        Device("/dev/fuse", "u", 10, 229)))
    conf = from_oci({"oomScoreAdj": 500}, {"sysctl": {"net.ipv4.ip_forward": "1"}, "devices": DEVICES[:1]}, ())
    assert guest_config(conf)[-3:] == [("sysctl", "net.ipv4.ip_forward", "1"), ("oomscore", "500"),
                                       ("device", "/dev/test1", "c", "10", "666", "660", "1", "2")]
    assert ("device", "/dev/fuse", "c", "10", "229", "666", "0", "0") in guest_config(
        from_oci({}, {"devices": DEVICES[2:]}, ()))  # "u" (unbuffered) is a character device


def test_the_manifest_form_round_trips_and_stays_unchanged_without_settings() -> None:
    conf = from_oci({"oomScoreAdj": -10}, {"sysctl": {"fs.mqueue.msg_max": "20"}, "devices": DEVICES}, ())
    assert Confinement.from_dict(conf.to_dict(), "app") == conf
    plain = Confinement()
    assert "kernel" not in plain.to_dict()
    assert Confinement.from_dict(plain.to_dict(), "app").kernel is NO_KERNEL_SETTINGS
    with pytest.raises(ManifestError, match=r"app\.kernel: expected an object"):
        Confinement.from_dict({**plain.to_dict(), "kernel": {"sysctl": {}}}, "app")


@pytest.mark.parametrize(("process", "linux", "words"), [
    ({}, {"sysctl": {"net/ipv4/ip_forward": "1"}}, "not a dotted sysctl name"),
    ({}, {"sysctl": {"kernel..x": "1"}}, "not a dotted sysctl name"),
    ({}, {"sysctl": {"net.ipv4.ip_forward": 1}}, "must be a string of one line"),
    ({}, {"sysctl": {"net.ipv4.ip_forward": "1\nkernel.x 2"}}, "must be a string of one line"),
    ({}, {"sysctl": []}, "linux.sysctl must be an object"),
    ({"oomScoreAdj": 1001}, {}, "oomScoreAdj must be an integer from -1000 to 1000"),
    ({"oomScoreAdj": "5"}, {}, "oomScoreAdj must be an integer"),
    ({}, {"devices": [{"path": "/etc/passwd", "type": "c", "major": 1, "minor": 3}]}, "path under /dev/"),
    ({}, {"devices": [{"path": "/dev/../etc/x", "type": "c", "major": 1, "minor": 3}]}, "without '..'"),
    ({}, {"devices": [{"path": "/dev/x", "type": "s", "major": 1, "minor": 3}]}, r"devices\[0\]\.type must be"),
    ({}, {"devices": [{"path": "/dev/x", "type": "c"}]}, "needs major and minor"),
    ({}, {"devices": [{"path": "/dev/x", "type": "c", "major": -1, "minor": 3}]}, r"\.major must be an integer"),
    ({}, {"devices": [{"path": "/dev/x", "type": "c", "major": 1, "minor": 3, "fileMode": 0o17777}]}, "fileMode"),
    ({}, {"devices": {}}, "linux.devices must be a list"),
    ({}, {"sysctl": {f"kernel.k{i}": "1" for i in range(65)}}, "at most 64 linux.sysctl entries"),
    ({}, {"devices": [{"path": f"/dev/p{i}", "type": "p"} for i in range(33)]}, "and 32 linux.devices"),
])  # fmt: skip
def test_bad_settings_are_refused_naming_the_field(process: dict[str, Any], linux: dict[str, Any],
                                                   words: str) -> None:
    with pytest.raises(ManifestError, match=words):
        settings_from_oci(process, linux)
