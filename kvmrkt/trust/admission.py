"""Admission: every image whose files reach a pod is judged by the trust policy, and exactly what was judged is
what gets measured.

Role: an app's root filesystem is built from its image *and* the images it depends on (appc dependencies,
resolved to image IDs at import), so each of those is judged at every ``prepare`` and ``run`` (the policy may
have changed, and a dependency imported with ``--insecure-options=image`` must not ride in under a signed image).
The verdicts are per app and per image; the measured facts of each image carry its own digest, the name it was
judged as (its stored identity, never a name from a pod manifest) and its own signers, so a verifier matches
its reference policy against each image separately.

Trust boundary: image records come from kvmrkt's store (written by kvmrkt at import); pod manifests given with
``--pod-manifest`` are user input and only name image IDs here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvmrkt.errors import ImageError, PolicyDeniedError
from kvmrkt.images.records import ImageRecord
from kvmrkt.images.store import Store
from kvmrkt.pods.manifest import PodManifest
from policy.trust import NOT_JUDGED, Decision

MAX_DEPENDENCIES = 64  # images in one app's dependency closure (rkt has no limit; a loop or a bomb needs one)


def identity(record: ImageRecord) -> str:
    """The name an image is judged as: the name it was verified under at import."""
    return record.identity or record.name


def dependencies(store: Store, record: ImageRecord) -> list[ImageRecord]:
    """Every image an image's files are built from besides itself, nearest first, each once.

    Raises:
        ImageError: a dependency loop, or more than ``MAX_DEPENDENCIES`` images.
    """
    out: list[ImageRecord] = []
    seen = {record.id}
    todo: list[tuple[ImageRecord, tuple[str, ...]]] = [(record, (record.id,))]
    while todo:
        current, path = todo.pop(0)
        for dep_id in current.dependencies:
            if dep_id in path:
                raise ImageError(f"image {record.name}: dependency loop through {dep_id}")
            if dep_id in seen:
                continue
            seen.add(dep_id)
            dep = store.get(dep_id)
            out.append(dep)
            if len(out) > MAX_DEPENDENCIES:
                raise ImageError(f"image {record.name} has more than {MAX_DEPENDENCIES} dependencies")
            todo.append((dep, (*path, dep_id)))
    return out


def explain_dependencies(store: Store, record: ImageRecord,
                         check: Callable[[ImageRecord], Decision]) -> list[dict[str, Any]]:
    """Each dependency of an image with the verdict it gets now (for ``policy explain``)."""
    out = []
    for dep in dependencies(store, record):
        try:
            verdict = {"accepted": True, **check(dep).to_dict()}
        except PolicyDeniedError as exc:
            verdict = {"accepted": False, "reason": exc.reason, "message": exc.message}
        out.append({"image": dep.id, "identity": identity(dep), "verdict": verdict})
    return out


def bundle_verdict(image_id: str, name: str) -> dict[str, Any]:
    """The verdict of an OCI bundle's app, in the schema of ``judge``'s: its rootfs is no stored image, so it
    was not judged and is accepted without any signature check (``insecure``); it has no dependencies."""
    return {"image": image_id, "identity": name, **NOT_JUDGED.to_dict(), "dependencies": []}


def _verdict(record: ImageRecord, decision: Decision) -> dict[str, Any]:
    return {"image": record.id, "identity": identity(record), **decision.to_dict()}


def judge(manifest: PodManifest, store: Store, check: Callable[[ImageRecord], Decision]) -> dict[str, Any]:
    """Judge every image of every app (its own and its dependencies'); returns the verdicts per app.

    Raises:
        PolicyDeniedError: from ``check``, for the first image the policy does not accept (naming it; for a
        dependency, naming the app's image that needs it).
    """
    verdicts: dict[str, Any] = {}
    for app in manifest.apps:
        record = store.get(app.image_id)
        own = _verdict(record, check(record))
        deps = []
        for dep in dependencies(store, record):
            try:
                deps.append(_verdict(dep, check(dep)))
            except PolicyDeniedError as exc:
                raise PolicyDeniedError(f"{exc.message} (a dependency of {record.name}, which app {app.name} "
                                        "runs: every image whose files reach a pod is judged)",
                                        reason=exc.reason, hint=exc.hint) from exc
        verdicts[app.name] = {**own, "dependencies": deps}
    return verdicts


def measured_images(manifest: PodManifest, store: Store, verdicts: dict[str, Any]) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]]]:
    """The measured facts: one per app (its image's digest, judged name, signers, rootfs and verity root) and
    one per dependency image (once per pod, naming the apps it reaches)."""
    apps: list[dict[str, Any]] = []
    deps: dict[str, dict[str, Any]] = {}
    for app in manifest.apps:
        record = store.get(app.image_id)
        verdict = verdicts.get(app.name) or {}
        if verdict.get("image") != record.id:
            raise ImageError(f"app {app.name}: no trust verdict for image {record.id}")
        apps.append({
            "app": app.name, "image": identity(record), "manifest": record.id, "signed": record.signed_digest,
            "rootfs": app.rootfs_digest, "verity_root": record.verity_root, "scope": verdict.get("scope"),
            "signers": verdict.get("signers", []), "insecure": verdict.get("insecure", False),
            "dependencies": [d["image"] for d in verdict.get("dependencies", [])],
        })  # fmt: skip
        for d in verdict.get("dependencies", []):
            dep = store.get(d["image"])
            entry = deps.setdefault(dep.id, {
                "image": identity(dep), "manifest": dep.id, "signed": dep.signed_digest, "scope": d.get("scope"),
                "signers": d.get("signers", []), "insecure": d.get("insecure", False), "apps": []})
            entry["apps"].append(app.name)
    return apps, list(deps.values())
