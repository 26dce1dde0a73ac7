"""The pod directory's own records, typed: what stage0 writes at prepare and after a run, and reads back.

Role: the names of stage0's files in a pod directory (the backend's are in ``docs/stage1-interface.md``), typed
records for them, and the readers every lifecycle step shares (the manifest, the backend a pod was prepared for).
Trust boundary: the pod directory is root's own (0700) and written only by kvmrkt; a record that is missing or
malformed reads as "not known" (None), never as a default that would widen what the pod may do.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from kvmrkt.config import RuntimeConfig
from kvmrkt.errors import KvmrktError, PodStateError
from kvmrkt.pods.manifest import PodManifest
from kvmrkt.pods.pod import Phase, Pod
from kvmrkt.stage1 import Stage1, load_backend

MANIFEST = "pod"
STAGE1 = "stage1.json"
TRUST = "trust.json"
MEASURE = "measure.json"
SELINUX = "selinux.json"
EXIT = "exit.json"

# Phases whose pods still hold what they were prepared with (images, leases): not yet garbage.
LIVE = (Phase.EMBRYO, Phase.PREPARE, Phase.PREPARED, Phase.RUN)
NOT_STARTED = (Phase.EMBRYO, Phase.PREPARE, Phase.PREPARED)


@dataclass(frozen=True, slots=True)
class Stage1Record:
    """``stage1.json``: the backend and interface a pod was prepared for, and with which insecure options."""

    backend: str
    interface_version: int
    created: float | None = None
    insecure_options: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "interface_version": self.interface_version, "created": self.created,
                "insecure_options": sorted(self.insecure_options)}

    @classmethod
    def read(cls, pod: Pod) -> Stage1Record | None:
        doc = pod.read_json(STAGE1, {}) or {}
        backend, version = doc.get("backend"), doc.get("interface_version")
        if not isinstance(backend, str) or not isinstance(version, int):
            return None
        created = doc.get("created")
        return cls(backend, version, float(created) if isinstance(created, int | float) else None,
                   tuple(str(o) for o in doc.get("insecure_options", []) or ()))


@dataclass(frozen=True, slots=True)
class ExitRecord:
    """``exit.json``: how a run ended (exit codes by app, whether it was stopped, integrity failures, when)."""

    exit_codes: dict[str, int] = field(default_factory=dict)
    stopped: bool = False
    integrity_failures: tuple[str, ...] = ()
    finished: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"exit_codes": self.exit_codes, "stopped": self.stopped,
                "integrity_failures": list(self.integrity_failures), "finished": self.finished}

    @classmethod
    def read(cls, pod: Pod) -> ExitRecord | None:
        doc = pod.read_json(EXIT)
        try:
            finished = doc.get("finished")
            return cls({str(k): int(v) for k, v in (doc.get("exit_codes") or {}).items()}, bool(doc.get("stopped")),
                       tuple(str(f) for f in doc.get("integrity_failures") or ()),
                       float(finished) if finished is not None else None)
        except (AttributeError, TypeError, ValueError):  # missing or damaged: not known
            return None


@dataclass(frozen=True, slots=True)
class SelinuxRecord:
    """``selinux.json``: the pod's labels and whether the process label is applied on this host (and why not)."""

    process: str
    file: str
    process_applied: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"process": self.process, "file": self.file, "process_applied": self.process_applied,
                "reason": self.reason}

    @classmethod
    def read(cls, pod: Pod) -> SelinuxRecord | None:
        doc = pod.read_json(SELINUX)
        if not isinstance(doc, dict):
            return None
        return cls(str(doc.get("process", "")), str(doc.get("file", "")), bool(doc.get("process_applied")),
                   str(doc.get("reason", "")))


def measured(pod: Pod) -> bool | None:
    """Whether the pod's launch was measured into the TPM (None: it never got that far)."""
    doc = pod.read_json(MEASURE, {}) or {}
    value = doc.get("measured")
    return value if isinstance(value, bool) else None


def fresh_state(pod: Pod) -> str:
    """The pod's state as on disk now (another process may have moved it)."""
    pod.refresh()
    return pod.state()


def pod_manifest(pod: Pod) -> PodManifest:
    """The manifest a pod was prepared with.

    Raises:
        PodStateError: the pod never finished preparing.
    """
    doc = pod.read_json(MANIFEST)
    if doc is None:
        raise PodStateError(f"pod {pod.uuid} has no manifest (it never finished preparing)", state=pod.state())
    return PodManifest.from_dict(doc)


def backend_for(config: RuntimeConfig, pod: Pod) -> Stage1:
    """The stage1 backend a pod was prepared for.

    Raises:
        PodStateError: the installed backend speaks another stage1 interface version.
    """
    rec = Stage1Record.read(pod)
    backend = load_backend(rec.backend if rec else config.stage1.backend, config)
    if rec and rec.interface_version != backend.interface_version:
        raise PodStateError(
            f"pod {pod.uuid} was prepared for stage1 interface {rec.interface_version}, "
            f"the installed {backend.name} backend speaks {backend.interface_version}",
            state=pod.state(),
        )
    return backend


def images_in_use(config: RuntimeConfig) -> dict[str, str]:
    """Image ID -> a pod (not yet garbage) that uses it."""
    used: dict[str, str] = {}
    for pod in Pod.all(config.data_dir):
        if pod.phase in LIVE:
            with contextlib.suppress(KvmrktError):
                used.update({a.image_id: f"{pod.state()} pod {pod.uuid}" for a in pod_manifest(pod).apps})
    return used
