"""stage0 orchestration: images in, pods prepared, run, inspected, stopped and collected.

Role: the one place that sequences a command (resolve images -> write the pod directory -> hand it to the
stage1 backend -> record the outcome), built only on the leaf modules (store, pod, manifest, stage1). No
daemon: every call rebuilds its view from the data directory. Trust boundary: callers pass operator input
(parsed by ``kvmrkt.runargs``); images come from the store, which already treated them as hostile.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from kvmrkt.config import RuntimeConfig
from kvmrkt.errors import ConfigError, ImageError, KvmrktError, ManifestError, PodStateError
from kvmrkt.manifest import AppSpec, PodManifest, Volume, check_env
from kvmrkt.pod import Pod
from kvmrkt.runargs import AppRequest, default_app_name
from kvmrkt.stage1 import RunOptions, Stage1, load_backend
from kvmrkt.store import ImageRecord, Store

Progress = Callable[[str], None]
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
POD_MANIFEST = "pod"
STAGE1_RECORD = "stage1.json"


@dataclass
class PodOptions:
    """Pod-level choices of ``prepare``/``run``."""

    volumes: list[Volume] = field(default_factory=list)
    hostname: str | None = None
    env: list[tuple[str, str]] = field(default_factory=list)
    stage1: str | None = None
    pod_manifest: Path | None = None


def pod_exit_code(codes: dict[str, int]) -> int:
    """One app: its exit code. Several: the first non-zero exit code in app order, else 0."""
    return next((c for c in codes.values() if c != 0), 0)


class Engine:
    """The stage0 engine. One instance per command; collaborators come from the config."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.store = Store(config.data_dir)

    # --- images -------------------------------------------------------------------------------------------

    def import_image(self, ref: str, *, name: str | None = None, progress: Progress = lambda _m: None) -> ImageRecord:
        """Import an image from ``oci:DIR[:TAG]``.

        Raises:
            ConfigError: an unsupported reference form.
            ImageError: (and subclasses) the image is unusable.
        """
        if not ref.startswith("oci:"):
            raise ConfigError(
                f"cannot import {ref!r}: only oci:DIR[:TAG] (an OCI image layout) is supported so far",
                hint="make one with `umoci` or `skopeo copy docker-archive:... oci:DIR:TAG`",
            )
        rest = ref[4:]
        path, tag = Path(rest), None
        if not path.is_dir() and ":" in rest:
            head, _, tail = rest.rpartition(":")
            path, tag = Path(head), tail
        if not (path / "index.json").is_file():
            raise ImageError(f"{path} is not an OCI image layout (no index.json)")
        return self.store.import_oci_layout(path.resolve(), tag, name=name, progress=progress)

    def images(self) -> list[ImageRecord]:
        """All images in the store."""
        return self.store.images()

    def remove_image(self, ref: str) -> ImageRecord:
        """Remove an image unless a prepared or running pod uses it.

        Raises:
            ImageError: the image is in use.
        """
        record = self.store.resolve(ref)
        for pod in Pod.all(self.config.data_dir):
            if pod.phase in ("prepared", "run") and pod.state() in ("prepared", "running"):
                manifest = self._manifest(pod)
                if any(a.image_id == record.id for a in manifest.apps):
                    raise ImageError(f"image {record.name} is used by {pod.state()} pod {pod.uuid}")
        self.store.remove(record)
        return record

    def _image(self, ref: str, progress: Progress) -> ImageRecord:
        if ref.startswith("oci:"):
            return self.import_image(ref, progress=progress)
        return self.store.resolve(ref)

    # --- prepare ------------------------------------------------------------------------------------------

    def _app_spec(
        self, req: AppRequest, taken: set[str], pod_env: list[tuple[str, str]], progress: Progress
    ) -> AppSpec:
        img = self._image(req.image, progress)
        argv = (req.exec, *req.args) if req.exec else (*img.entrypoint, *(req.args or img.cmd))
        env: list[tuple[str, str]] = [("PATH", DEFAULT_PATH)]
        for item in img.env:
            key, _, value = item.partition("=")
            env.append((key, value))
        name = req.name or default_app_name(img.name, taken)
        taken.add(name)
        env += [("AC_APP_NAME", name), *pod_env, *req.env]
        user_spec = req.user if req.user is not None else (img.user.split(":", 1)[0] or "0")
        group_spec = req.group if req.group is not None else (img.user.split(":", 1)[1] if ":" in img.user else None)
        uid, gid, groups = img.resolve_user(user_spec, group_spec)
        return AppSpec(
            name=name,
            image_id=img.id,
            image_name=img.name,
            rootfs_digest=img.rootfs,
            exec=tuple(argv),
            env=check_env(env),
            working_dir=req.working_dir or img.working_dir or "/",
            user=user_spec,
            group=group_spec or str(gid),
            uid=uid,
            gid=gid,
            supplementary_gids=groups,
            memory_mib=req.memory_mib,
            cpus=req.cpus,
            mounts=tuple(req.mounts),
        )

    def _build_manifest(self, uuid: str, apps: list[AppRequest], opts: PodOptions, progress: Progress) -> PodManifest:
        if opts.pod_manifest is not None:
            if apps:
                raise ConfigError("--pod-manifest replaces images and app flags: give one or the other")
            try:
                doc = json.loads(opts.pod_manifest.read_text())
            except (OSError, ValueError) as exc:
                raise ManifestError(f"cannot read pod manifest {opts.pod_manifest}: {exc}") from exc
            if isinstance(doc, dict):
                doc["uuid"] = uuid
            manifest = PodManifest.from_dict(doc)
            for app in manifest.apps:
                img = self.store.resolve(app.image_id)
                if img.rootfs != app.rootfs_digest:
                    raise ManifestError(f"app {app.name}: rootfs {app.rootfs_digest} is not that of image {img.id}")
            return manifest
        taken: set[str] = set()
        specs = tuple(self._app_spec(req, taken, opts.env, progress) for req in apps)
        return PodManifest(
            uuid=uuid, apps=specs, volumes=tuple(opts.volumes), hostname=opts.hostname or f"kvmrkt-{uuid[:8]}"
        )

    def prepare(self, apps: list[AppRequest], opts: PodOptions, *, progress: Progress = lambda _m: None,
                keep_lock: bool = False) -> Pod:
        """Resolve images and write a pod directory in the ``prepared`` phase.

        Raises:
            KvmrktError: any resolution or validation failure; nothing is left behind.
        """
        backend = opts.stage1 or self.config.stage1.backend
        stage1 = load_backend(backend, self.config)
        pod = Pod.create(self.config.data_dir)
        try:
            pod.move("prepare")
            manifest = self._build_manifest(pod.uuid, apps, opts, progress)
            for app in manifest.apps:
                self.store.rootfs_path(app.rootfs_digest)
            pod.write_json(POD_MANIFEST, manifest.to_dict())
            pod.write_json(
                STAGE1_RECORD,
                {"backend": stage1.name, "interface_version": stage1.interface_version, "created": time.time(),
                 "insecure_options": sorted(self.config.insecure_options)},
            )
            pod.move("prepared")
        except BaseException:
            pod.delete()
            raise
        if not keep_lock:
            pod.unlock()
        return pod

    # --- run ----------------------------------------------------------------------------------------------

    def _manifest(self, pod: Pod) -> PodManifest:
        doc = pod.read_json(POD_MANIFEST)
        if doc is None:
            raise PodStateError(f"pod {pod.uuid} has no manifest (it never finished preparing)", state=pod.state())
        return PodManifest.from_dict(doc)

    def _backend(self, pod: Pod) -> Stage1:
        rec = pod.read_json(STAGE1_RECORD) or {}
        backend = load_backend(str(rec.get("backend", self.config.stage1.backend)), self.config)
        if rec.get("interface_version", backend.interface_version) != backend.interface_version:
            raise PodStateError(
                f"pod {pod.uuid} was prepared for stage1 interface {rec.get('interface_version')}, "
                f"the installed {backend.name} backend speaks {backend.interface_version}",
                state=pod.state(),
            )
        return backend

    def run_prepared(
        self, pod: Pod, *, interactive: bool = False, accel: str | None = None, stdout: IO[bytes], stderr: IO[bytes]
    ) -> int:
        """Boot a prepared pod and wait for it; returns the pod's exit code (see ``pod_exit_code``).

        Raises:
            PodStateError: the pod is not prepared, or another process is starting it.
            Stage1Error: the VM could not be started or failed.
        """
        if pod.lock_fd is None:
            pod.lock()
        try:
            pod.refresh()
            if pod.phase != "prepared":
                raise PodStateError(f"pod {pod.uuid} is {pod.state()}, not prepared", state=pod.state())
            manifest = self._manifest(pod)
            if interactive and len(manifest.apps) != 1:
                raise ConfigError("--interactive needs a pod with exactly one app")
            rootfs = {a.name: self.store.rootfs_path(a.rootfs_digest) for a in manifest.apps}
            backend = self._backend(pod)
            opts = RunOptions(rootfs=rootfs, interactive=interactive, accel=accel or self.config.stage1.accel)
            pod.move("run")
            result = backend.run(pod, manifest, opts, stdout=stdout, stderr=stderr)
            pod.write_json("exit.json", {"exit_codes": result.exit_codes, "stopped": result.stopped,
                                         "finished": time.time()})
            return pod_exit_code(result.exit_codes)
        finally:
            pod.unlock()

    def run(self, apps: list[AppRequest], opts: PodOptions, *, interactive: bool = False, accel: str | None = None,
            stdout: IO[bytes], stderr: IO[bytes], progress: Progress = lambda _m: None,
            on_prepared: Callable[[Pod], None] = lambda _p: None) -> int:
        """prepare + run-prepared without letting another process take the pod in between."""
        if interactive and len(apps) != 1 and opts.pod_manifest is None:
            raise ConfigError("--interactive needs a pod with exactly one app")
        pod = self.prepare(apps, opts, progress=progress, keep_lock=True)
        on_prepared(pod)
        return self.run_prepared(pod, interactive=interactive, accel=accel, stdout=stdout, stderr=stderr)

    # --- inspection ---------------------------------------------------------------------------------------

    def find(self, ref: str) -> Pod:
        """A pod by UUID or unique prefix."""
        return Pod.find(self.config.data_dir, ref)

    def status(self, ref: str, *, wait: float | None = None) -> dict[str, Any]:
        """Status of a pod; with ``wait`` (seconds, 0 = forever) wait until it is no longer running."""
        pod = self.find(ref)
        if wait is not None:
            deadline = time.monotonic() + wait if wait > 0 else float("inf")
            while True:
                pod.refresh()
                if pod.state() not in ("running", "prepared", "preparing", "embryo") or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        pod.refresh()
        state = pod.state()
        info: dict[str, Any] = {"uuid": pod.uuid, "state": state}
        rec = pod.read_json(STAGE1_RECORD, {}) or {}
        info["created"] = rec.get("created")
        info["insecure_options"] = rec.get("insecure_options", [])
        try:
            manifest = self._manifest(pod)
        except KvmrktError:
            manifest = None
        backend_info: dict[str, Any] = {}
        if pod.phase not in ("embryo", "prepare", "prepared"):
            try:
                backend_info = self._backend(pod).status(pod)
            except KvmrktError as exc:
                backend_info = {"error": exc.message}
        info.update({k: backend_info.get(k) for k in ("backend", "accel", "pid", "started", "memory_mib", "vcpus")})
        info["backend"] = info["backend"] or rec.get("backend")
        exits = backend_info.get("app_exit_codes", {})
        errors = backend_info.get("app_errors", {})
        info["apps"] = [
            {"name": a.name, "image": a.image_name, "image_id": a.image_id, "exit_code": exits.get(a.name),
             **({"errors": errors[a.name]} if a.name in errors else {})}
            for a in (manifest.apps if manifest else ())
        ]
        finished = pod.read_json("exit.json", {}) or {}
        info["finished"] = finished.get("finished")
        if state not in ("running", "prepared"):
            info["exit_code"] = pod_exit_code({a["name"]: a["exit_code"] or 0 for a in info["apps"]}) if exits else None
        return info

    def list_pods(self) -> list[dict[str, Any]]:
        """Every pod with its state and apps."""
        out = []
        for pod in Pod.all(self.config.data_dir):
            try:
                manifest = self._manifest(pod)
                apps = [{"name": a.name, "image": a.image_name} for a in manifest.apps]
            except KvmrktError:
                apps = []
            rec = pod.read_json(STAGE1_RECORD, {}) or {}
            out.append({"uuid": pod.uuid, "state": pod.state(), "apps": apps, "created": rec.get("created")})
        return out

    def cat_manifest(self, ref: str) -> dict[str, Any]:
        """The pod manifest as written at prepare time."""
        return self._manifest(self.find(ref)).to_dict()

    # --- control ------------------------------------------------------------------------------------------

    def _wait_exited(self, pod: Pod, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pod.refresh()
            if pod.state() != "running":
                return True
            time.sleep(0.05)
        return False

    def stop(self, ref: str, *, force: bool = False) -> str:
        """Stop a running pod (graceful: SIGTERM, then SIGKILL after the stop timeout; force: kill the VM).

        Returns the state after stopping.

        Raises:
            PodStateError: the pod is not running.
        """
        pod = self.find(ref)
        pod.require("running")
        backend = self._backend(pod)
        timeout = self.config.stage1.stop_timeout
        if not force:
            try:
                backend.stop(pod, force=False)
            except KvmrktError:
                force = True
            if not force and self._wait_exited(pod, timeout + 10):
                return pod.state()
        backend.stop(pod, force=True)
        self._wait_exited(pod, 10)
        return pod.state()

    def enter(self, ref: str, app: str | None, argv: list[str], *, stdout: IO[bytes], stderr: IO[bytes]) -> int:
        """Run a command in an app of a running pod; returns its exit code."""
        pod = self.find(ref)
        pod.require("running")
        manifest = self._manifest(pod)
        names = [a.name for a in manifest.apps]
        if app is None:
            if len(names) != 1:
                raise ConfigError(f"pod {pod.uuid} has several apps: choose one with --app", hint=", ".join(names))
            app = names[0]
        if app not in names:
            raise ConfigError(f"pod {pod.uuid} has no app {app!r}", hint="apps: " + ", ".join(names))
        return self._backend(pod).enter(pod, manifest, app, argv or ["/bin/sh"], stdout=stdout, stderr=stderr)

    def _collect(self, pod: Pod) -> None:
        """Delete a pod directory that this process holds locked, after backend cleanup."""
        try:
            if pod.phase not in ("embryo", "prepare", "prepared"):
                self._backend(pod).gc(pod)
        except KvmrktError:
            pass
        pod.delete()

    def remove(self, ref: str) -> None:
        """Remove a pod that is not running (rkt rm).

        Raises:
            PodStateError: the pod is running or being handled by another process.
        """
        pod = self.find(ref)
        state = pod.state()
        if state in ("running", "preparing", "deleting", "embryo"):
            raise PodStateError(f"pod {pod.uuid} is {state}; stop it first", state=state,
                                hint=f"kvmrkt stop {pod.uuid}" if state == "running" else None)
        pod.lock()
        self._collect(pod)

    def gc(self, *, grace_period: float, expire_prepared: float) -> dict[str, list[str]]:
        """Mark exited pods as garbage and delete garbage older than the grace period (rkt gc)."""
        marked: list[str] = []
        removed: list[str] = []
        for pod in Pod.all(self.config.data_dir):
            state = pod.state()
            try:
                if state == "exited":
                    pod.lock()
                    pod.move("exited-garbage")
                    pod.unlock()
                    marked.append(pod.uuid)
                elif (state in ("aborted prepare", "embryo") and not pod.is_locked()) or (
                    state == "prepared" and pod.age() > expire_prepared
                ):
                    pod.lock()
                    pod.move("garbage")
                    pod.unlock()
                    marked.append(pod.uuid)
            except (PodStateError, FileNotFoundError):
                continue
        for pod in Pod.all(self.config.data_dir):
            if pod.state() in ("exited garbage", "garbage") and pod.age() >= grace_period:
                try:
                    pod.lock()
                except (PodStateError, FileNotFoundError):
                    continue
                self._collect(pod)
                removed.append(pod.uuid)
        return {"marked": marked, "removed": removed}
