"""No image import path has an accept-all default: every caller names its trust gate."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from kvmrkt.images import aci, records, registry, store
from kvmrkt.images import sources as images

IMPORTERS: list[Callable[..., Any]] = [
    images.import_oci, images.import_layout, images.import_oci_archive, images.import_docker_archive,
    images.import_local, aci.import_aci, registry.fetch,
]


@pytest.mark.parametrize("fn", IMPORTERS, ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_import_gate_has_no_default(fn: Callable[..., Any]) -> None:
    gate = inspect.signature(fn).parameters["gate"]
    assert gate.default is inspect.Parameter.empty, f"{fn.__name__} must not default its gate"


def test_import_local_without_gate_is_refused_before_reading(tmp_path: Any) -> None:
    # A caller that forgets the gate gets an error, never an unjudged import (the file need not even exist).
    with pytest.raises(TypeError, match="gate"):
        images.import_local(store.Store(tmp_path), f"oci:{tmp_path}/hostile", name=None)  # type: ignore[call-arg]


def test_accept_all_gate_is_named_unsafe() -> None:
    assert not hasattr(store, "open_gate")
    assert records.UNSAFE_ACCEPT_ANYTHING.__doc__ and "UNSAFE" in records.UNSAFE_ACCEPT_ANYTHING.__doc__
