"""Pure parsing of rkt-style run arguments, config files and insecure options."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmrkt.config import INSECURE_VALUES, load_config, parse_insecure_options
from kvmrkt.errors import ConfigError, ManifestError
from kvmrkt.pods.launch import pod_exit_code
from kvmrkt.pods.manifest import MountPoint
from kvmrkt.pods.runargs import default_app_name, parse_apps, parse_cpu, parse_memory, parse_volume


def test_apps_split_on_images_and_triple_dash() -> None:
    apps = parse_apps(["img1", "--exec", "/bin/sh", "--set-env=A=1", "--", "-c", "exit 3", "---",
                       "img2", "--name", "db", "--memory", "512M", "--cpu", "500m", "--mount",
                       "volume=v,target=/v", "--", "x"])
    assert [a.image for a in apps] == ["img1", "img2"]
    assert apps[0].exec == "/bin/sh" and apps[0].args == ["-c", "exit 3"] and apps[0].env == [("A", "1")]
    assert apps[1].name == "db" and apps[1].memory_mib == 489 and apps[1].cpus == 1
    assert apps[1].mounts == [MountPoint("v", "/v")] and apps[1].args == ["x"]


@pytest.mark.parametrize("tokens", [[], ["--exec", "x"], ["img", "--bogus", "1"], ["img", "--user"], ["--", "a"]])
def test_bad_app_lines_are_errors(tokens: list[str]) -> None:
    with pytest.raises(ConfigError):
        parse_apps(tokens)


def test_sizes() -> None:
    assert parse_memory("256Mi") == 256 and parse_memory("1G") == 954 and parse_memory("1Gi") == 1024
    assert parse_cpu("2") == 2 and parse_cpu("1.5") == 2 and parse_cpu("250m") == 1
    for bad in ("", "12X", "-1"):
        with pytest.raises(ConfigError):
            parse_memory(bad)
    with pytest.raises(ConfigError):
        parse_cpu("0")


def test_volume_flag() -> None:
    v = parse_volume("data,kind=host,source=/srv/data,readOnly=true")
    assert (v.name, v.kind, v.source, v.read_only) == ("data", "host", "/srv/data", True)
    assert parse_volume("tmp,kind=empty").kind == "empty"
    for bad in ("data,kind=host", "data,kind=nfs", "data,kind=empty,readOnly=maybe", "Bad,kind=empty",
                "d,kind=empty,size=1"):
        with pytest.raises((ConfigError, ManifestError)):
            parse_volume(bad)


def test_default_app_names_are_unique_dns_labels() -> None:
    taken: set[str] = set()
    first = default_app_name("registry.example/Team/Web_App:1.0", taken)
    taken.add(first)
    assert first == "web-app"
    assert default_app_name("web-app:2", taken) == "web-app-2"


def test_insecure_options_expand_and_reject_unknown() -> None:
    assert parse_insecure_options("all-fetch") == {"image", "tls", "http"}
    assert parse_insecure_options("all") == HONOURED
    assert parse_insecure_options("tpm,seccomp") == {"tpm", "seccomp"}
    assert parse_insecure_options("none") == frozenset()
    with pytest.raises(ConfigError, match="bogus"):
        parse_insecure_options("image,bogus")


# Each value and the code that honours it: image (engine._gate, engine.check_trust), tls and http
# (registry.RegistryClient), capabilities/paths/seccomp (confinement.lift), tpm (engine._measure).
HONOURED = frozenset({"image", "tls", "http", "capabilities", "paths", "seccomp", "tpm"})


@pytest.mark.parametrize("value", sorted(INSECURE_VALUES))
def test_every_accepted_insecure_option_switches_off_an_honoured_check(value: str) -> None:
    assert parse_insecure_options(value) <= HONOURED


@pytest.mark.parametrize("value", ["pubkey", "ondisk", "selinux", "image,ondisk", "all,selinux"])
def test_insecure_options_honoured_nowhere_are_refused(value: str) -> None:
    """A bypass that would be recorded (and measured) but happen nowhere is refused, with the reason."""
    with pytest.raises(ConfigError, match="is not supported") as err:
        parse_insecure_options(value)
    assert err.value.hint and "valid values" in err.value.hint


def test_config_file_is_strict(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[stage1]\naccel = "tcg"\nboot_timeout = 5\n')
    cfg = load_config(config_dir=tmp_path, overrides={"accel": None, "backend": "qemu"})
    assert cfg.stage1.accel == "tcg" and cfg.stage1.boot_timeout == 5
    assert load_config(config_dir=tmp_path, overrides={"accel": "kvm"}).stage1.accel == "kvm"
    for bad, word in (('[stage1]\nacel = "tcg"\n', "acel"), ("[stage2]\n", "stage2"),
                      ('[stage1]\nboot_timeout = "5"\n', "boot_timeout"), ("[stage1\n", "cannot read"),
                      ('[stage1]\naccel = "fast"\n', "accel"), ("[stage1]\nsandbox = 1\n", "sandbox")):
        (tmp_path / "config.toml").write_text(bad)
        with pytest.raises(ConfigError, match=word):
            load_config(config_dir=tmp_path)


def test_pod_exit_code_is_first_nonzero_in_app_order() -> None:
    assert pod_exit_code({"a": 0, "b": 3, "c": 4}) == 3
    assert pod_exit_code({"a": 0}) == 0
    assert pod_exit_code({"a": 9}) == 9
