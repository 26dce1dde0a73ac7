"""Looking at pods: status (optionally waiting for the end), the list, the manifest as prepared.

Role: ``kvmrkt status``, ``list`` and ``cat-manifest``: rebuild the view from the pod directory (stage0's records
and the backend's typed status) on every call; no daemon holds it. Trust boundary: read-only; what the backend
reports of the guest (exit codes, errors) is shown as the guest's claim, and the exit code a pod ends with is
derived on the host (an integrity failure outranks whatever the guest said).
"""

from __future__ import annotations

import contextlib
from typing import Any

from kvmrkt.config import RuntimeConfig
from kvmrkt.errors import IntegrityError, KvmrktError
from kvmrkt.host.wait import wait_until
from kvmrkt.net.network import PodNetworks
from kvmrkt.pods import confinement, labels
from kvmrkt.pods.launch import pod_exit_code
from kvmrkt.pods.pod import Pod
from kvmrkt.pods.records import (
    NOT_STARTED,
    ExitRecord,
    SelinuxRecord,
    Stage1Record,
    backend_for,
    fresh_state,
    measured,
    pod_manifest,
)
from kvmrkt.stage1 import BackendStatus


class PodInspector:
    """Pod status and listings, for one command."""

    def __init__(self, config: RuntimeConfig, networks: PodNetworks) -> None:
        self.config = config
        self.networks = networks

    def status(self, ref: str, *, wait: float | None = None) -> dict[str, Any]:
        """Status of a pod; with ``wait`` (seconds, 0 = forever) wait until it is no longer running."""
        pod = Pod.find(self.config.data_dir, ref)
        if wait is not None:
            wait_until(lambda: fresh_state(pod) not in ("running", "prepared", "preparing", "embryo"),
                       timeout=wait if wait > 0 else None)
        pod.refresh()
        state = pod.state()
        rec = Stage1Record.read(pod)
        info: dict[str, Any] = {"uuid": pod.uuid, "state": state, "created": rec.created if rec else None,
                                "insecure_options": list(rec.insecure_options) if rec else []}
        try:
            manifest = pod_manifest(pod)
        except KvmrktError:
            manifest = None
        backend: BackendStatus | None = None
        if pod.phase not in NOT_STARTED:
            with contextlib.suppress(KvmrktError):  # the pod's own records still answer
                backend = backend_for(self.config, pod).status(pod)
        info["backend"] = backend.backend if backend else (rec.backend if rec else None)
        info.update({k: getattr(backend, k) if backend else None
                     for k in ("accel", "pid", "started", "memory_mib", "vcpus")})
        exits = backend.app_exit_codes if backend else {}
        errors = backend.app_errors if backend else {}
        info["apps"] = [
            {"name": a.name, "image": a.image_name, "image_id": a.image_id, "exit_code": exits.get(a.name),
             "confinement": confinement.describe(a.confinement),
             **({"errors": errors[a.name]} if a.name in errors else {})}
            for a in (manifest.apps if manifest else ())
        ]
        info["jail"] = backend.jail if backend else None
        info["measured"] = measured(pod)
        sel = SelinuxRecord.read(pod)
        ann = dict(manifest.annotations) if manifest else {}
        info["selinux"] = {"process_label": ann.get(labels.PROCESS_LABEL), "file_label": ann.get(labels.FILE_LABEL),
                           "process_label_applied": sel.process_applied if sel else None,
                           "note": sel.reason if sel else None}
        finished = ExitRecord.read(pod)
        info["finished"] = finished.finished if finished else None
        info["integrity_failures"] = list(backend.integrity_failures if backend and backend.integrity_failures
                                          else finished.integrity_failures if finished else ())
        info["network"] = self.networks.status(pod)
        if state not in ("running", "prepared"):
            info["exit_code"] = pod_exit_code({a["name"]: a["exit_code"] or 0 for a in info["apps"]}) if exits else None
            if info["integrity_failures"]:
                info["exit_code"] = IntegrityError.exit_code
        return info

    def list_pods(self) -> list[dict[str, Any]]:
        """Every pod with its state and apps."""
        out = []
        for pod in Pod.all(self.config.data_dir):
            try:
                apps = [{"name": a.name, "image": a.image_name} for a in pod_manifest(pod).apps]
            except KvmrktError:
                apps = []
            rec = Stage1Record.read(pod)
            out.append({"uuid": pod.uuid, "state": pod.state(), "apps": apps, "created": rec.created if rec else None})
        return out

    def cat_manifest(self, ref: str) -> dict[str, Any]:
        """The pod manifest as written at prepare time."""
        return pod_manifest(Pod.find(self.config.data_dir, ref)).to_dict()
