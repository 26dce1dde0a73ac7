"""Every JSON document kvmrkt takes from outside goes through ``kvmrkt.jsondoc``: parse bombs (nesting 200,000
levels deep, huge files, NaN) become each module's own error, never a traceback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kvmrkt import jsondoc
from kvmrkt.errors import ConfigError, EventLogError, KvmrktError, ManifestError, PolicyLoadError
from kvmrkt.images import oci, registry
from kvmrkt.net import netconf
from kvmrkt.ocirt import runtime as ocirt
from kvmrkt.pods import confinement
from measure import events
from policy import model, trust

DEEP = "[" * 200_000 + "]" * 200_000
DEEP_OBJECT = '{"a": ' * 200_000 + "1" + "}" * 200_000


@pytest.mark.parametrize("doc", [DEEP, DEEP_OBJECT, "[" * 65 + "]" * 65, '{"a": NaN}', '[-Infinity]'])
def test_bombs_are_value_errors(doc: str) -> None:
    with pytest.raises(jsondoc.JSONBombError):
        jsondoc.loads(doc)


def test_limits_leave_ordinary_documents_alone(tmp_path: Path) -> None:
    assert jsondoc.loads("[" * 64 + "]" * 64) is not None
    assert jsondoc.loads(b'{"a": [1, 2.5, {"b": null}]}') == {"a": [1, 2.5, {"b": None}]}
    with pytest.raises(ValueError, match="4300"):
        jsondoc.loads("1" * 5000)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 100 + b"1")
    with pytest.raises(jsondoc.JSONBombError, match="larger than 100 bytes"):
        jsondoc.read(big, max_bytes=100)


def _policy(tmp_path: Path, where: str) -> None:
    path = tmp_path / where
    path.parent.mkdir(parents=True, exist_ok=True)
    if where != "policy.json":
        (tmp_path / "policy.json").write_text('{"default": [{"type": "reject"}]}')
    path.write_text(DEEP)
    model.load_policy(tmp_path)


def _oci_bundle(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(DEEP)
    ocirt.load_bundle(tmp_path)


def _cni(tmp_path: Path) -> None:
    (tmp_path / netconf.NET_DIR).mkdir()
    (tmp_path / netconf.NET_DIR / "deep.conf").write_text(DEEP)
    netconf.load_networks(tmp_path)


def _registries_d(tmp_path: Path) -> None:
    (tmp_path / "auth.d").mkdir()
    (tmp_path / "auth.d" / "deep.json").write_text(DEEP)
    registry.load_credentials(tmp_path, "reg.example")


NESTED = "nested deeper than 64 levels"
ENTRY_POINTS: dict[str, tuple[Callable[[Path], object], type[KvmrktError], str]] = {
    "policy.json": (lambda p: _policy(p, "policy.json"), PolicyLoadError, NESTED),
    "policy drop-in": (lambda p: _policy(p, "policy.d/team.json"), PolicyLoadError, NESTED),
    "image manifest": (lambda p: oci.load_json(DEEP.encode(), "manifest"), ManifestError, NESTED),
    "image isolator": (lambda p: confinement.narrow(confinement.DEFAULT, [
        ("os/linux/capabilities-retain-set", DEEP)]), ManifestError, "retain-set: expected"),
    "OCI config.json": (_oci_bundle, ManifestError, NESTED),
    "CNI config": (_cni, ConfigError, NESTED),
    "auth.d": (_registries_d, ConfigError, NESTED),
    "event log": (lambda p: events.parse_log(b"\x1e" + DEEP.encode() + b"\n"), EventLogError, NESTED),
}  # fmt: skip


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_a_deeply_nested_document_is_the_modules_error(tmp_path: Path, name: str) -> None:
    call, error, message = ENTRY_POINTS[name]
    with pytest.raises(error, match=message):
        call(tmp_path)


def test_a_deeply_nested_signature_payload_is_rejected() -> None:
    with pytest.raises(ValueError, match="nested deeper"):
        trust.parse_payload(DEEP_OBJECT.encode(), trust.GPG_PAYLOAD_TYPE)
