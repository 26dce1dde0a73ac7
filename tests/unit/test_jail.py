"""The VMM jail's pure parts: uid leases and their range checks, sizing against the operator's caps, cgroup
limits and hierarchy choice, the jail layout, POSIX ACL grants on shared directories, QEMU's fd-passing argv."""

from __future__ import annotations

import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvmrkt.config import JailConfig, PodsConfig, Stage1Config, parse_uid_range
from kvmrkt.errors import ConfigError, JailError, LimitError
from kvmrkt.pods import jail
from kvmrkt.pods.manifest import AppSpec, PodManifest
from kvmrkt.stage1 import JailSpec, NetworkPlan, Nic
from stage1_kvm import cgroups, shares
from stage1_kvm import jail as jails
from stage1_kvm.qemu_argv import build_argv
from stage1_kvm.vmspec import build_vmspec

UUID = "0a9a8f5e-6b1f-4c1e-9a53-1c0f3b0f2d11"


def app(name: str = "web", **kw: object) -> AppSpec:
    base: dict[str, object] = {"name": name, "image_id": "sha256:" + "a" * 64, "image_name": "busybox:latest",
                               "rootfs_digest": "sha256:" + "b" * 64, "exec": ("/bin/true",)}
    base.update(kw)
    return AppSpec(**base)  # type: ignore[arg-type]


def pod(*apps: AppSpec) -> PodManifest:
    return PodManifest(uuid=UUID, apps=apps or (app(),), hostname="h1")


def test_uid_range_parsing() -> None:
    assert parse_uid_range("2000000000-2000065535") == (2000000000, 2000065535)
    for bad in ("0-10", "10-5", "x-y", "5", "1-4294967295"):
        with pytest.raises(ConfigError):
            parse_uid_range(bad)


def test_ranges_used_by_accounts_groups_or_subids_are_found() -> None:
    files = [("/etc/passwd", "root:x:0:0::/root:/bin/sh\nqemu:x:1005:1005::/:/bin/false\n"),
             ("/etc/group", "g:x:2000:\n"),
             ("/etc/subuid", "alice:100000:65536\n"),
             ("/etc/subgid", "broken line\n")]
    assert jail.id_conflicts(1000, 1010, files) == ["/etc/passwd: qemu is id 1005"]
    assert jail.id_conflicts(1990, 2010, files) == ["/etc/group: g is id 2000"]
    assert jail.id_conflicts(165535, 165600, files) == ["/etc/subuid: alice owns 100000-165535"]
    assert jail.id_conflicts(200000, 300000, files) == []


def test_uids_are_unique_cyclic_and_run_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jail, "check_host_ids", lambda lo, hi: None)
    table = tmp_path / "uids.json"
    got = [jail.allocate_uid(table, f"p{i}", None, "100-103") for i in range(4)]
    assert got == [100, 101, 102, 103]
    assert jail.allocate_uid(table, "p1", None, "100-103") == 101  # a pod keeps its uid
    with pytest.raises(JailError, match="no free uid"):
        jail.allocate_uid(table, "p4", None, "100-103")
    # p1 and p2 are gone: the search resumes after the last uid handed out, wrapping around.
    assert jail.allocate_uid(table, "p5", ["p0", "p3"], "100-103") == 101
    jail.release_uid(table, "p5")
    assert jail.allocate_uid(table, "p6", ["p0", "p3"], "100-103") == 102
    with pytest.raises(JailError, match="outside"):
        jail.allocate_uid(table, "p0", None, "200-210")


def test_concurrent_leases_never_collide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jail, "check_host_ids", lambda lo, hi: None)
    table = tmp_path / "uids.json"
    with ThreadPoolExecutor(8) as ex:
        uids = list(ex.map(lambda i: jail.allocate_uid(table, f"pod{i}", None, "5000-5999"), range(200)))
    assert len(set(uids)) == 200


def test_sizing_follows_rkt_rule_and_caps_refuse() -> None:
    s1 = Stage1Config(memory_overhead_mib=128, min_memory_mib=256)
    caps = PodsConfig(max_memory_mib=4096, max_vcpus=4)
    assert jail.size_pod(pod(app()), s1, caps) == (256, 1)
    assert jail.size_pod(pod(app("a", memory_mib=300, cpus=1), app("b", memory_mib=200, cpus=2)), s1, caps) == (628, 3)
    with pytest.raises(LimitError, match="1048704 MiB"):
        jail.size_pod(pod(app(memory_mib=1024 * 1024)), s1, caps)
    with pytest.raises(LimitError, match="1000 vCPUs"):
        jail.size_pod(pod(app(cpus=1000)), s1, caps)


def test_jail_spec_limits() -> None:
    s1, caps = Stage1Config(), PodsConfig(max_memory_mib=4096, max_vcpus=4)
    spec = jail.jail_spec(pod(app(memory_mib=100)), 7, s1, caps, JailConfig(memory_margin_mib=200, pids_max=64))
    assert (spec.uid, spec.gid, spec.memory_mib, spec.memory_limit_mib, spec.pids_max) == (7, 7, 256, 456, 64)
    assert spec.cpu_quota is None
    assert jail.jail_spec(pod(app(cpus=2)), 7, s1, caps, JailConfig()).cpu_quota == 2.0


def test_cgroup_hierarchies_and_limits() -> None:
    v1 = ("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
          "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
          "39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
          "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    picked = cgroups.choose(cgroups.parse_mountinfo(v1, ""))
    assert {k: (str(h.mount), h.version) for k, h in picked.items()} == {
        "memory": ("/sys/fs/cgroup/memory", 1), "cpu": ("/sys/fs/cgroup/cpu", 1), "pids": ("/sys/fs/cgroup/pids", 1)}
    v2 = "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    picked = cgroups.choose(cgroups.parse_mountinfo(v2, "cpuset cpu io memory pids"))
    assert {h.version for h in picked.values()} == {2}
    with pytest.raises(JailError, match="pids"):
        cgroups.choose(cgroups.parse_mountinfo(v2, "memory cpu"))
    js = JailSpec(uid=1, gid=1, memory_mib=256, vcpus=2, memory_limit_mib=512, pids_max=100, cpu_quota=1.5)
    assert cgroups.limit_files(js, 2, "memory") == [("memory.max", str(512 << 20)), ("memory.swap.max", "0")]
    assert cgroups.limit_files(js, 2, "cpu") == [("cpu.max", "150000 100000")]
    assert ("cpu.cfs_quota_us", "-1") in cgroups.limit_files(JailSpec(1, 1, 1, 1, 1, 1), 1, "cpu")
    assert cgroups.limit_files(js, 1, "pids") == [("pids.max", "100")]


def _spec(accel: str = "tcg", network: NetworkPlan | None = None):  # type: ignore[no-untyped-def]
    from kvmrkt.pods.manifest import MountPoint, Volume

    m = PodManifest(uuid=UUID, apps=(app(mounts=(MountPoint("v", "/v"),)),),
                    volumes=(Volume("v", "host", "/srv/data", read_only=False),), hostname="h")
    js = JailSpec(uid=5, gid=5, memory_mib=256, vcpus=1, memory_limit_mib=512, pids_max=100)
    return build_vmspec(m, cfg=Stage1Config(), jail=js, accel=accel, kernel=Path("/assets/vmlinux"),
                        rootfs={"web": Path("/store/r.erofs")}, verity={"web": {"root": "ab", "salt": "cd"}},
                        interactive=False, debug=False, tsc_khz=None, network=network)


def test_layout_holds_only_what_the_vm_needs() -> None:
    spec = _spec()
    jailed, layout = jails.plan(spec, Path("/pods/x"))
    assert str(jailed.kernel) == "/kernel" and jailed.initrd == "/initrd.img"
    assert [str(d.path) for d in jailed.disks] == ["/images/app0", "/images/app0v"]
    assert [str(s.path) for s in jailed.shares] == ["/shares/vol0"]
    sources = {str(b.source): b for b in layout.inputs}
    assert set(sources) == {"/assets/vmlinux", "/pods/x/initrd.img", "/store/r.erofs", "/store/r.verity", "/srv/data"}
    assert sources["/srv/data"].writable and not sources["/store/r.erofs"].writable
    assert [d[0] for d in layout.devices] == ["null", "urandom"]
    assert layout.entries() == ["bin", "dev", "etc", "images", "initrd.img", "kernel", "lib", "lib64", "proc",
                                "sbin", "shares", "usr"]
    tap = NetworkPlan("cni", "/run/netns/x", (Nic("eth0", "02:00:00:00:00:01", 1500, "tap0"),))
    _, kvm = jails.plan(_spec("kvm", tap), Path("/pods/x"))
    assert [d[0] for d in kvm.devices] == ["null", "urandom", "net/tun", "kvm"]
    libvirt, _ = jails.plan(spec, Path("/pods/x"), prefix="/run/kvmrkt/x")
    assert str(libvirt.kernel) == "/run/kvmrkt/x/kernel"


def test_argv_passes_every_written_file_and_socket_as_a_descriptor() -> None:
    jailed, _ = jails.plan(_spec(), Path("/pods/x"))
    names = [jailed.console_socket, jailed.qmp_socket, *(p.path for p in jailed.ports)]
    fds = {n: 10 + i for i, n in enumerate(names)}
    argv = build_argv(jailed, fds=fds)
    joined = " ".join(argv)
    assert argv.index("-add-fd") < argv.index("-chardev")
    # The only file QEMU writes is the guest status; the console and app output are sockets kvmrkt reads.
    assert f"socket,id=console,fd={fds['console.sock']},server=on,wait=off" in joined
    assert f"-add-fd fd={fds['guest-status']},set=1" in joined and "file,id=port0,path=/dev/fdset/1" in joined
    assert joined.count("-add-fd") == 1 and f"socket,id=port3,fd={fds['stdout0.sock']}," in joined
    assert f"socket,id=qmp,fd={fds['qmp.sock']},server=on,wait=off" in joined
    assert "security_model=none" in joined and "passthrough" not in joined
    assert "path=/" + "shares/vol0" in joined.replace("path=/shares", "path=/shares")
    assert not any(a.startswith(("/pods", "/store", "/assets", "/srv")) or "path=/pods" in a for a in argv)
    with pytest.raises(ConfigError, match="descriptor"):
        build_argv(jailed, fds={})


def test_acl_encoding() -> None:
    base = shares.from_mode(0o755)
    grant = shares.with_users(base, {1000: 7})
    assert (shares.MASK, 7, shares.UNDEFINED_ID) in grant and (shares.USER, 7, 1000) in grant
    assert shares.decode(shares.encode(grant)) == sorted(grant, key=lambda e: (e[0], e[2]))
    assert shares.with_users(grant, {1000: 5}).count((shares.USER, 7, 1000)) == 1  # widened, never narrowed
    with pytest.raises(ValueError):
        shares.decode(b"\x01\0\0\0")


def test_grants_stack_and_restore_the_original(tmp_path: Path) -> None:
    data, share = tmp_path / "data", tmp_path / "share"
    share.mkdir(mode=0o755)
    os.chmod(share, 0o755)
    shares.grant(data, "a", ["a"], share, 3000001, write=True)
    shares.grant(data, "b", ["a", "b"], share, 3000002, write=False)
    acl = shares.decode(os.getxattr(share, shares.XATTR))
    assert (shares.USER, 7, 3000001) in acl and (shares.USER, 5, 3000002) in acl
    assert shares.revoke(data, "a") == []
    acl = shares.decode(os.getxattr(share, shares.XATTR))
    assert (shares.USER, 5, 3000002) in acl and not any(e[2] == 3000001 for e in acl)
    assert shares.revoke(data, "b") == []
    with pytest.raises(OSError):
        os.getxattr(share, shares.XATTR)
    assert stat.S_IMODE(share.stat().st_mode) == 0o755
    link = tmp_path / "link"
    link.symlink_to(share)
    shares.grant(data, "c", ["c"], link, 3000003, write=True)  # the link's target gets the grant
    assert (shares.USER, 7, 3000003) in shares.decode(os.getxattr(share, shares.XATTR))
    shares.revoke(data, "c")
    (tmp_path / "file").write_text("x")
    with pytest.raises(JailError, match="Not a directory"):
        shares.grant(data, "d", ["d"], tmp_path / "file", 3000004, write=True)


def test_grants_of_another_data_dir_survive_a_revoke(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir(mode=0o750)
    os.chmod(share, 0o750)
    shares.grant(tmp_path / "one", "a", ["a"], share, 3000001, write=False)
    shares.grant(tmp_path / "two", "x", ["x"], share, 3000009, write=False)  # another installation, same dir
    assert shares.revoke(tmp_path / "one", "a") == []
    acl = shares.decode(os.getxattr(share, shares.XATTR))
    assert (shares.USER, 5, 3000009) in acl and not any(e[2] == 3000001 for e in acl)
    assert shares.revoke(tmp_path / "two", "x") == []
    with pytest.raises(OSError):
        os.getxattr(share, shares.XATTR)  # no ACL left, as before
    assert stat.S_IMODE(share.stat().st_mode) == 0o750


def test_no_grant_where_everybody_has_the_access_already(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    os.chmod(share, 0o755)
    shares.grant(tmp_path / "d", "a", ["a"], share, 3000001, write=False)
    assert shares.XATTR not in os.listxattr(share)
    assert json.loads((tmp_path / "d" / "jail" / "shares.json").read_text()) == {}
    assert shares.revoke(tmp_path / "d", "a") == []


@pytest.mark.parametrize(("table", "message"), [
    ('uid_range = "0-100"', "uid_range"), ('uid_range = "2000-1000"', "uid_range"), ('uid_range = "a-b"', "uid_range"),
    ('cgroup_parent = "../escape"', "cgroup_parent"), ('cgroup_parent = "/sys/fs/cgroup/x"', "cgroup_parent"),
    ('cgroup_parent = ""', "cgroup_parent"), ("memory_margin_mib = 0", "positive"), ("pids_max = -1", "positive"),
    ("pids = 5", "unknown key"),
])
def test_bad_jail_config_is_refused(tmp_path: Path, table: str, message: str) -> None:
    from kvmrkt.config import load_config

    (tmp_path / "config.toml").write_text(f"[jail]\n{table}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(config_dir=tmp_path)


def test_bad_pod_caps_config_is_refused(tmp_path: Path) -> None:
    from kvmrkt.config import load_config

    for table in ("max_memory_mib = 0", "max_vcpus = -2", 'max_vcpus = "4"'):
        (tmp_path / "config.toml").write_text(f"[pods]\n{table}\n")
        with pytest.raises(ConfigError):
            load_config(config_dir=tmp_path)
