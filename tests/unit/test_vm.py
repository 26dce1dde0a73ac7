"""Pure stage1 logic: kernel command line, guest pod config, QEMU argv, status parsing, cpio."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvmrkt.config import Stage1Config
from kvmrkt.errors import ConfigError, ManifestError
from kvmrkt.pods.manifest import AppSpec, MountPoint, PodManifest, Volume
from kvmrkt.stage1 import JailSpec
from stage1_kvm.agent import parse_status, printable_stream, unescape
from stage1_kvm.assets import cpio_archive
from stage1_kvm.qemu_argv import build_argv
from stage1_kvm.vmspec import (
    VMSpec,
    build_vmspec,
    container_config_path,
    escape,
    guest_container_config,
    guest_pod_config,
    kernel_cmdline,
)

JAIL = JailSpec(uid=2000000001, gid=2000000001, memory_mib=256, vcpus=1, memory_limit_mib=512, pids_max=1024)

UUID = "0a9a8f5e-6b1f-4c1e-9a53-1c0f3b0f2d11"


def app(name: str = "web", **kw: object) -> AppSpec:
    base: dict[str, object] = {"name": name, "image_id": "sha256:" + "a" * 64, "image_name": "busybox:latest",
                               "rootfs_digest": "sha256:" + "b" * 64, "exec": ("/bin/sh", "-c", "echo hi")}
    base.update(kw)
    return AppSpec(**base)  # type: ignore[arg-type]


def pod(*apps: AppSpec, volumes: tuple[Volume, ...] = ()) -> PodManifest:
    return PodManifest(uuid=UUID, apps=apps or (app(),), volumes=volumes, hostname="h1")


def spec(manifest: PodManifest, accel: str = "tcg", interactive: bool = False, cfg: Stage1Config | None = None,
         **kw: object) -> VMSpec:
    return build_vmspec(manifest, cfg=cfg or Stage1Config(), jail=JAIL, accel=accel, kernel=Path("/k/vmlinux"),
                        rootfs={a.name: Path(f"/store/{a.name}.erofs") for a in manifest.apps},
                        interactive=interactive, debug=False, tsc_khz=2_500_000, **kw)  # type: ignore[arg-type]


def argv_of(s: VMSpec, qemu: str = "qemu-system-x86_64") -> list[str]:
    names = [s.console_socket, s.qmp_socket, *(p.path for p in s.ports)]
    return build_argv(s, qemu=qemu, fds={n: 10 + i for i, n in enumerate(names)})


def test_cmdline_skips_tsc_calibration_only_under_tcg() -> None:
    tcg = spec(pod()).cmdline
    kvm = spec(pod(), accel="kvm").cmdline
    assert "tsc_early_khz=2500000" in tcg
    assert "tsc_early_khz" not in kvm
    assert "panic=-1" in tcg and "reboot=t" in tcg


def test_cmdline_skips_apic_timer_calibration_only_under_tcg() -> None:
    # TCG has no TSC-deadline timer: the APIC timer calibration costs ~0.24 s of guest time (bench/kernel_boot.py);
    # under KVM the deadline timer skips it and the APIC timer stays the clock event.
    tcg = spec(pod()).cmdline.split()
    kvm = spec(pod(), accel="kvm").cmdline.split()
    assert "noapictimer" in tcg and "noapictimer" not in kvm
    # Debian's cloud kernel (devices through ACPI) hangs after init without its APIC timer
    assert "noapictimer" not in spec(pod(), acpi=True).cmdline.split()
    assert "no_timer_check" in tcg and "no_timer_check" in kvm


def test_cmdline_keeps_the_tsc_clocksource_only_under_tcg() -> None:
    # TCG's CPU lacks constant_tsc: with 2 vCPUs the kernel called the TSC unsynchronized and the pod's clock fell
    # back to refined-jiffies (bench/kernel_boot.py --vcpus 2 --profile). KVM guests use kvm-clock.
    assert "tsc=reliable" in spec(pod()).cmdline.split()
    assert "tsc=reliable" not in spec(pod(), accel="kvm").cmdline.split()


def test_cmdline_presets_lpj_for_other_vcpus_under_tcg_never_shorter_than_the_kernels_tick() -> None:
    one = kernel_cmdline(accel="tcg", tsc_khz=2_500_000, debug=False, vcpus=1).split()
    two = kernel_cmdline(accel="tcg", tsc_khz=2_500_000, debug=False, vcpus=2).split()
    kvm = kernel_cmdline(accel="kvm", tsc_khz=2_500_000, debug=False, vcpus=2).split()
    unknown = kernel_cmdline(accel="tcg", tsc_khz=None, debug=False, vcpus=2).split()
    assert not [w for w in one + kvm + unknown if w.startswith("lpj=")]
    (lpj,) = [int(w.split("=")[1]) for w in two if w.startswith("lpj=")]
    assert lpj >= 2_500_000 * 1000 // 250  # what the kernel (HZ=250) derives itself: delays only get longer
    pod2 = build_vmspec(pod(), cfg=Stage1Config(), jail=dataclasses.replace(JAIL, vcpus=2), accel="tcg",
                        kernel=Path("/k"), rootfs={"web": Path("/x")}, interactive=False, debug=False,
                        tsc_khz=2_500_000)
    assert f"lpj={lpj}" in pod2.cmdline.split()  # the pod's vCPU count reaches the command line


def test_cmdline_keeps_lock_prefixes_for_one_vcpu_under_tcg() -> None:
    # patching the kernel's lock prefixes for one CPU rewrites translated code: 0.06-0.2 s of guest time under TCG
    # (bench/kernel_boot.py --profile); with two vCPUs nothing is patched, and under KVM the patching is cheap.
    def words(accel: str, vcpus: int) -> list[str]:
        return kernel_cmdline(accel=accel, tsc_khz=2_500_000, debug=False, vcpus=vcpus).split()

    assert "noreplace-smp" in words("tcg", 1)
    assert "noreplace-smp" not in words("tcg", 2) + words("kvm", 1)


def test_cmdline_never_trades_isolation_for_boot_time() -> None:
    # Measured levers that weaken the guest (it runs hostile code) or its interrupts are never on the line.
    for accel in ("tcg", "kvm"):
        words = spec(pod(), accel=accel).cmdline.split()
        assert not {w for w in words if w.split("=")[0] in ("mitigations", "nosmp", "nopti", "spectre_v2")}
        assert "random.trust_cpu=on" in words


def test_argv_is_a_lean_microvm() -> None:
    argv = argv_of(spec(pod(app("a"), app("b"))), qemu="/usr/bin/qemu")
    joined = " ".join(argv)
    assert argv[0] == "/usr/bin/qemu"
    assert "-nodefaults" in argv and "-no-user-config" in argv and "-no-reboot" in argv
    assert "microvm" in argv[argv.index("-M") + 1]
    assert argv[argv.index("-accel") + 1].startswith("tcg")
    assert argv[argv.index("-cpu") + 1] == "max"
    assert "file=/store/a.erofs,format=raw,if=none,readonly=on,id=app0" in joined
    assert "virtio-blk-device,drive=app1,serial=app1" in joined
    assert "name=kvmrkt.out.1" in joined and "name=kvmrkt.err.0" in joined
    assert "name=kvmrkt.in.0" not in joined
    assert "-sandbox" in argv
    kvm = argv_of(spec(pod(), accel="kvm"))
    assert kvm[kvm.index("-cpu") + 1] == "host" and kvm[kvm.index("-accel") + 1] == "kvm"


def test_argv_interactive_and_volumes() -> None:
    vols = (Volume("data", "host", "/srv/da,ta", read_only=True), Volume("scratch", "empty"))
    m = pod(app(mounts=(MountPoint("data", "/data"), MountPoint("scratch", "/s"))), volumes=vols)
    joined = " ".join(argv_of(spec(m, interactive=True)))
    assert "name=kvmrkt.in.0" in joined
    # Commas in paths are doubled so a path cannot add QEMU options; QEMU's failed chowns are ignored.
    assert "local,id=vol0,path=/srv/da,,ta,security_model=none,readonly=on" in joined
    assert joined.count("virtio-9p-device") == 1


def test_argv_rejects_newline_paths() -> None:
    m = pod(app())
    s = build_vmspec(m, cfg=Stage1Config(), jail=JAIL, accel="tcg", kernel=Path("/k/vm\nlinux"),
                     rootfs={"web": Path("/x")}, interactive=False, debug=False, tsc_khz=None)
    with pytest.raises(ConfigError):
        argv_of(s)


def test_guest_config_escapes_everything_that_could_inject_lines() -> None:
    m = pod(app(exec=("/bin/echo", "a b", "", "x\nversion 2", "100%"), env=(("K", "v v"),)))
    text = guest_pod_config(m, interactive=False).decode()
    lines = text.splitlines()
    assert lines[0] == "version 6"
    assert "arg a%20b" in lines and "arg %" in lines and "arg x%0Aversion%202" in lines and "arg 100%25" in lines
    assert "env K=v%20v" in lines
    assert sum(1 for ln in lines if ln.startswith("version")) == 1


@pytest.mark.parametrize("value", ["", "plain", "a b", "%", "%41", "tab\there", "ünï", "x\ny"])
def test_escape_roundtrip(value: str) -> None:
    assert unescape(escape(value)) == value
    assert " " not in escape(value) and "\n" not in escape(value)


def test_parse_status_ignores_partial_and_unknown_lines() -> None:
    st = parse_status("READY\nSTART web 31\nEXIT web 7\nERROR db mount%20failed\nBOGUS\nEXIT db 12")
    assert st.ready and not st.done
    assert st.pids == {"web": 31}
    assert st.exits == {"web": 7}
    assert st.errors == {"db": ["mount failed"]}
    assert parse_status("READY\nDONE\n").done


def test_parse_status_believes_only_the_first_exit_and_keeps_escapes_off_terminals() -> None:
    st = parse_status("READY\nEXIT web 1\nEXIT web 0\nERROR web %1B[2Jcleared%07\nSTART db 5\nSTART db 6\n"
                      + "ERROR web " + "x" * 5000 + "\n")
    assert st.exits == {"web": 1} and st.pids == {"db": 5}
    assert st.errors == {"web": ["\\x1b[2Jcleared\\x07"]}
    assert parse_status("FATAL a%0Db\nFATAL later\n").fatal == "a\\x0db"
    st = parse_status("START a%1B%5D0;x%07 3\nEXIT a%C2%9Bb%E2%80%AE 4\n")  # ESC, OSC, C1 CSI, bidi override
    assert st.pids == {"a\\x1b]0;x\\x07": 3} and st.exits == {"a\\x9bb\\u202e": 4}


def test_the_debug_console_reaches_the_terminal_without_escape_sequences() -> None:
    assert printable_stream(b"boot\r\n\x1b]0;pwned\x07\tok\xc2\x9b2J\n") == b"boot\n\\x1b]0;pwned\\x07\tok\\x9b2J\n"


def test_cpio_is_deterministic_newc() -> None:
    a = cpio_archive([("init", 0o100755, b"\x7fELF")])
    assert a == cpio_archive([("init", 0o100755, b"\x7fELF")])
    assert a.startswith(b"070701") and b"TRAILER!!!" in a
    assert len(a) % 4 == 0


def test_the_initramfs_key_covers_every_guest_init_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest init is several files: changing any of them (a header too), adding or renaming one, rebuilds."""
    from stage1_kvm import assets

    monkeypatch.setattr(assets, "GUEST_DIR", tmp_path)
    (tmp_path / "init.c").write_text('#include "init.h"\nint main(void) { return 0; }\n')
    (tmp_path / "init.h").write_text("#define MAX_APPS 32\n")
    keys = [assets.guest_init_key()]
    (tmp_path / "README").write_text("not a source")
    assert assets.guest_init_key() == keys[0]
    (tmp_path / "init.h").write_text("#define MAX_APPS 33\n")
    keys.append(assets.guest_init_key())
    (tmp_path / "util.c").write_text("")
    keys.append(assets.guest_init_key())
    (tmp_path / "util.c").rename(tmp_path / "agent.c")
    keys.append(assets.guest_init_key())
    assert len(set(keys)) == 4
    assert [p.name for p in assets.guest_init_sources()] == ["agent.c", "init.c", "init.h"]


def test_every_guest_init_source_ships_with_the_package() -> None:
    import fnmatch
    import tomllib

    from stage1_kvm import assets

    root = Path(assets.__file__).parent
    doc = tomllib.loads((root.parent / "pyproject.toml").read_text())
    globs = doc["tool"]["setuptools"]["package-data"]["stage1_kvm"]
    sources = [str(p.relative_to(root)) for p in assets.guest_init_sources()]
    assert "guest/init.c" in sources and "guest/init.h" in sources
    assert [s for s in sources if not any(fnmatch.fnmatch(s, g) for g in globs)] == []


def test_module_load_order_puts_dependencies_first() -> None:
    from kvmrkt.errors import AssetError
    from stage1_kvm.assets import module_load_order

    mods = {
        "virtio_ring": b"\0license=GPL\0depends=\0",
        "virtio": b"\0depends=virtio_ring\0",
        "virtio_blk": b"\0depends=virtio,virtio_ring\0",
        "erofs": b"\0depends=libcrc32c\0",
        "libcrc32c": b"\0depends=\0",
    }
    order = [n for n, _ in module_load_order(mods, ("virtio_blk", "erofs"))]
    assert order == ["virtio_ring", "virtio", "virtio_blk", "libcrc32c", "erofs"]
    with pytest.raises(AssetError, match="overlay"):
        module_load_order(mods, ("overlay",))
    with pytest.raises(AssetError, match="libcrc32c"):
        module_load_order({"erofs": mods["erofs"]}, ("erofs",))


def test_acpi_only_for_kernels_that_need_it() -> None:
    m = pod()
    plain = argv_of(spec(m))
    assert plain[plain.index("-M") + 1].endswith("acpi=off")
    s = spec(m, acpi=True)
    assert "acpi=off" not in argv_of(s)[argv_of(s).index("-M") + 1]


def test_domain_xml_is_the_same_microvm() -> None:
    import xml.etree.ElementTree as ET

    from stage1_kvm.domain_xml import build_domain_xml

    vols = (Volume("data", "host", "/srv/data", read_only=True),)
    m = pod(app(mounts=(MountPoint("data", "/data"),)), volumes=vols)
    s = spec(m, interactive=True)
    xml = build_domain_xml(s, uuid=UUID, pod_dir=Path("/pods/x"), qemu="/usr/bin/qemu", jail=JAIL,
                           selinux_label="u:r:t:s0:c1,c2", socket_dir=Path("/run/kvmrkt/x"))
    dom = ET.fromstring(xml)
    assert dom.get("type") == "qemu" and dom.findtext("name") == f"kvmrkt-{UUID}"
    assert dom.find("os/type").get("machine") == "microvm"  # type: ignore[union-attr]
    assert dom.findtext("os/initrd") == "/pods/x/initrd.img" and "tsc_early_khz" in (dom.findtext("os/cmdline") or "")
    assert dom.findtext("on_reboot") == "destroy"
    assert dom.find("devices/memballoon").get("model") == "none"  # type: ignore[union-attr]
    disks = dom.findall("devices/disk")
    assert [d.findtext("serial") for d in disks] == ["app0"] and disks[0].find("readonly") is not None
    assert all(d.find("address").get("type") == "virtio-mmio" for d in disks)  # type: ignore[union-attr]
    # Shared store images are never relabelled (chowned) for one pod's uid.
    assert all(d.find("source/seclabel").get("relabel") == "no" for d in disks)  # type: ignore[union-attr]
    names = {c.find("target").get("name"): c for c in dom.findall("devices/channel")}  # type: ignore[union-attr]
    assert names["kvmrkt.status"].find("source").get("path") == "/pods/x/guest-status"  # type: ignore[union-attr]
    assert names["kvmrkt.ctl"].find("source").get("path") == "/run/kvmrkt/x/ctl.sock"  # type: ignore[union-attr]
    assert "kvmrkt.in.0" in names
    # App output and the console are sockets kvmrkt reads and bounds, never files QEMU grows.
    assert names["kvmrkt.out.0"].get("type") == "unix" and names["kvmrkt.err.0"].get("type") == "unix"
    serial = dom.find("devices/serial")
    assert serial is not None and serial.get("type") == "unix"
    assert serial.find("source").get("path") == "/run/kvmrkt/x/console.sock"  # type: ignore[union-attr]
    fs = dom.find("devices/filesystem")
    assert fs is not None and fs.find("readonly") is not None and fs.find("target").get("dir") == "vol0"  # type: ignore[union-attr]
    assert fs.get("accessmode") == "squash" and fs.get("multidevs") is None
    # The pod's shared export: the filesystems bound into it keep distinct inode numbers in the guest.
    shared = ET.fromstring(build_domain_xml(spec(m, shared_export=Path("/pods/x/shared")), uuid=UUID,
                                            pod_dir=Path("/pods/x"), qemu="/q", jail=JAIL))
    fs = shared.findall("devices/filesystem")[-1]
    assert fs.get("multidevs") == "remap" and fs.find("readonly") is None
    assert fs.find("target").get("dir") == "kvmrkt-shared"  # type: ignore[union-attr]
    labels = {s.get("model"): s.findtext("label") for s in dom.findall("seclabel")}
    assert labels == {"dac": "+2000000001:+2000000001", "selinux": "u:r:t:s0:c1,c2"}


def test_container_config_shares_the_app_lines_and_refuses_bad_input() -> None:
    app = AppSpec(name="c1", image_id="", image_name="busybox", rootfs_digest="", exec=("sh", "-c", "echo a b"),
                  env=(("A", "1 2"),), mounts=(MountPoint(volume="c1-data", target="/data"),))
    vols = (Volume(name="c1-data", kind="bind", source="/srv/data", read_only=True),
            Volume(name="c1-tmp", kind="empty"))
    text = guest_container_config(app, vols, root="binds/c1-root/rootfs", read_only=True, join="container",
                                  shm="container").decode()
    lines = text.splitlines()
    assert lines[:6] == ["version 6", "volume c1-data bind binds/c1-data/data 1", "volume c1-tmp empty - 0",
                         "app c1", "rootdir binds/c1-root/rootfs 1", "join container"]
    assert lines[6] == "shm container" and "arg echo%20a%20b" in lines and "env A=1%202" in lines
    pod = guest_pod_config(PodManifest(uuid="u", apps=(app,), volumes=vols), interactive=False).decode()
    assert pod.split("app c1\n", 1)[1].split("\n", 1)[1] == text.split("shm container\n", 1)[1]  # the same lines
    assert container_config_path("c1") == "ctr/c1.cfg"
    for bad in ("../x", "a/b", "", "A", "x" * 41, ".."):
        with pytest.raises(ManifestError, match="bad container name"):
            container_config_path(bad)
    for root in ("", "/abs", "binds/../x", "binds/./x", "binds//x"):
        with pytest.raises(ManifestError, match="bad container root"):
            guest_container_config(app, (), root=root, read_only=True)
    with pytest.raises(ManifestError, match="kind 'host'"):
        guest_container_config(app, (Volume(name="h", kind="host", source="/srv"),), root="r", read_only=False)
