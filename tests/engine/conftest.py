"""Fixtures of the engine tests: a data and config directory selecting the fake stage1 backend, images written
by Python (an OCI layout with one small tar layer), and a pod runner that plays the separate process a real
``kvmrkt run`` would be. Nothing here needs root: no mounts, no network namespaces, no VM, no TPM
(``--insecure-options=tpm`` is kvmrkt's supported unmeasured path; the engine still calls ``_measure``)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvmrkt import stage1
from kvmrkt.config import RuntimeConfig, load_config
from kvmrkt.engine import Engine
from kvmrkt.pods.pod import Pod
from kvmrkt.pods.prepare import PodOptions
from kvmrkt.pods.runargs import AppRequest
from tests.engine import fake_stage1

ACCEPT = {"default": [{"type": "insecureAcceptAnything"}]}
REJECT = {"default": [{"type": "reject"}]}


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def make_layout(root: Path, content: bytes) -> Path:
    """An OCI image layout (tag ``latest``) whose one gzip layer holds ``/bin/app`` with ``content``."""
    layout = root
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data, mode in (("bin/", b"", 0o755), ("bin/app", content, 0o755)):
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mode, info.size = mode, len(data)
            info.uid, info.gid = os.getuid(), os.getgid()  # unpacking keeps owners: without root, only our own
            info.type = tarfile.DIRTYPE if name.endswith("/") else tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data) if data else None)
    layer = _blob(layout, gzip.compress(raw.getvalue(), mtime=0))
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    config = _blob(layout, json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/app"]},
                                       "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode())
    manifest = _blob(layout, json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer}]}).encode())
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest,
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))  # fmt: skip
    return layout


@dataclass
class Running:
    """A pod being run by a thread standing in for the ``kvmrkt run`` process (its own Engine, its own lock)."""

    thread: threading.Thread
    outcome: dict[str, Any] = field(default_factory=dict)

    def join(self, timeout: float = 30) -> Any:
        """Wait for the run to end; return its exit code, or raise what it raised."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the run did not end"
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["rc"]


@dataclass
class Env:
    """One kvmrkt installation: config (fake backend, no network, unmeasured), data directory, images."""

    root: Path
    config: RuntimeConfig
    runs: list[Running] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def engine(self) -> Engine:
        return Engine(self.config, warn=self.warnings.append)

    def policy(self, doc: dict[str, Any]) -> None:
        (self.config.config_dir / "policy.json").write_text(json.dumps(doc))

    def image(self, name: str, content: bytes | None = None) -> str:
        """Import a new image under ``name`` (judged by the current policy); returns its ID."""
        layout = make_layout(self.root / "layouts" / name.replace("/", "_").replace(":", "_"),
                             content or name.encode())
        return self.engine().import_image(f"oci:{layout}:latest", name=name).id

    def script(self, apps: dict[str, dict[str, Any]], run_error: str | None = None) -> None:
        fake_stage1.write_script(self.config, apps, run_error)

    def calls(self, what: str | None = None) -> list[str]:
        return [c for c in fake_stage1.calls(self.config) if what is None or c.split()[0] == what]

    def prepare(self, *images: str) -> Pod:
        return self.engine().prepare([AppRequest(image=i) for i in images], PodOptions())

    def start(self, pod: Pod) -> Running:
        """run_prepared in another thread; returns once the fake guest runs the apps (or the run ended)."""
        outcome: dict[str, Any] = {"pod": pod.uuid}

        def run() -> None:
            engine = self.engine()  # its own store connection, as a separate kvmrkt process would have
            try:
                outcome["rc"] = engine.run_prepared(engine.find(pod.uuid), stdout=io.BytesIO(), stderr=io.BytesIO())
            except BaseException as exc:  # handed to the test by Running.join
                outcome["error"] = exc

        running = Running(threading.Thread(target=run, daemon=True), outcome)
        self.runs.append(running)
        running.thread.start()
        engine = self.engine()
        deadline = time.monotonic() + 10
        while running.thread.is_alive() and time.monotonic() < deadline:
            found = engine.find(pod.uuid)
            if found.phase == "run" and engine.backend_for(found).guest_state(found).pids:
                return running
            time.sleep(0.01)
        assert not running.thread.is_alive(), "the fake guest never started the apps"
        return running

    def pod_dirs(self) -> list[str]:
        """Every pod directory on disk, as ``phase/uuid``."""
        base = self.config.data_dir / "pods"
        return sorted(f"{p.parent.name}/{p.name}" for p in base.glob("*/*")) if base.exists() else []


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """A fresh installation whose config selects the fake backend (``[stage1] backend``), with an accepting
    trust policy, ``[network] default = "none"``, a zero stop timeout and ``insecure_options = ["tpm"]``."""
    monkeypatch.setitem(stage1.BACKENDS, fake_stage1.NAME, fake_stage1.TARGET)
    config_dir, data_dir = tmp_path / "etc", tmp_path / "data"
    config_dir.mkdir()
    (config_dir / "config.toml").write_text(f"""
insecure_options = ["tpm"]
[stage1]
backend = "{fake_stage1.NAME}"
stop_timeout = 0
[network]
default = "none"
[measure]
tcti = ""
log_dir = "{tmp_path / 'measure'}"
""")
    env = Env(tmp_path, load_config(config_dir=config_dir, data_dir=data_dir))
    env.policy(ACCEPT)
    yield env
    for running in env.runs:  # never leave a "VM" behind: force-stop and wait
        if running.thread.is_alive():
            with contextlib.suppress(Exception):
                pod = env.engine().find(str(running.outcome["pod"]))
                env.engine().backend_for(pod).stop(pod, force=True)
            running.thread.join(10)
