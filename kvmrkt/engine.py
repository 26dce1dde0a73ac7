"""stage0's facade: one object per command that wires the concerns together and offers their operations.

Role: build the store, the trust gate, the image service, the network manager and the pod lifecycle for one
command from the config, and delegate every operation to the module that owns it (``kvmrkt.images``,
``kvmrkt.trust``, ``kvmrkt.pods``, ``kvmrkt.net``); no logic of its own. No daemon: every call rebuilds its view
from the data directory. Trust boundary: callers pass operator input (parsed by ``kvmrkt.pods.runargs``); images
come from the store, which already treated them as hostile.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from kvmrkt.config import RuntimeConfig
from kvmrkt.images.layers import LayerLimits
from kvmrkt.images.records import ImageRecord, Progress, no_progress
from kvmrkt.images.service import ImageService
from kvmrkt.images.store import Store
from kvmrkt.net.netconf import NetOptions
from kvmrkt.net.network import Intent, PodNetworks
from kvmrkt.pods import records
from kvmrkt.pods.control import PodControl
from kvmrkt.pods.inspect import PodInspector
from kvmrkt.pods.launch import Launcher, LaunchRequest
from kvmrkt.pods.manifest import PodManifest
from kvmrkt.pods.pod import Pod
from kvmrkt.pods.prepare import PodOptions, Preparer
from kvmrkt.pods.runargs import AppRequest
from kvmrkt.stage1 import RunResult, Stage1
from kvmrkt.trust.gate import TrustGate
from policy.model import Policy
from policy.trust import Decision

__all__ = ["Engine"]


class Engine:
    """The stage0 engine. One instance per command; collaborators come from the config."""

    def __init__(self, config: RuntimeConfig, *, warn: Callable[[str], None] = lambda _m: None) -> None:
        self.config = config
        self.warn = warn
        lim = config.images
        self.store = Store(config.data_dir, scratch=lim.scratch, limits=LayerLimits(
            max_total_bytes=lim.max_total_bytes, max_entries=lim.max_entries, max_ratio=lim.max_ratio,
            max_depth=lim.max_depth))
        self.networks = PodNetworks(config, warn=warn)
        self.trust = TrustGate(config, self.store, warn=warn)
        self.image_service = ImageService(config, self.store, self.trust,
                                          pods_using=lambda: records.images_in_use(config))
        self.preparer = Preparer(config, self.image_service, self.trust)
        self.launcher = Launcher(config, self.store, self.trust, self.preparer, self.networks, warn=warn)
        self.control = PodControl(config, teardown_network=self.launcher.teardown_network, warn=warn)
        self.inspector = PodInspector(config, self.networks)

    # --- images and trust (kvmrkt.images.service, kvmrkt.trust.gate) -------------------------------------

    def import_image(self, ref: str, *, name: str | None = None, progress: Progress = no_progress) -> ImageRecord:
        return self.image_service.import_image(ref, name=name, progress=progress)

    def fetch(self, ref: str, *, name: str | None = None, pull_policy: str = "update",
              progress: Progress = no_progress) -> ImageRecord:
        return self.image_service.fetch(ref, name=name, pull_policy=pull_policy, progress=progress)

    def images(self) -> list[tuple[ImageRecord, list[str]]]:
        return self.image_service.all()

    def image(self, ref: str) -> ImageRecord:
        return self.store.resolve(ref)

    def remove_image(self, ref: str) -> ImageRecord:
        return self.image_service.remove(ref)

    def image_gc(self, *, grace_period: float) -> dict[str, list[str]]:
        return self.image_service.gc(grace_period=grace_period)

    def verify_image(self, ref: str) -> dict[str, Any]:
        return self.image_service.verify(ref)

    def image_manifest(self, ref: str) -> dict[str, Any]:
        return self.image_service.manifest(ref)

    def extract_image(self, ref: str, dest: Path, *, rootfs_only: bool, progress: Progress = no_progress) -> Path:
        return self.image_service.extract(ref, dest, rootfs_only=rootfs_only, progress=progress)

    def export_image(self, ref: str, out: Path, *, overwrite: bool = False) -> Path:
        return self.image_service.export(ref, out, overwrite=overwrite)

    def policy(self) -> Policy | None:
        return self.trust.policy()

    def check_trust(self, record: ImageRecord) -> Decision:
        return self.trust.check(record)

    def explain(self, ref: str) -> dict[str, Any]:
        return self.trust.explain(ref)

    # --- pods (kvmrkt.pods) ----------------------------------------------------------------------------

    def prepare(self, apps: list[AppRequest], opts: PodOptions, *, progress: Progress = no_progress,
                keep_lock: bool = False) -> Pod:
        return self.preparer.prepare(apps, opts, progress=progress, keep_lock=keep_lock)

    def new_pod(self, build: Callable[[str], PodManifest], judge: Callable[[PodManifest], dict[str, Any]], *,
                stage1: str | None = None, keep_lock: bool = False) -> Pod:
        return self.preparer.new_pod(build, judge, stage1=stage1, keep_lock=keep_lock)

    def app_disks(self, manifest: PodManifest) -> tuple[dict[str, Path], dict[str, dict[str, str]]]:
        return self.preparer.app_disks(manifest)

    def pod_manifest(self, pod: Pod) -> PodManifest:
        return records.pod_manifest(pod)

    def backend_for(self, pod: Pod) -> Stage1:
        return records.backend_for(self.config, pod)

    def run(self, apps: list[AppRequest], opts: PodOptions, *, interactive: bool = False, accel: str | None = None,
            stdout: IO[bytes], stderr: IO[bytes], progress: Progress = no_progress,
            on_prepared: Callable[[Pod], None] = lambda _p: None, net: NetOptions | None = None) -> int:
        return self.launcher.run(apps, opts, interactive=interactive, accel=accel, stdout=stdout, stderr=stderr,
                                 progress=progress, on_prepared=on_prepared, net=net)

    def run_prepared(self, pod: Pod, *, interactive: bool = False, accel: str | None = None, stdout: IO[bytes],
                     stderr: IO[bytes], trust: dict[str, Any] | None = None, net: NetOptions | None = None) -> int:
        return self.launcher.run_prepared(pod, interactive=interactive, accel=accel, stdout=stdout, stderr=stderr,
                                          trust=trust, net=net)

    def boot(self, pod: Pod, manifest: PodManifest, backend: Stage1, request: LaunchRequest, *,
             trust: dict[str, Any], intent: Intent, stdout: IO[bytes], stderr: IO[bytes]) -> RunResult:
        return self.launcher.boot(pod, manifest, backend, request, trust=trust, intent=intent, stdout=stdout,
                                  stderr=stderr)

    def find(self, ref: str) -> Pod:
        return self.control.find(ref)

    def status(self, ref: str, *, wait: float | None = None) -> dict[str, Any]:
        return self.inspector.status(ref, wait=wait)

    def list_pods(self) -> list[dict[str, Any]]:
        return self.inspector.list_pods()

    def cat_manifest(self, ref: str) -> dict[str, Any]:
        return self.inspector.cat_manifest(ref)

    def stop(self, ref: str, *, force: bool = False) -> str:
        return self.control.stop(ref, force=force)

    def enter(self, ref: str, app: str | None, argv: list[str], *, stdout: IO[bytes], stderr: IO[bytes],
              stdin: int | None = None, tty: bool = False) -> int:
        return self.control.enter(ref, app, argv, stdout=stdout, stderr=stderr, stdin=stdin, tty=tty)

    def remove(self, ref: str) -> None:
        self.control.remove(ref)

    def gc(self, *, grace_period: float, expire_prepared: float) -> dict[str, list[str]]:
        return self.control.gc(grace_period=grace_period, expire_prepared=expire_prepared)
