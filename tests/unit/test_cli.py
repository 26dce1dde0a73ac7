"""The CLI surface: help texts, config printing and error exit codes (no VMs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def kvmrkt(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmrkt", "--dir", str(tmp_path / "d"), "--config-dir",
                           str(tmp_path), *args], capture_output=True, text=True, check=False)


def test_run_help_explains_app_flags_and_exit_codes(tmp_path: Path) -> None:
    out = kvmrkt(tmp_path, "run", "--help").stdout
    for word in ("--exec", "--set-env", "--mount", "-- ARGS", "--volume", "--accel", "Exit code"):
        assert word in out


def test_config_prints_merged_json(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[stage1]\nstop_timeout = 4\n')
    doc = json.loads(kvmrkt(tmp_path, "--insecure-options=image", "config", "--stage1", "qemu").stdout)
    assert doc["stage1"]["stop_timeout"] == 4 and doc["insecure_options"] == ["image"]
    assert doc["paths"]["data_dir"] == str(tmp_path / "d")


def test_config_errors_exit_2_with_the_key(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[stage1]\nbogus = 1\n')
    res = kvmrkt(tmp_path, "config")
    assert res.returncode == 2 and "bogus" in res.stderr and "Traceback" not in res.stderr


def test_unknown_pod_exit_7(tmp_path: Path) -> None:
    res = kvmrkt(tmp_path, "status", "deadbeef")
    assert res.returncode == 7 and "no pod" in res.stderr


def test_version(tmp_path: Path) -> None:
    out = kvmrkt(tmp_path, "version").stdout
    assert "kvmrkt version" in out and "accel auto:" in out
    assert "stage1 backends: libvirt, qemu\n" in out


def test_policy_check_without_policy_json_is_an_error_exit_4(tmp_path: Path) -> None:
    res = kvmrkt(tmp_path, "policy", "check", str(tmp_path))
    assert res.returncode == 4 and "Traceback" not in res.stderr
    assert f"kvmrkt: error: {tmp_path}: no policy.json: every image is rejected" in res.stderr


def test_stage1_choices_come_from_the_backend_registry(tmp_path: Path) -> None:
    """``--stage1`` offers exactly the registered backends, each importable; a name outside the registry is
    refused by every command that takes it (``config --stage1`` used to print it as the backend)."""
    import importlib

    from kvmrkt.cli import cli
    from kvmrkt.stage1 import BACKEND_NAMES, BACKENDS

    for name in ("run", "prepare", "config"):
        opt = next(p for p in cli.commands[name].params if p.name == "stage1")
        assert tuple(opt.type.choices) == BACKEND_NAMES == tuple(BACKENDS)  # type: ignore[attr-defined]
    for target in BACKENDS.values():
        module, cls = target.split(":")
        assert hasattr(importlib.import_module(module), cls)
    for cmd in (["config", "--stage1", "../../evil"], ["run", "--stage1", "firecracker", "busybox"]):
        res = kvmrkt(tmp_path, *cmd)
        assert res.returncode == 2 and "--stage1" in res.stderr and "Traceback" not in res.stderr
