"""Preparing a pod: from the operator's app flags (or a pod manifest) to a pod directory in ``prepared``.

Role: resolve each app's image (fetching it by the pull policy), apply the image's defaults under the flags,
give the pod its SELinux pair and jail uid, judge every image that reaches it, build the guest root filesystems,
and write the pod directory; on any failure, nothing is left behind. Trust boundary: flags and pod manifests are
the operator's and are validated here (``manifest``); images were treated as hostile by the store and are judged
again by the trust gate, now.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvmrkt import jsondoc
from kvmrkt.config import RuntimeConfig
from kvmrkt.errors import ConfigError, ImageError, KvmrktError, ManifestError
from kvmrkt.host.timeline import stamp
from kvmrkt.images.records import ImageRecord, Progress, no_progress
from kvmrkt.images.service import ImageService
from kvmrkt.pods import confinement, labels
from kvmrkt.pods import jail as jails
from kvmrkt.pods.manifest import AppSpec, MountPoint, PodManifest, Volume, check_env
from kvmrkt.pods.pod import Phase, Pod
from kvmrkt.pods.records import MANIFEST, STAGE1, TRUST, Stage1Record
from kvmrkt.pods.runargs import AppRequest, default_app_name, parse_cpu, parse_memory
from kvmrkt.stage1 import load_backend
from kvmrkt.trust.gate import TrustGate

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class PodOptions:
    """Pod-level choices of ``prepare``/``run``."""

    volumes: list[Volume] = field(default_factory=list)
    hostname: str | None = None
    env: list[tuple[str, str]] = field(default_factory=list)
    stage1: str | None = None
    pod_manifest: Path | None = None
    pull_policy: str = "new"


def _isolator_limit(img: ImageRecord, name: str, parse: Callable[[str], int]) -> int | None:
    """An appc resource isolator's ``limit`` (the default for ``--memory``/``--cpu``), if the image sets one."""
    for key, value in img.isolators:
        if key == name:
            with contextlib.suppress(ValueError, AttributeError, KeyError, TypeError, KvmrktError):
                return parse(str(jsondoc.loads(value)["limit"]))
    return None


class Preparer:
    """Writes pod directories in the ``prepared`` phase, for one command."""

    def __init__(self, config: RuntimeConfig, images: ImageService, trust: TrustGate) -> None:
        self.config = config
        self.images = images
        self.store = images.store
        self.trust = trust

    def _app_spec(
        self, req: AppRequest, taken: set[str], pod_env: list[tuple[str, str]], pull_policy: str, progress: Progress
    ) -> AppSpec:
        img = self.images.for_pod(req.image, pull_policy, progress)
        argv = (req.exec, *req.args) if req.exec else (*img.entrypoint, *(req.args or img.cmd))
        env: list[tuple[str, str]] = [("PATH", DEFAULT_PATH)]
        for item in img.env:
            key, _, value = item.partition("=")
            env.append((key, value))
        name = req.name or default_app_name(img.name, taken)
        taken.add(name)
        env += [("AC_APP_NAME", name), *pod_env, *req.env]
        user_spec = req.user if req.user is not None else (img.user.split(":", 1)[0] or "0")
        image_group = img.group or (img.user.split(":", 1)[1] if ":" in img.user else None)
        group_spec = req.group if req.group is not None else image_group
        memory = req.memory_mib or _isolator_limit(img, "resource/memory", parse_memory)
        cpus = req.cpus or _isolator_limit(img, "resource/cpu", parse_cpu)
        mounts = list(req.mounts)
        for mp_name, mp_path, _ro in img.mount_points:
            if not any(m.target == mp_path for m in mounts):
                mounts.append(MountPoint(mp_name, mp_path))
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
            memory_mib=memory,
            cpus=cpus,
            mounts=tuple(mounts),
            confinement=confinement.resolve(req.confinement, img.isolators, self.config.insecure_options),
        )

    def _from_pod_manifest(self, uuid: str, path: Path) -> PodManifest:
        try:
            doc = jsondoc.load(path)
        except (OSError, ValueError) as exc:
            raise ManifestError(f"cannot read pod manifest {path}: {exc}") from exc
        if isinstance(doc, dict):
            doc["uuid"] = uuid
        manifest = PodManifest.from_dict(doc)
        manifest = replace(manifest, apps=tuple(
            replace(a, confinement=confinement.lift(a.confinement, self.config.insecure_options))
            for a in manifest.apps))
        for app in manifest.apps:
            img = self.store.resolve(app.image_id)
            if img.rootfs != app.rootfs_digest:
                raise ManifestError(f"app {app.name}: rootfs {app.rootfs_digest} is not that of image {img.id}")
        return manifest

    def _build_manifest(self, uuid: str, apps: list[AppRequest], opts: PodOptions, progress: Progress) -> PodManifest:
        if opts.pod_manifest is not None:
            if apps:
                raise ConfigError("--pod-manifest replaces images and app flags: give one or the other")
            return self._from_pod_manifest(uuid, opts.pod_manifest)
        taken: set[str] = set()
        specs = tuple(self._app_spec(req, taken, opts.env, opts.pull_policy, progress) for req in apps)
        volumes = list(opts.volumes)
        # rkt: an image mount point with no volume of its name gets an empty volume.
        for spec in specs:
            for m in spec.mounts:
                if not any(v.name == m.volume for v in volumes):
                    volumes.append(Volume(m.volume, "empty"))
        return PodManifest(uuid=uuid, apps=specs, volumes=tuple(volumes), hostname=opts.hostname or "")

    def prepare(self, apps: list[AppRequest], opts: PodOptions, *, progress: Progress = no_progress,
                keep_lock: bool = False) -> Pod:
        """Resolve images and write a pod directory in the ``prepared`` phase.

        Raises:
            KvmrktError: any resolution or validation failure; nothing is left behind.
        """

        def judge(manifest: PodManifest) -> dict[str, Any]:
            trust = self.trust.judge_pod(manifest)
            stamp("policy-checked")
            for app in manifest.apps:
                self.rootfs(app, progress)
            stamp("rootfs-verified")
            return trust

        return self.new_pod(lambda uuid: self._build_manifest(uuid, apps, opts, progress), judge,
                            stage1=opts.stage1, keep_lock=keep_lock)

    def new_pod(self, build: Callable[[str], PodManifest], judge: Callable[[PodManifest], dict[str, Any]], *,
                stage1: str | None = None, keep_lock: bool = False) -> Pod:
        """Write a pod directory in the ``prepared`` phase: ``build(uuid)`` makes its manifest, which gets an
        SELinux label; ``judge(manifest)`` returns the trust verdicts recorded (and measured) for it.

        Raises:
            KvmrktError: from ``build`` or ``judge``; nothing is left behind.
        """
        backend = load_backend(stage1 or self.config.stage1.backend, self.config)
        pod = Pod.create(self.config.data_dir)
        try:
            pod.move(Phase.PREPARE)
            manifest = build(pod.uuid)
            stamp("image-resolved")
            label = labels.allocate(self.config, pod.uuid)
            manifest = replace(manifest, annotations=(
                *manifest.annotations, (labels.PROCESS_LABEL, label.process_label),
                (labels.FILE_LABEL, label.file_label),
                (jails.UID_ANNOTATION, str(jails.lease(self.config, pod.uuid)))))
            jails.for_pod(self.config, manifest)  # refuses a pod that asks for more than [pods] allows
            trust = judge(manifest)
            pod.write_json(MANIFEST, manifest.to_dict())
            pod.write_json(TRUST, trust)
            pod.write_json(STAGE1, Stage1Record(backend.name, backend.interface_version, time.time(),
                                                tuple(self.config.insecure_options)).to_dict())
            pod.move(Phase.PREPARED)
            stamp("pod-prepared")
        except BaseException:
            with contextlib.suppress(KvmrktError, OSError):
                jails.release(self.config, pod.uuid)
            pod.delete()
            raise
        if not keep_lock:
            pod.unlock()
        return pod

    def rootfs(self, app: AppSpec, progress: Progress) -> Path:
        """The verified guest rootfs of an app's image (rebuilt if damaged); marks the image as used."""
        record = self.store.get(app.image_id)
        if record.rootfs != app.rootfs_digest:
            raise ImageError(f"app {app.name}: image {record.name} now has rootfs {record.rootfs}, the pod was "
                             f"prepared with {app.rootfs_digest}")
        path = self.store.rootfs_path(record, progress=progress)
        self.store.touch(record.id)
        return path

    def app_disks(self, manifest: PodManifest) -> tuple[dict[str, Path], dict[str, dict[str, str]]]:
        """Each app's verified guest root filesystem image and its dm-verity root hash and salt, by app name
        (the images are marked used)."""
        verity = {}
        for app in manifest.apps:
            record = self.store.get(app.image_id)
            verity[app.name] = {"root": record.verity_root, "salt": record.verity_salt}
        return {a.name: self.rootfs(a, no_progress) for a in manifest.apps}, verity
