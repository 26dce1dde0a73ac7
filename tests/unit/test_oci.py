"""The pure parts of kvmrkt-oci: reading a bundle's config.json, the pod manifest made from it, signals, the
features document, and how a held, terminal, 9p-rooted app reaches QEMU and the guest config."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from kvmrkt.config import JailConfig, PodsConfig, Stage1Config
from kvmrkt.errors import ConfigError, ManifestError
from kvmrkt.ocirt.bundle import APP, load_bundle, manifest_for, parse_signal
from kvmrkt.ocirt.mountpoints import for_bundle, make
from kvmrkt.ocirt.runtime import features
from kvmrkt.pods.jail import jail_spec
from stage1_kvm.jail import plan
from stage1_kvm.vmspec import build_vmspec, guest_pod_config

from .test_vm import argv_of

UUID = "0a9a8f5e-6b1f-4c1e-9a53-1c0f3b0f2d11"


def bundle(tmp_path: Path, **changes: Any) -> Path:
    (tmp_path / "rootfs").mkdir(exist_ok=True)
    (tmp_path / "data").mkdir(exist_ok=True)
    doc: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {"args": ["/bin/sh", "-c", "echo hi"], "env": ["PATH=/bin", "A=b=c"], "cwd": "/work",
                    "user": {"uid": 1000, "gid": 1000, "additionalGids": [10, 20]}, "terminal": True},
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "box",
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                   {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
                   {"destination": "/run", "type": "tmpfs", "source": "tmpfs"},
                   {"destination": "/data", "type": "bind", "source": str(tmp_path / "data"),
                    "options": ["rbind", "ro"]},
                   {"destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf",
                    "options": ["bind"]}],
        "linux": {"resources": {"memory": {"limit": 300 * 1024 * 1024 + 1}, "cpu": {"quota": 150000, "period": 100000}},
                  "namespaces": [{"type": "pid"}], "seccomp": {"defaultAction": "SCMP_ACT_ERRNO"}},
        "annotations": {"io.kubernetes.cri.image-name": "docker.io/library/busybox:1.36",
                        "io.kubernetes.cri.container-type": "container"},
    }
    for key, value in changes.items():
        target = doc
        *path, last = key.split("__")
        for p in path:
            target = target[p]
        if value is None:
            target.pop(last, None)
        else:
            target[last] = value
    (tmp_path / "config.json").write_text(json.dumps(doc))
    return tmp_path


def test_load_bundle(tmp_path: Path) -> None:
    b = load_bundle(bundle(tmp_path))
    assert b.args == ("/bin/sh", "-c", "echo hi") and b.env == (("PATH", "/bin"), ("A", "b=c"))
    assert (b.cwd, b.uid, b.gid, b.gids, b.terminal) == ("/work", 1000, 1000, (10, 20), True)
    assert b.rootfs == tmp_path / "rootfs" and b.readonly and b.hostname == "box"
    assert b.memory_mib == 301 and b.cpus == 2
    assert b.image_name == "docker.io/library/busybox:1.36"
    assert b.config_digest.startswith("sha256:") and len(b.config_digest) == 71
    # /proc and /dev come from the guest; /run is guest memory; /data (recursive, read-only) and the file
    # /etc/resolv.conf are bound into the pod's shared export.
    assert [(v.name, v.kind, v.source, v.read_only) for v in b.volumes] == [
        ("m2", "empty", None, False), ("m3", "rbind", str(tmp_path / "data"), True),
        ("m4", "bind", "/etc/resolv.conf", False)]
    assert [(m.volume, m.target) for m in b.mounts] == [("m2", "/run"), ("m3", "/data"), ("m4", "/etc/resolv.conf")]
    assert b.ignored == ()


def test_bundle_binds_that_cannot_reach_a_vm_are_refused(tmp_path: Path) -> None:
    """A bind of nothing, of a missing path, of a device, socket or fifo is an error naming the mount; a relative
    source is the bundle's; more mounts than the guest takes is an error, not a silently dropped mount."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "rel").write_text("x")
    for source, why in (("", "no source"), ("/nonexistent/kvmrkt", "No such file"), ("/dev/null", "not a file"),
                        (str(tmp_path / "fifo"), "not a file")):
        mounts = [{"destination": "/x", "type": "bind", "source": source, "options": ["rbind"]}]
        with pytest.raises(ManifestError, match=rf"mounts\[0\] \(/x\).*{why}"):
            load_bundle(bundle(tmp_path, mounts=mounts))
    b = load_bundle(bundle(tmp_path, mounts=[{"destination": "/x", "type": "bind", "source": "rel"}]))
    assert [(v.kind, v.source) for v in b.volumes] == [("bind", str(tmp_path / "rel"))]
    many = [{"destination": f"/d{i}", "type": "tmpfs", "source": "tmpfs"} for i in range(33)]
    with pytest.raises(ManifestError, match="33 mounts; a kvmrkt VM takes at most 32"):
        load_bundle(bundle(tmp_path, mounts=many))


def test_manifest_for_a_bundle(tmp_path: Path) -> None:
    b = load_bundle(bundle(tmp_path, hostname=None))
    m = manifest_for(b, UUID, "ctr-1")
    (app,) = m.apps
    assert app.name == APP and app.exec == b.args and app.uid == 1000 and app.supplementary_gids == (10, 20)
    assert app.memory_mib == 301 and app.cpus == 2 and app.image_name == "docker.io/library/busybox:1.36"
    assert m.hostname == "kvmrkt-0a9a8f5e"
    ann = dict(m.annotations)
    assert ann["kvmrkt.oci/id"] == "ctr-1" and ann["kvmrkt.oci/config-digest"] == b.config_digest


@pytest.mark.parametrize(("changes", "message"), [
    ({"ociVersion": "2.0.0"}, "ociVersion"),
    ({"process__args": []}, "process.args"),
    ({"process__args": ["/bin/sh", 3]}, "process.args"),
    ({"process__env": ["NOEQUALS"]}, "KEY=VALUE"),
    ({"process__user": {"uid": -1}}, "non-negative"),
    ({"process__user": {"uid": True}}, "process.user.uid"),
    ({"root__path": "missing"}, "is not a directory"),
    ({"mounts": [{"type": "tmpfs"}]}, "destination"),
    ({"mounts": [{"destination": "relative", "type": "tmpfs"}]}, "absolute"),
    ({"annotations": {"a": 1}}, "annotations"),
    ({"process": "nope"}, "process"),
    ({"process__rlimits": [{"type": "RLIMIT_TEST", "soft": 1024, "hard": 1024}]},
     r"config\.json: process\.rlimits\[0\]\.type: unknown rlimit 'RLIMIT_TEST'"),
    ({"process__capabilities": {"bounding": ["CAP_TEST"]}},
     r"config\.json: process\.capabilities\.bounding: unknown capability 'CAP_TEST'"),
    ({"linux__namespaces": [{"type": "pid", "path": "/proc/1/ns/pid"}]},
     r"linux\.namespaces\[0\]: the pid namespace at /proc/1/ns/pid cannot be joined"),
    ({"linux__namespaces": [{"type": "pid"}, {"type": "mount", "path": "/proc/1/ns/mnt"}]}, "mount namespace at"),
    ({"linux__namespaces": [{"type": "pid"}, {"type": "pid"}]}, "listed twice"),
    ({"linux__namespaces": [{"type": "bogus"}]}, r"linux\.namespaces\[0\] needs a type"),
    ({"linux__namespaces": ["pid"]}, r"linux\.namespaces\[0\] needs a type"),
])
def test_bad_configs_are_named(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        load_bundle(bundle(tmp_path, **changes))


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"no config\.json"):
        load_bundle(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read"):
        load_bundle(tmp_path)


def test_signals_and_features() -> None:
    assert parse_signal("9") == parse_signal("KILL") == parse_signal("SIGKILL") == parse_signal("sigkill") == 9
    assert parse_signal("TERM") == signal.SIGTERM
    for bad in ("0", "99", "NOPE", ""):
        with pytest.raises(ConfigError):
            parse_signal(bad)
    doc = features()
    assert doc["ociVersionMin"] == "1.0.0" and doc["ociVersionMax"] == "1.0.2"
    assert json.loads(json.dumps(doc)) == doc


def test_bundle_roots_reach_qemu_and_the_guest(tmp_path: Path) -> None:
    b = load_bundle(bundle(tmp_path))
    m = manifest_for(b, UUID, "c")
    js = jail_spec(m, 2000000001, Stage1Config(), PodsConfig(max_memory_mib=4096, max_vcpus=4), JailConfig())
    spec = build_vmspec(m, cfg=Stage1Config(), jail=js, accel="tcg", kernel=Path("/k"), rootfs={APP: b.rootfs},
                        interactive=True, debug=False, tsc_khz=None, shared_roots={APP: True})
    argv = " ".join(argv_of(spec))
    assert f"local,id=root0,path={b.rootfs},security_model=none,readonly=on" in argv
    assert "mount_tag=root0" in argv and "virtio-blk" not in argv
    assert spec.memory_mib == 301 + 128 and spec.vcpus == 2
    cfg = guest_pod_config(m, interactive=True, shared_roots={APP: True}, hold=True, tty=True).decode()
    assert "hold 1\n" in cfg and "tty 1\n" in cfg and "rootshare root0 1\n" in cfg and "serial" not in cfg
    assert guest_pod_config(m, interactive=False).decode().count("hold") == 0


def test_bundle_binds_go_through_one_shared_export(tmp_path: Path) -> None:
    """Twelve binds (ten directories, two files) are one 9p device, the shared export (multidevs=remap; bound
    into the jail with its submounts), whatever their number; the guest config names each bind's place in it."""
    dirs = [tmp_path / f"d{i}" for i in range(10)]
    for d in dirs:
        d.mkdir()
    (tmp_path / "f0").write_text("a")
    (tmp_path / "f1").write_text("b")
    mounts = [{"destination": f"/mnt/{d.name}", "type": "bind", "source": str(d), "options": ["rbind"]}
              for d in dirs]
    mounts += [{"destination": "/etc/f0", "type": "bind", "source": str(tmp_path / "f0"), "options": ["bind", "ro"]},
               {"destination": "/etc/f1", "type": "bind", "source": str(tmp_path / "f1"), "options": ["rbind"]}]
    b = load_bundle(bundle(tmp_path, mounts=mounts))
    m = manifest_for(b, UUID, "c")
    js = jail_spec(m, 2000000001, Stage1Config(), PodsConfig(max_memory_mib=4096, max_vcpus=4), JailConfig())
    export = tmp_path / "pod" / "shared"
    spec = build_vmspec(m, cfg=Stage1Config(), jail=js, accel="tcg", kernel=Path("/k"), rootfs={APP: b.rootfs},
                        interactive=True, debug=False, tsc_khz=None, shared_roots={APP: True}, shared_export=export)
    argv = " ".join(argv_of(spec))
    assert argv.count("virtio-9p-device") == 2  # the root and the export
    assert f"local,id=shared,path={export},security_model=none,multidevs=remap" in argv
    assert "mount_tag=kvmrkt-shared" in argv
    _, layout = plan(spec, tmp_path / "pod")
    assert [b.recursive for b in layout.inputs if b.target.startswith("shares/")] == [False, True]
    cfg = guest_pod_config(m, interactive=True, shared_roots={APP: True}, shared_export=True).decode()
    assert "shared kvmrkt-shared\n" in cfg
    assert "volume m0 rbind binds/m0/d0 0\n" in cfg and "volume m10 bind binds/m10/f0 1\n" in cfg
    assert "mount m11 /etc/f1\n" in cfg
    assert "shared" not in guest_pod_config(m, interactive=True).decode().split("volume")[0]


def test_mount_points_are_made_inside_a_writable_root_only(tmp_path: Path) -> None:
    """Missing mount points of a writable bundle root are made in it (directories; an empty file for a bound
    file); the image's symlinks, absolute or climbing, resolve inside the root and never lead out of it."""
    root, outside = tmp_path / "rootfs", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "abs").symlink_to(outside)
    (root / "up").symlink_to("../../outside")
    (root / "file").symlink_to(outside / "secret")
    make(root, [("/var/run/secrets/token", True), ("/dev/termination-log", False), ("/abs/x", True),
                ("/up/y/z", True), ("/file", False)])
    assert (root / "var/run/secrets/token").is_dir() and (root / "dev/termination-log").is_file()
    assert not list(outside.iterdir())
    assert not (root / "outside").exists()  # a link to nothing in the root is left as it is (the guest refuses it)
    (root / "outside").mkdir()
    make(root, [("/abs/x", True), ("/up/y/z", True)])
    assert (root / "outside/y/z").is_dir() and not list(outside.iterdir())  # where the link points, in the root
    b = load_bundle(bundle(tmp_path, mounts=[{"destination": "/data/in", "type": "bind", "source": str(outside)}]))
    for_bundle(b)  # readonly: the guest's overlay gets the mount points, the host's rootfs nothing
    assert not (tmp_path / "rootfs" / "data").exists()
    for_bundle(load_bundle(bundle(tmp_path, root={"path": "rootfs", "readonly": False},
                                  mounts=[{"destination": "/data/in", "type": "bind", "source": str(outside)}])))
    assert (tmp_path / "rootfs" / "data" / "in").is_dir()
