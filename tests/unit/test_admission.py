"""Trust verdicts: every launch (engine or kvmrkt-oci) records its apps in one schema."""

from __future__ import annotations

from kvmrkt.trust.admission import bundle_verdict
from policy.trust import NOT_JUDGED_SCOPE, Decision

JUDGED_KEYS = {"image", "identity", "dependencies", *Decision("s", ()).to_dict()}


def test_oci_bundle_verdict_has_the_judged_schema_and_says_not_judged() -> None:
    verdict = bundle_verdict("oci-bundle:sha256:c", "docker.io/library/trusted:1")
    assert set(verdict) == JUDGED_KEYS
    assert verdict["scope"] == NOT_JUDGED_SCOPE
    assert verdict["insecure"] is True and verdict["signers"] == [] and verdict["requirements"] == []
    assert verdict["image"] == "oci-bundle:sha256:c" and verdict["dependencies"] == []


class _Store:
    """Image records by id (what ``admission.dependencies`` reads from the store)."""

    def __init__(self, deps: dict[str, tuple[str, ...]]) -> None:
        self.deps = deps

    def get(self, image_id: str) -> object:
        from types import SimpleNamespace

        return SimpleNamespace(id=image_id, name=image_id, dependencies=self.deps[image_id])


def test_a_dependency_loop_or_too_many_dependencies_is_refused() -> None:
    """Store records are kvmrkt's own, but a loop (a damaged store.db) or an image built from a hostile chain
    of ACIs must not walk forever or without bound."""
    import pytest

    from kvmrkt.errors import ImageError
    from kvmrkt.trust.admission import MAX_DEPENDENCIES, dependencies

    store = _Store({"app": ("a",), "a": ("b", "base"), "b": ("base",), "base": ()})
    assert [d.id for d in dependencies(store, store.get("app"))] == ["a", "b", "base"]  # type: ignore[arg-type]
    loop = _Store({"app": ("a",), "a": ("b",), "b": ("a",)})
    with pytest.raises(ImageError, match="dependency loop"):
        dependencies(loop, loop.get("app"))  # type: ignore[arg-type]
    chain = {f"d{i}": (f"d{i + 1}",) for i in range(MAX_DEPENDENCIES + 1)}
    chain[f"d{MAX_DEPENDENCIES + 1}"] = ()
    deep = _Store({"app": ("d0",), **chain})
    with pytest.raises(ImageError, match=f"more than {MAX_DEPENDENCIES} dependencies"):
        dependencies(deep, deep.get("app"))  # type: ignore[arg-type]
