"""VM templates, the pure parts: shapes, the handoff frame, a held ctl mux (stage1_kvm/template.py, ctlmux.py)."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import time
from pathlib import Path

import pytest

from kvmrkt.config import Stage1Config
from kvmrkt.digest import Digest
from kvmrkt.errors import TemplateError
from kvmrkt.stage1 import Nic
from stage1_kvm import agent, ctlmux, template
from stage1_kvm.assets import Assets
from stage1_kvm.vmspec import Disk, Port, VMSpec


def _spec(**kw: object) -> VMSpec:
    base: dict[str, object] = dict(
        name="kvmrkt-x", accel="tcg", memory_mib=256, vcpus=1, kernel=Path("/k"), initrd="initrd.img",
        cmdline="console=ttyS0", disks=(Disk("app0", Path("/pods/a/app0.img"), "app0"),), shares=(),
        ports=(Port("kvmrkt.status", "file", "guest-status"),))
    return VMSpec(**{**base, **kw})  # type: ignore[arg-type]


def _assets() -> Assets:
    d = Digest.of_bytes(b"x")
    return Assets("minimal", Path("/k"), Path("/i"), d, d, "key", Path("/g"), d)


def test_a_shape_holds_no_pod_path_and_changes_with_what_the_guest_state_depends_on(tmp_path: Path) -> None:
    qemu = str(tmp_path / "qemu")
    Path(qemu).write_text("")
    shape = template.shape_of(_spec(), assets=_assets(), qemu=qemu)
    assert shape is not None and "/pods/a" not in repr(shape)
    other_pod = template.shape_of(_spec(disks=(Disk("app0", Path("/pods/b/app0.img"), "app0"),), name="kvmrkt-y"),
                                  assets=_assets(), qemu=qemu)
    assert other_pod == shape and template.shape_key(other_pod) == template.shape_key(shape)
    for change in ({"memory_mib": 512}, {"vcpus": 2}, {"cmdline": "console=ttyS0 quiet"}, {"disks": ()}):
        changed = template.shape_of(_spec(**change), assets=_assets(), qemu=qemu)
        assert changed is not None and template.shape_key(changed) != template.shape_key(shape), change


def test_user_networking_has_no_template(tmp_path: Path) -> None:
    nic = Nic("eth0", "52:54:00:00:00:01", 1500, tap=None)
    assert template.shape_of(_spec(nics=(nic,)), assets=_assets(), qemu="/bin/sh") is None
    tap = Nic("eth0", "52:54:00:00:00:01", 1500, tap="tap0")
    assert template.shape_of(_spec(nics=(tap,)), assets=_assets(), qemu="/bin/sh") is not None


def test_the_handoff_frame_carries_a_fresh_seed_and_the_clock() -> None:
    frames = [template.handoff_frame(b"version 6\n") for _ in range(2)]
    for frame in frames:
        header, config = frame.split(b"\n", 1)
        m = re.fullmatch(rb"POD (\d+) ([0-9a-f]{128}) (\d+) (\d+)", header)
        assert m and int(m[1]) == len(config) and config == b"version 6\n"
        assert abs(int(m[3]) - time.time()) < 5 and int(m[4]) < 10**9
    assert frames[0].split()[2] != frames[1].split()[2]


def test_a_bad_key_is_refused_before_any_path_is_built(tmp_path: Path) -> None:
    cfg = Stage1Config(templates_dir=tmp_path)
    with pytest.raises(TemplateError, match="bad template key"):
        template.remove(cfg, "../x")
    assert template.listing(cfg) == [] and template.find(cfg, {"format": 1}) is None


def test_a_held_mux_sends_the_handoff_before_anything_else(tmp_path: Path) -> None:
    guest = agent.listen(tmp_path, "ctl.sock")
    guest.settimeout(0.3)
    with ctlmux.serve(tmp_path, io.BytesIO(), held=True) as mux:
        with pytest.raises(socket.timeout):
            guest.accept()  # held: not connected, so nothing can reach the guest before its pod
        mux.handoff(b"POD 0\n")
        guest.settimeout(5)
        conn, _ = guest.accept()
        conn.settimeout(5)
        assert conn.recv(64) == b"POD 0\n"
        conn.close()


def _plant(directory: Path, name: str, shape: object, *, uid: int = 0, mode: int = 0o600) -> None:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(shape))
    os.chown(path, uid, 0)
    path.chmod(mode)


def test_only_roots_well_formed_records_are_built(tmp_path: Path) -> None:
    """A recorded shape becomes QEMU options and file names of a VM that `template build` runs as root: a record
    another user planted, or one whose strings are not plain names, is never built."""
    qemu = str(tmp_path / "qemu")
    Path(qemu).write_text("")
    good = template.shape_of(_spec(), assets=_assets(), qemu=qemu)
    assert good is not None and template.valid_shape(json.loads(json.dumps(good)))
    cfg = Stage1Config(templates_dir=tmp_path / "t")
    template.want(cfg, good)
    wanted = tmp_path / "t" / template.WANTED
    hostile = [
        {**good, "disks": [["app0,file=/etc/shadow", "app0"]]},  # an option smuggled into -drive
        {**good, "ports": [["kvmrkt.ctl", "socket", "../../../etc/cron.d/x"]]},  # a socket made anywhere
        {**good, "memory_mib": True},
        {**good, "cmdline": "console=ttyS0\ninit=/bin/sh"},
        {**good, "nics": [["eth0"]]},
        {**good, "extra": 1},
        [good],
    ]
    for i, shape in enumerate(hostile):
        assert not template.valid_shape(shape), shape
        _plant(wanted, f"root{i}", shape)
    _plant(wanted, "other-user", {**good, "memory_mib": 512}, uid=65534)
    _plant(wanted, "group-writable", {**good, "memory_mib": 1024}, mode=0o620)
    assert template.wanted(cfg) == [good]
    wanted.chmod(0o770)  # a directory others may write into: nothing in it is believed
    assert template.wanted(cfg) == []
    with pytest.raises(TemplateError, match="not a shape kvmrkt records"):
        template.build(cfg, _assets(), hostile[0], qemu=qemu)
