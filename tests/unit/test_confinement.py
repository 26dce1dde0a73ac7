"""Pure confinement logic: capability and seccomp resolution (defaults, flags, isolators, OCI fields, insecure
options), the BPF program, the manifest form and the guest config lines."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from kvmrkt.errors import ManifestError
from kvmrkt.host.syscalls import SYSCALLS_X86_64
from kvmrkt.pods import confinement as c
from kvmrkt.pods.runargs import parse_apps


def test_defaults_are_the_oci_set_rkt_blacklist_and_runc_paths() -> None:
    d = c.Confinement()
    assert len(d.capabilities) == 14 and "CAP_SYS_ADMIN" not in d.capabilities and "CAP_NET_RAW" in d.capabilities
    assert d.seccomp is not None and d.seccomp.mode == "remove"
    for call in ("ptrace", "kexec_load", "init_module", "finit_module", "bpf", "keyctl", "pidfd_getfd",
                 "open_by_handle_at", "mount", "fsopen", "move_mount", "io_uring_setup"):
        assert call in d.seccomp.syscalls
    assert "/proc/kcore" in d.masked_paths and "/proc/sys" in d.readonly_paths
    assert c.cap_mask(d.capabilities) == 0xA80425FB  # the OCI default bounding set, as /proc shows it


def test_each_insecure_option_lifts_only_its_layer() -> None:
    d = c.Confinement()
    caps = c.lift(d, {"capabilities"})
    assert caps.capabilities == c.CAPABILITIES and caps.seccomp == d.seccomp and caps.masked_paths == d.masked_paths
    sec = c.lift(d, {"seccomp"})
    assert sec.seccomp is None and sec.capabilities == d.capabilities and sec.readonly_paths == d.readonly_paths
    paths = c.lift(d, {"paths"})
    assert paths.masked_paths == () == paths.readonly_paths and paths.seccomp == d.seccomp
    assert c.lift(d, {"image", "tpm"}) == d


def test_image_isolators_only_narrow_and_flags_beat_them() -> None:
    iso = [("os/linux/capabilities-retain-set", json.dumps({"set": ["CAP_NET_RAW", "CAP_SYS_ADMIN"]})),
           ("os/linux/seccomp-retain-set", json.dumps({"set": ["read", "write", "ptrace"], "errno": "ENOSYS"})),
           ("os/linux/no-new-privileges", "true")]
    from_image = c.resolve(c.Request(), iso, ())
    assert from_image.capabilities == ("CAP_NET_RAW",)  # CAP_SYS_ADMIN is not the image's to ask for
    assert from_image.seccomp == c.Seccomp("retain", ("read", "write"), "ENOSYS")  # ptrace stays denied
    assert from_image.no_new_privileges
    wide = [("os/linux/seccomp-retain-set", json.dumps({"set": ["@appc.io/all"]})),
            ("os/linux/capabilities-remove-set", json.dumps({"set": ["CAP_KILL"]})),
            ("os/linux/no-new-privileges", "false")]
    narrowed = c.resolve(c.Request(), wide, ())
    assert narrowed.seccomp is not None and narrowed.seccomp.mode == "retain"
    assert not set(c.DEFAULT_DENY) & set(narrowed.seccomp.syscalls) and "read" in narrowed.seccomp.syscalls
    assert "CAP_KILL" not in narrowed.capabilities and len(narrowed.capabilities) == 13
    assert not narrowed.no_new_privileges
    denied = c.resolve(c.Request(), [("os/linux/seccomp-remove-set", json.dumps({"set": ["mkdir"]}))], ())
    assert denied.seccomp is not None and {"mkdir", "ptrace"} <= set(denied.seccomp.syscalls)
    flags = c.Request(caps_retain=("CAP_SYS_ADMIN",), seccomp=c.parse_seccomp_flag("mode=remove,mkdir"))
    both = c.resolve(flags, iso, ())  # the operator may widen
    assert both.capabilities == ("CAP_SYS_ADMIN",) and both.seccomp == c.Seccomp("remove", ("mkdir",))
    assert "CAP_KILL" in c.resolve(c.Request(caps_remove=("CAP_NET_RAW",)), wide, ()).capabilities
    with pytest.raises(ManifestError, match="cannot be combined"):
        c.resolve(c.Request(caps_retain=("CAP_CHOWN",), caps_remove=("CAP_KILL",)), (), ())
    with pytest.raises(ManifestError, match="unknown capability"):
        c.resolve(c.Request(), [("os/linux/capabilities-retain-set", json.dumps({"set": ["CAP_NOPE"]}))], ())
    with pytest.raises(ManifestError, match="expected"):
        c.resolve(c.Request(), [("os/linux/seccomp-remove-set", json.dumps(["mkdir"]))], ())


def test_malformed_oci_rlimits_are_refused() -> None:
    for bad in ([{"type": "RLIMIT_NOFILE"}], [{"type": "RLIMIT_NOFILE", "soft": "x", "hard": 1}], ["nope"],
                [{"type": "RLIMIT_BOGUS", "soft": 1, "hard": 1}], [{"type": "RLIMIT_NOFILE", "soft": 9, "hard": 1}]):
        with pytest.raises(ManifestError):
            c.from_oci({"rlimits": bad}, {}, ())


@pytest.mark.parametrize("text", ["mode=keep,read", "read,write", "mode=remove", "mode=remove,nosuchcall",
                                  "mode=remove,@nosuchset", "mode=remove,errno=EWHAT,read"])
def test_bad_seccomp_flags_are_refused(text: str) -> None:
    with pytest.raises(ManifestError):
        c.parse_seccomp_flag(text)


def test_seccomp_flag_sets_and_errno() -> None:
    s = c.parse_seccomp_flag("mode=remove,errno=ENOSYS,@rkt/default-blacklist,mkdir")
    assert s.errno == "ENOSYS" and "mkdir" in s.syscalls and "ptrace" in s.syscalls
    assert len(c.parse_seccomp_flag("mode=retain,@appc.io/all").syscalls) == len(SYSCALLS_X86_64)


def test_unknown_capability_is_an_error() -> None:
    assert c.check_caps(["net_admin", "CAP_SYS_TIME"]) == ("CAP_NET_ADMIN", "CAP_SYS_TIME")
    with pytest.raises(ManifestError, match="unknown capability"):
        c.check_caps(["CAP_MAKE_COFFEE"])


def _run(prog: bytes, arch: int, nr: int) -> int:
    """A tiny classic-BPF interpreter for the instructions the compiler emits."""
    ins = [struct.unpack_from("<HBBI", prog, i) for i in range(0, len(prog), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = ins[pc]
        if code == 0x20:
            acc = arch if k == 4 else nr
        elif code == 0x15:
            pc += jt if acc == k else jf
        elif code == 0x35:
            pc += jt if acc >= k else jf
        elif code == 0x06:
            return k
        pc += 1


def test_bpf_program_denies_and_allows_what_it_says() -> None:
    x86_64, i386 = 0xC000003E, 0x40000003
    remove = c.seccomp_program(c.Seccomp("remove", ("ptrace", "mount"), "EPERM"))
    assert _run(remove, x86_64, SYSCALLS_X86_64["ptrace"]) == 0x00050000 | 1
    assert _run(remove, x86_64, SYSCALLS_X86_64["read"]) == 0x7FFF0000
    assert _run(remove, i386, 26) == 0x80000000  # another ABI: killed
    assert _run(remove, x86_64, 0x40000000 | 1) == 0x00050001  # x32: denied
    retain = c.seccomp_program(c.Seccomp("retain", ("read",), "ENOSYS"))
    assert _run(retain, x86_64, SYSCALLS_X86_64["read"]) == 0x7FFF0000
    assert _run(retain, x86_64, SYSCALLS_X86_64["execve"]) == 0x7FFF0000  # always: the app must start
    assert _run(retain, x86_64, SYSCALLS_X86_64["write"]) == 0x00050000 | 38


def test_manifest_round_trip_and_strictness() -> None:
    conf = c.resolve(c.Request(caps_retain=("CAP_KILL",)), (), {"paths"})
    assert c.Confinement.from_dict(conf.to_dict(), "x") == conf
    bad = conf.to_dict() | {"extra": 1}
    with pytest.raises(ManifestError):
        c.Confinement.from_dict(bad, "x")
    with pytest.raises(ManifestError):
        c.Confinement.from_dict(conf.to_dict() | {"maskedPaths": ["relative"]}, "x")


def test_oci_process_fields_map_onto_the_same_layers() -> None:
    process = {"capabilities": {"bounding": ["CAP_CHOWN", "CAP_KILL"]}, "noNewPrivileges": True,
               "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}]}
    linux = {"maskedPaths": ["/proc/kcore"], "readonlyPaths": [],
             "seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
                 {"names": ["read", "write", "not_on_x86_64"], "action": "SCMP_ACT_ALLOW"},
                 {"names": ["clone"], "action": "SCMP_ACT_ALLOW", "args": [{"index": 0}]}]}}
    conf = c.from_oci(process, linux, ())
    assert conf.capabilities == ("CAP_CHOWN", "CAP_KILL") and conf.no_new_privileges
    assert conf.rlimits == (("RLIMIT_NOFILE", 1024, 4096),)
    assert conf.masked_paths == ("/proc/kcore",) and conf.readonly_paths == ()
    assert conf.seccomp == c.Seccomp("retain", ("clone", "read", "write"))
    deny = c.from_oci({}, {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["ptrace"], "action": "SCMP_ACT_ERRNO"},
        {"names": ["personality"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 0}]}]}}, ())
    assert deny.seccomp == c.Seccomp("remove", ("ptrace",))
    assert c.from_oci({}, {}, ()) == c.Confinement()
    assert c.from_oci({}, {}, {"seccomp"}).seccomp is None


def test_guest_config_lines() -> None:
    conf = c.Confinement(rlimits=(("RLIMIT_NOFILE", 10, 20),), no_new_privileges=True)
    fields = c.guest_config(conf)
    assert fields[0] == ("caps", "a80425fb")
    kinds = [f[0] for f in fields]
    assert "seccomp" in kinds and "nnp" in kinds and ("rlimit", "7", "10", "20") in fields
    assert ("maskpath", "/proc/kcore") in fields and ("ropath", "/proc/sys") in fields
    assert "seccomp" not in [f[0] for f in c.guest_config(c.lift(conf, {"seccomp"}))]


def test_app_flags_parse() -> None:
    apps = parse_apps(["busybox", "--caps-retain=CAP_NET_ADMIN,sys_time", "--seccomp", "mode=retain,read,write"])
    req = apps[0].confinement
    assert req.caps_retain == ("CAP_NET_ADMIN", "CAP_SYS_TIME")
    assert req.seccomp == c.Seccomp("retain", ("read", "write"))


@pytest.mark.parametrize(("rlimits", "message"), [
    ([{"type": "RLIMIT_TEST", "soft": 1024, "hard": 1024}],
     r"process\.rlimits\[0\]\.type: unknown rlimit 'RLIMIT_TEST'"),
    ([{"type": "RLIMIT_NOFILE", "soft": 1, "hard": 1}, {"type": "RLIMIT_NOFILE", "soft": 2, "hard": 2}],
     r"process\.rlimits\[1\]\.type: RLIMIT_NOFILE is given twice"),
    ([{"type": "RLIMIT_NOFILE", "soft": 4096, "hard": 1024}],
     r"process\.rlimits\[0\]: RLIMIT_NOFILE soft limit 4096 is above"),
    ([{"type": "RLIMIT_NOFILE", "soft": "1024", "hard": 1024}], r"process\.rlimits\[0\]: expected"),
    ([{"type": "RLIMIT_NOFILE", "soft": True, "hard": 1024}], r"process\.rlimits\[0\]: expected"),
    ([{"type": "RLIMIT_NOFILE", "soft": -1, "hard": 1024}], r"process\.rlimits\[0\]: expected"),
    ([{"type": "RLIMIT_NOFILE", "soft": 1, "hard": 2**64}], r"process\.rlimits\[0\]: expected"),
    ([{"type": 7, "soft": 1, "hard": 1}], r"process\.rlimits\[0\]: expected"),
    ({"RLIMIT_NOFILE": 1}, r"process\.rlimits must be a list"),
])  # fmt: skip
def test_oci_rlimits_refusals_name_the_field(rlimits: Any, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        c.from_oci({"rlimits": rlimits}, {}, ())


def test_oci_rlimits_are_kept_as_asked() -> None:
    asked = [{"type": "RLIMIT_NOFILE", "soft": 3000, "hard": 4000}, {"type": "RLIMIT_AS", "soft": 0, "hard": 2**64 - 1}]
    conf = c.from_oci({"rlimits": asked}, {}, ())
    assert conf.rlimits == (("RLIMIT_NOFILE", 3000, 4000), ("RLIMIT_AS", 0, 2**64 - 1))
    assert ("rlimit", "7", "3000", "4000") in c.guest_config(conf)
    assert c.from_oci({}, {}, ()).rlimits == ()  # the guest's defaults


def test_oci_capability_sets_are_carried_to_the_guest() -> None:
    caps = {"bounding": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_RAW"], "effective": ["CAP_KILL"],
            "permitted": ["CAP_KILL", "CAP_CHOWN"], "inheritable": ["CAP_CHOWN"], "ambient": ["CAP_CHOWN"]}
    conf = c.from_oci({"capabilities": caps}, {}, ())
    assert conf.capabilities == ("CAP_CHOWN", "CAP_KILL", "CAP_NET_RAW")
    assert conf.capsets == c.CapSets(("CAP_KILL",), ("CAP_CHOWN", "CAP_KILL"), ("CAP_CHOWN",), ("CAP_CHOWN",))
    assert ("capsets", "20", "21", "1", "1") in c.guest_config(conf)
    assert c.Confinement.from_dict(conf.to_dict(), "x") == conf
    # Only bounding given: the other sets are empty (runc); no process.capabilities: kvmrkt's defaults.
    assert c.from_oci({"capabilities": {"bounding": ["CAP_KILL"]}}, {}, ()).capsets == c.CapSets()
    assert c.from_oci({}, {}, ()).capsets is None
    assert not any(f[0] == "capsets" for f in c.guest_config(c.Confinement()))
    assert "capabilitySets" not in c.Confinement().to_dict()  # kvmrkt run's manifests are unchanged
    assert c.lift(conf, {"capabilities"}).capsets is None


@pytest.mark.parametrize(("caps", "message"), [
    ({"bounding": ["CAP_CHOWN", "CAP_TEST"]}, r"process\.capabilities\.bounding: unknown capability 'CAP_TEST'"),
    ({"effective": ["CAP_TEST"]}, r"process\.capabilities\.effective: unknown capability"),
    ({"ambient": ["CAP_TEST"]}, r"process\.capabilities\.ambient: unknown capability"),
    ({"permitted": "CAP_KILL"}, r"process\.capabilities\.permitted must be a list of strings"),
    ({"inheritable": [1]}, r"process\.capabilities\.inheritable must be a list of strings"),
    ({"effective": ["CAP_KILL"]}, r"process\.capabilities: effective capabilities not in the permitted set: CAP_KILL"),
    ({"permitted": ["CAP_KILL"], "ambient": ["CAP_KILL"]}, r"ambient capabilities not both permitted and inheritable"),
    ({"inheritable": ["CAP_SYS_ADMIN"]}, r"inheritable capabilities not in the bounding set: CAP_SYS_ADMIN"),
    (["CAP_KILL"], r"process\.capabilities must be an object"),
])  # fmt: skip
def test_oci_capability_refusals_name_the_field(caps: Any, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        c.from_oci({"capabilities": caps}, {}, ())


def test_manifest_capability_sets_are_strict() -> None:
    good = c.Confinement(capsets=c.CapSets(("CAP_KILL",), ("CAP_KILL",))).to_dict()
    for bad in ({"effective": []}, {"effective": [], "permitted": [], "inheritable": [], "ambient": "x"}, []):
        with pytest.raises(ManifestError, match="capabilitySets"):
            c.Confinement.from_dict(good | {"capabilitySets": bad}, "x")
    with pytest.raises(ManifestError, match="unknown capability"):
        c.Confinement.from_dict(good | {"capabilitySets": {
            "effective": [], "permitted": ["CAP_NOPE"], "inheritable": [], "ambient": []}}, "x")
