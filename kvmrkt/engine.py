"""stage0 orchestration: images in, pods prepared, run, inspected, stopped and collected.

Role: the one place that sequences a command (resolve images -> write the pod directory -> hand it to the
stage1 backend -> record the outcome), built only on the leaf modules (store, pod, manifest, stage1). No
daemon: every call rebuilds its view from the data directory. Trust boundary: callers pass operator input
(parsed by ``kvmrkt.runargs``); images come from the store, which already treated them as hostile.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from kvmrkt import admission, confinement, images, jsondoc, oci, sigfiles
from kvmrkt import jail as jails
from kvmrkt.config import RuntimeConfig
from kvmrkt.digest import Digest
from kvmrkt.errors import (
    ConfigError,
    ImageError,
    ImageNotFoundError,
    IntegrityError,
    KvmrktError,
    ManifestError,
    PodStateError,
    PolicyDeniedError,
    SELinuxError,
    TpmUnavailableError,
)
from kvmrkt.host.wait import wait_until
from kvmrkt.layers import LayerLimits
from kvmrkt.manifest import AppSpec, MountPoint, PodManifest, Volume, check_env
from kvmrkt.netconf import NetOptions
from kvmrkt.network import Intent, PodNetworks
from kvmrkt.pod import Pod, temp_beside
from kvmrkt.runargs import AppRequest, default_app_name, parse_cpu, parse_memory
from kvmrkt.stage1 import EnterOptions, RunOptions, RunResult, Stage1, load_backend
from kvmrkt.stopping import StopEscalation, escalate
from kvmrkt.store import ImageRecord, Progress, Provenance, Store, no_progress, normalise_name
from measure.events import launch_events
from measure.tpm import Measurer
from policy import selinux
from policy.model import Policy, load_policy
from policy.trust import Decision, Subject, decide, decide_unnamed, match_scope

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
    pull_policy: str = "new"


def _isolator_limit(img: ImageRecord, name: str, parse: Callable[[str], int]) -> int | None:
    """An appc resource isolator's ``limit`` (the default for ``--memory``/``--cpu``), if the image sets one."""
    for key, value in img.isolators:
        if key == name:
            with contextlib.suppress(ValueError, AttributeError, KeyError, TypeError, KvmrktError):
                return parse(str(jsondoc.loads(value)["limit"]))
    return None


def pod_exit_code(codes: dict[str, int]) -> int:
    """One app: its exit code. Several: the first non-zero exit code in app order, else 0."""
    return next((c for c in codes.values() if c != 0), 0)


def _fresh_state(pod: Pod) -> str:
    """The pod's state as on disk now (another process may have moved it)."""
    pod.refresh()
    return pod.state()


class Engine:
    """The stage0 engine. One instance per command; collaborators come from the config."""

    def __init__(self, config: RuntimeConfig, *, warn: Callable[[str], None] = lambda _m: None) -> None:
        self.config = config
        self.warn = warn
        self.store = Store(config.data_dir, limits=LayerLimits(
            max_total_bytes=config.images.max_total_bytes, max_entries=config.images.max_entries,
            max_ratio=config.images.max_ratio, max_depth=config.images.max_depth), scratch=config.images.scratch)
        self.networks = PodNetworks(config, warn=warn)

    # --- images -------------------------------------------------------------------------------------------

    def import_image(self, ref: str, *, name: str | None = None, progress: Progress = no_progress) -> ImageRecord:
        """Import an image from a local source or a registry (``kvmrkt image import``).

        Raises:
            ConfigError: an unsupported reference form.
            ImageError: (and subclasses) the image is unusable.
        """
        if images.is_remote(ref):
            return self.fetch(ref, name=name, pull_policy="update", progress=progress)
        return images.import_local(self.store, ref, name=name, progress=progress, gate=self._gate)

    def fetch(self, ref: str, *, name: str | None = None, pull_policy: str = "update",
              progress: Progress = no_progress) -> ImageRecord:
        """Fetch ``docker://``/``oci://`` references (or import local sources) into the store.

        ``pull_policy``: ``new`` uses the store's copy when there is one, ``update`` always asks the registry
        (only missing blobs are downloaded), ``never`` uses only the store.
        """
        if not images.is_remote(ref):
            if images.is_source(ref):
                return images.import_local(self.store, ref, name=name, progress=progress, gate=self._gate)
            return self.store.resolve(ref)
        rref = oci.parse_registry_ref(ref.split("://", 1)[1])
        if pull_policy in ("new", "never"):
            known = self.store.remote(f"docker://{rref}")
            with contextlib.suppress(ImageNotFoundError):
                return self.store.get(known) if known else self.store.resolve(name or rref.name)
            if pull_policy == "never":
                raise ImageNotFoundError(f"{ref} is not in the store and --pull-policy=never forbids fetching it")
        from kvmrkt import registry  # network code only for network references

        return registry.fetch(self.store, rref, config_dir=self.config.config_dir,
                              insecure=self.config.insecure_options, name=name, progress=progress, gate=self._gate)

    # --- trust --------------------------------------------------------------------------------------------

    def policy(self) -> Policy | None:
        """The trust policy (None: there is none, every image is rejected)."""
        return load_policy(self.config.config_dir)

    def _decide(self, subject: Subject, files: dict[str, bytes], detached_target: Path | None, *,
                named: bool = True) -> Decision:
        from policy import signatures  # gpg and cryptography only when a signature is to be checked

        sigset = sigfiles.signature_set(files, detached_target)
        return (decide if named else decide_unnamed)(self.policy(), subject, lambda req: signatures.verify(req, sigset))

    def _gate(self, prov: Provenance, digest: Digest, files: dict[str, bytes]) -> None:
        """Refuse an image the policy does not accept, before anything but its manifest digest is read."""
        if "image" in self.config.insecure_options:
            self.warn(f"WARNING: --insecure-options=image: NOT checking signatures of {prov.identity} ({digest})")
            return
        target = (prov.content or self.store.blob_path(digest)) if prov.transport == "appc" else None
        self._decide(Subject(prov.transport, prov.identity, prov.identity, str(digest)), files, target,
                     named=prov.named)

    def check_trust(self, record: ImageRecord) -> Decision:
        """Judge a stored image against the current policy, with the signatures stored with it.

        Raises:
            PolicyDeniedError: the policy does not accept it (now).
        """
        if "image" in self.config.insecure_options:
            self.warn(f"WARNING: --insecure-options=image: NOT checking signatures of {record.name}")
            return Decision("-", (), insecure=True)
        subject = self._subject(record)
        signed = Digest.parse(subject.digest)
        target = self.store.blob_path(signed) if record.kind == "aci" else None
        return self._decide(subject, self.store.signature_files(signed), target)

    @staticmethod
    def _subject(record: ImageRecord) -> Subject:
        """What the policy judges a stored image as (its identity is also the reference scopes match)."""
        identity = record.identity or record.name
        return Subject(record.transport or "oci", identity, identity, record.signed_digest or record.id)

    def explain(self, ref: str) -> dict[str, Any]:
        """Which scope and requirements apply to a stored image, and the verdict."""
        record = self.store.resolve(ref)
        pol = self.policy()
        subject = self._subject(record)
        identity = subject.identity
        scope, reqs = match_scope(pol, subject) if pol else ("(no policy)", ())
        out: dict[str, Any] = {
            "image": record.name, "transport": subject.transport, "identity": identity,
            "signed_digest": subject.digest, "scope": scope,
            "requirements": [{"type": r.type, "where": r.where, "keyFingerprints": list(r.fingerprints),
                              "signedIdentity": r.identity.type} for r in reqs],
            "signatures": sorted(self.store.signature_files(Digest.parse(subject.digest))),
            "policy_files": [str(p) for p in pol.files] if pol else [],
        }  # fmt: skip
        try:
            out["verdict"] = {"accepted": True, **self.check_trust(record).to_dict()}
        except PolicyDeniedError as exc:
            out["verdict"] = {"accepted": False, "reason": exc.reason, "message": exc.message}
        out["dependencies"] = admission.explain_dependencies(self.store, record, self.check_trust)
        return out

    def images(self) -> list[tuple[ImageRecord, list[str]]]:
        """All images in the store, each with every name that points at it."""
        return [(r, self.store.names(r.id)) for r in self.store.images()]

    def image(self, ref: str) -> ImageRecord:
        """One image by name or ID."""
        return self.store.resolve(ref)

    def _pod_images(self) -> dict[str, str]:
        """Image ID -> a pod (not yet garbage) that uses it."""
        used: dict[str, str] = {}
        for pod in Pod.all(self.config.data_dir):
            if pod.phase in ("embryo", "prepare", "prepared", "run"):
                with contextlib.suppress(KvmrktError):
                    used.update({a.image_id: f"{pod.state()} pod {pod.uuid}" for a in self.pod_manifest(pod).apps})
        return used

    def _images_in_use(self) -> set[str]:
        return set(self._pod_images()) | {dep for r in self.store.images() for dep in r.dependencies}

    def remove_image(self, ref: str) -> ImageRecord:
        """Remove an image unless a pod that is not garbage (or another image) uses it.

        Raises:
            ImageError: the image is in use.
        """
        record = self.store.resolve(ref)
        names = self.store.names(record.id)
        if normalise_name(ref) in names and len(names) > 1:
            self.store.untag(ref)
            return replace(record, name=normalise_name(ref))
        user = self._pod_images().get(record.id)
        if user:
            raise ImageError(f"image {record.name} is used by {user}", hint="remove the pod first (kvmrkt rm / gc)")
        if record.id in {d for r in self.store.images() for d in r.dependencies}:
            raise ImageError(f"image {record.name} is a dependency of another image")
        self.store.remove(record)
        return record

    def image_gc(self, *, grace_period: float) -> dict[str, list[str]]:
        """Remove images not used for ``grace_period`` seconds by any pod, then unreferenced files."""
        now = time.time()
        in_use = self._images_in_use()
        removed = []
        rows = self.store.db.execute("SELECT id, last_used FROM images").fetchall()
        for image_id, last_used in rows:
            if image_id not in in_use and now - last_used >= grace_period:
                record = self.store.get(image_id)
                self.store.remove(record)
                removed.append(f"{record.id} {record.name}")
        return {"images": removed, "files": self.store.gc_files()}

    def verify_image(self, ref: str) -> dict[str, Any]:
        """Re-hash every blob of an image and its guest rootfs (rebuilding the rootfs if it is damaged).

        Raises:
            DigestMismatchError: a blob is corrupt (it is deleted).
        """
        record = self.store.resolve(ref)
        checked = []
        for digest in (record.id if record.kind == "oci" else None, record.config_digest or None, *record.layers):
            if digest:
                with self.store.open_blob(Digest.parse(digest)) as reader:
                    while reader.read(1 << 20):
                        pass
                checked.append(digest)
        self.store.rootfs_path(record, rehash=True)
        return {"id": record.id, "name": record.name, "blobs": checked, "rootfs": record.rootfs, "ok": True}

    def image_manifest(self, ref: str) -> dict[str, Any]:
        """The image's own manifest (OCI manifest or appc image manifest)."""
        record = self.store.resolve(ref)
        if record.kind == "aci":
            from kvmrkt.aci import MAX_MANIFEST

            with self.store.open_blob(Digest.parse(record.id)) as reader, tarfile.open(
                fileobj=reader, mode="r|"  # type: ignore[call-overload]
            ) as tar:
                for member in tar:
                    if member.name.lstrip("./") == "manifest" and member.isreg() and member.size <= MAX_MANIFEST:
                        fh = tar.extractfile(member)
                        assert fh is not None
                        return oci.load_json(fh.read(), "ACI manifest")
            raise ImageError("ACI manifest not found")
        return oci.load_json(self.store.read_blob(Digest.parse(record.id)), "manifest")

    def extract_image(self, ref: str, dest: Path, *, rootfs_only: bool, progress: Progress = no_progress) -> Path:
        """Unpack an image's root filesystem (with dependencies) into a new directory ``dest``.

        Without ``rootfs_only`` the tree goes to ``dest/rootfs`` beside ``dest/manifest`` (rkt's layout).
        Raises:
            ConfigError: ``dest`` exists.
        """
        if os.path.lexists(dest):  # a dangling symlink too: never unpack through one
            raise ConfigError(f"{dest} already exists", hint="choose a new directory")
        record = self.store.resolve(ref)
        with self.store.tmpdir() as tmp:
            tree = Path(tmp) / "rootfs"
            tree.mkdir(mode=0o700)
            self.store.render(record, tree, progress)
            if rootfs_only:
                shutil.move(str(tree), dest)
            else:
                dest.mkdir(mode=0o700)
                (dest / "manifest").write_text(json.dumps(self.image_manifest(ref), indent=2) + "\n")
                shutil.move(str(tree), dest / "rootfs")
        return dest

    def export_image(self, ref: str, out: Path, *, overwrite: bool = False) -> Path:
        """Write an image as an archive: an ACI for appc images, an ``oci-archive`` for OCI images."""
        if out.exists() and not overwrite:
            raise ConfigError(f"{out} already exists", hint="use --overwrite")
        record = self.store.resolve(ref)
        fd, tmp = temp_beside(out, 0o644)  # then renamed over ``out``: a symlink there is replaced, not followed
        if record.kind == "aci":
            with self.store.open_blob(Digest.parse(record.id)) as reader, os.fdopen(fd, "wb") as fh:
                shutil.copyfileobj(reader, fh)
        else:
            with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w") as tar:
                def add(name: str, data: bytes) -> None:
                    info = tarfile.TarInfo(name)
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))

                add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
                manifest = self.store.read_blob(Digest.parse(record.id))
                index = {"schemaVersion": 2, "manifests": [{
                    "mediaType": oci.MT_OCI_MANIFEST, "digest": record.id, "size": len(manifest),
                    "annotations": {oci.REF_NAME: record.name.rsplit(":", 1)[-1]}}]}  # fmt: skip
                add("index.json", json.dumps(index).encode())
                for digest in (record.id, record.config_digest, *record.layers):
                    d = Digest.parse(digest)
                    with self.store.open_blob(d) as reader:
                        info = tarfile.TarInfo(f"blobs/{d.algorithm}/{d.hex}")
                        info.size, info.mode = self.store.blob_path(d).stat().st_size, 0o644
                        tar.addfile(info, reader)
        os.replace(tmp, out)
        return out

    def _image(self, ref: str, pull_policy: str, progress: Progress) -> ImageRecord:
        if images.is_source(ref):
            return self.fetch(ref, pull_policy=pull_policy, progress=progress)
        return self.store.resolve(ref)

    def _trust_pod(self, manifest: PodManifest) -> dict[str, Any]:
        """Judge every image whose files reach the pod now (the policy may have changed since it was fetched)."""
        return admission.judge(manifest, self.store, self.check_trust)

    # --- prepare ------------------------------------------------------------------------------------------

    def _app_spec(
        self, req: AppRequest, taken: set[str], pod_env: list[tuple[str, str]], pull_policy: str, progress: Progress
    ) -> AppSpec:
        img = self._image(req.image, pull_policy, progress)
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

    def _build_manifest(self, uuid: str, apps: list[AppRequest], opts: PodOptions, progress: Progress) -> PodManifest:
        if opts.pod_manifest is not None:
            if apps:
                raise ConfigError("--pod-manifest replaces images and app flags: give one or the other")
            try:
                doc = jsondoc.load(opts.pod_manifest)
            except (OSError, ValueError) as exc:
                raise ManifestError(f"cannot read pod manifest {opts.pod_manifest}: {exc}") from exc
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
        taken: set[str] = set()
        specs = tuple(self._app_spec(req, taken, opts.env, opts.pull_policy, progress) for req in apps)
        volumes = list(opts.volumes)
        # rkt: an image mount point with no volume of its name gets an empty volume.
        for spec in specs:
            for m in spec.mounts:
                if not any(v.name == m.volume for v in volumes):
                    volumes.append(Volume(m.volume, "empty"))
        return PodManifest(
            uuid=uuid, apps=specs, volumes=tuple(volumes), hostname=opts.hostname or ""
        )

    def prepare(self, apps: list[AppRequest], opts: PodOptions, *, progress: Progress = no_progress,
                keep_lock: bool = False) -> Pod:
        """Resolve images and write a pod directory in the ``prepared`` phase.

        Raises:
            KvmrktError: any resolution or validation failure; nothing is left behind.
        """

        def judge(manifest: PodManifest) -> dict[str, Any]:
            trust = self._trust_pod(manifest)
            for app in manifest.apps:
                self._rootfs(app, progress)
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
            pod.move("prepare")
            manifest = build(pod.uuid)
            label = self._allocate_label(pod.uuid)
            manifest = replace(manifest, annotations=(
                *manifest.annotations, ("kvmrkt.selinux/process-label", label.process_label),
                ("kvmrkt.selinux/file-label", label.file_label),
                (jails.UID_ANNOTATION, str(jails.lease(self.config, pod.uuid)))))
            jails.for_pod(self.config, manifest)  # refuses a pod that asks for more than [pods] allows
            trust = judge(manifest)
            pod.write_json(POD_MANIFEST, manifest.to_dict())
            pod.write_json("trust.json", trust)
            pod.write_json(
                STAGE1_RECORD,
                {"backend": backend.name, "interface_version": backend.interface_version, "created": time.time(),
                 "insecure_options": sorted(self.config.insecure_options)},
            )
            pod.move("prepared")
        except BaseException:
            with contextlib.suppress(KvmrktError, OSError):
                jails.release(self.config, pod.uuid)
            pod.delete()
            raise
        if not keep_lock:
            pod.unlock()
        return pod

    # --- run ----------------------------------------------------------------------------------------------

    # --- SELinux ------------------------------------------------------------------------------------------

    def _selinux_file(self) -> Path:
        return self.config.data_dir / "selinux" / "mcs.json"

    def _allocate_label(self, uuid: str) -> selinux.Label:
        """A unique MCS pair for a new pod (pairs of pods that no longer exist are freed first)."""
        cfg = self.config.selinux
        live = Pod.live_uuids(self.config.data_dir)
        return selinux.allocate(self._selinux_file(), uuid, live, categories=cfg.categories,
                                process=cfg.process_context or None, file=cfg.file_context or None)

    def _apply_labels(self, pod: Pod, manifest: PodManifest) -> dict[str, Any]:
        """Decide how the pod's labels are applied here, refusing in required mode when they cannot be."""
        ann = dict(manifest.annotations)
        process, file = ann.get("kvmrkt.selinux/process-label", ""), ann.get("kvmrkt.selinux/file-label", "")
        on = selinux.enabled()
        if not on and self.config.selinux.mode == "required":
            raise SELinuxError(f"pod {pod.uuid} needs its SELinux label applied, but SELinux is not enabled on "
                               "this host", hint="run with --selinux=auto, or on a host with SELinux enabled")
        info = {"process": process, "file": file, "process_applied": on and bool(process),
                "reason": "" if on else "SELinux is disabled on this host: the label is allocated and recorded, "
                                        "files carry it as an xattr, QEMU runs unconfined"}
        pod.write_json("selinux.json", info)
        return info

    def _label_files(self, pod: Pod, labels: dict[str, Any]) -> None:
        """Label the pod directory and its files (sockets are labelled by QEMU's exec context when enabled)."""
        if not labels["file"]:
            return
        paths = [pod.path, *(p for p in pod.path.rglob("*") if not p.is_symlink())]
        failed = selinux.label_files(paths, labels["file"])
        if failed and self.config.selinux.mode == "required":
            raise SELinuxError(f"cannot label pod files: {failed[0]}")

    def _measure(self, pod: Pod, manifest: PodManifest, trust: dict[str, Any], facts: dict[str, Any], *,
                 apps: list[dict[str, Any]] | None = None) -> None:
        """Measured launch: log and extend every fact of this launch into the TPM before the VM runs (fail
        closed), or record that the pod runs unmeasured under --insecure-options=tpm. ``apps``: the per-app
        events, when they do not come from the image store."""
        if "tpm" in self.config.insecure_options:
            self.warn(f"WARNING: --insecure-options=tpm: pod {pod.uuid} runs UNMEASURED (nothing in the TPM)")
            pod.write_json("measure.json", {"measured": False, "reason": "--insecure-options=tpm"})
            return
        cfg = self.config.measure
        if not cfg.tcti:
            raise TpmUnavailableError(
                "no TPM is configured and /dev/tpmrm0 does not exist: the pod cannot be measured",
                hint='set [measure] tcti in config.toml (e.g. "swtpm:port=2321" for an emulated TPM), or run '
                     "with --insecure-options=tpm (unmeasured)")
        deps: list[dict[str, Any]] = []
        if apps is None:
            apps, deps = admission.measured_images(manifest, self.store, trust)
        events = launch_events(pod=pod.uuid, manifest=manifest.canonical_bytes(), apps=apps, dependencies=deps,
                               stage1=facts, trust={"policy": self._policy_digest(), "decisions": trust},
                               insecure=sorted(self.config.insecure_options))
        measurer = Measurer(cfg.tcti, cfg.pcr, cfg.log_dir)
        recnums = measurer.measure(events)
        self._measurement_warnings(measurer)
        pod.write_json("measure.json", {"measured": True, "pcr": cfg.pcr, "log": str(measurer.log.path),
                                        "records": recnums, "events": [e.kind for e in events]})

    def _measurement_warnings(self, measurer: Measurer) -> None:
        if measurer.ended:
            self.warn(f"note: {measurer.ended[1]}: the measurement log of the last reset cycle is kept as "
                      f"{measurer.ended[0]} and a new one started")
        if measurer.mismatch:
            self.warn(f"WARNING: TAMPER EVIDENCE: PCR {measurer.pcr} holds {measurer.mismatch[1].hex()[:16]}..., "
                      f"where kvmrkt's log leads to {measurer.mismatch[0].hex()[:16]}...: something outside "
                      f"kvmrkt extended it (or the log was edited). Recorded in {measurer.log.path}; until the "
                      "TPM is reset (host reboot), no verifier will accept this host's evidence")

    def _policy_digest(self) -> str | None:
        with contextlib.suppress(KvmrktError):
            pol = self.policy()
            return pol.digest if pol else None
        return None

    def _rootfs(self, app: AppSpec, progress: Progress) -> Path:
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
        return {a.name: self._rootfs(a, no_progress) for a in manifest.apps}, verity

    def pod_manifest(self, pod: Pod) -> PodManifest:
        """The manifest a pod was prepared with.

        Raises:
            PodStateError: the pod never finished preparing.
        """
        doc = pod.read_json(POD_MANIFEST)
        if doc is None:
            raise PodStateError(f"pod {pod.uuid} has no manifest (it never finished preparing)", state=pod.state())
        return PodManifest.from_dict(doc)

    def backend_for(self, pod: Pod) -> Stage1:
        """The stage1 backend a pod was prepared for.

        Raises:
            PodStateError: the installed backend speaks another stage1 interface version.
        """
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
        self, pod: Pod, *, interactive: bool = False, accel: str | None = None, stdout: IO[bytes], stderr: IO[bytes],
        trust: dict[str, Any] | None = None, net: NetOptions | None = None,
    ) -> int:
        """Boot a prepared pod and wait for it; returns the pod's exit code (see ``pod_exit_code``).

        The apps' images are judged by the trust policy again (it may have changed since ``prepare``), unless
        ``trust`` gives the verdicts of a prepare done a moment ago by this same process (``run``). ``net``:
        the pod's networks, port forwards and DNS (default: ``[network] default``). The networks exist while
        the VM runs and are torn down when it ends (or by gc, if this process was killed).

        Raises:
            PodStateError: the pod is not prepared, or another process is starting it.
            ConfigError: bad network flags (nothing was created).
            NetworkError: a CNI plugin failed (what was created is torn down again).
            Stage1Error: the VM could not be started or failed.
        """
        if pod.lock_fd is None:
            pod.lock()
        try:
            pod.refresh()
            if pod.phase != "prepared":
                raise PodStateError(f"pod {pod.uuid} is {pod.state()}, not prepared", state=pod.state())
            manifest = self.pod_manifest(pod)
            if interactive and len(manifest.apps) != 1:
                raise ConfigError("--interactive needs a pod with exactly one app")
            if trust is None:
                trust = self._trust_pod(manifest)
                pod.write_json("trust.json", trust)
            rootfs, verity = self.app_disks(manifest)
            backend = self.backend_for(pod)
            ports = [p for a in manifest.apps for p in self.store.get(a.image_id).ports]
            intent = self.networks.intent(net or NetOptions(), ports, modes=backend.network_modes,
                                          user_forwards=backend.user_port_forwards)

            result = self.boot(pod, manifest, backend, trust=trust, intent=intent, stdout=stdout, stderr=stderr,
                               rootfs=rootfs, verity=verity, interactive=interactive,
                               accel=accel or self.config.stage1.accel)
            return pod_exit_code(result.exit_codes)
        finally:
            pod.unlock()

    def boot(self, pod: Pod, manifest: PodManifest, backend: Stage1, *, trust: dict[str, Any], intent: Intent,
             stdout: IO[bytes], stderr: IO[bytes], measured_apps: list[dict[str, Any]] | None = None,
             **run_options: Any) -> RunResult:
        """Run a prepared pod that this process holds locked: labels, network, measured launch, the VM; the
        network is torn down when the VM ends. ``run_options`` are ``RunOptions`` fields (rootfs, ...);
        ``measured_apps`` replaces the per-app events taken from the image store (for OCI bundles)."""
        labels = self._apply_labels(pod, manifest)
        jail = jails.for_pod(self.config, manifest)
        for layer in confinement.lifted(self.config.insecure_options):
            self.warn(f"WARNING: --insecure-options={layer}: the apps of pod {pod.uuid} run without the {layer} "
                      "restrictions")

        def before_boot(facts: dict[str, Any]) -> None:
            self._label_files(pod, labels)
            self._measure(pod, manifest, trust, {**facts, "selinux": labels}, apps=measured_apps)

        pod.move("run")
        try:
            opts = RunOptions(**run_options, jail=jail,
                              exec_label=labels["process"] if labels["process_applied"] else None,
                              network=self.networks.setup(pod, manifest, intent, owner=(jail.uid, jail.gid)),
                              before_boot=before_boot)
            result = backend.run(pod, manifest, opts, stdout=stdout, stderr=stderr)
        finally:
            self._teardown_network(pod)
        pod.write_json("exit.json", {"exit_codes": result.exit_codes, "stopped": result.stopped,
                                     "integrity_failures": list(result.integrity_failures),
                                     "finished": time.time()})
        if result.integrity_failures:
            raise IntegrityError(result.integrity_failures, result.exit_codes)
        return result

    def _teardown_network(self, pod: Pod) -> bool:
        """Tear down a pod's networks (its VM is gone); a failure is reported, and left for the next gc."""
        try:
            self.networks.teardown(pod)
        except KvmrktError as exc:
            self.warn(exc.message)
            return False
        return True

    def run(self, apps: list[AppRequest], opts: PodOptions, *, interactive: bool = False, accel: str | None = None,
            stdout: IO[bytes], stderr: IO[bytes], progress: Progress = no_progress,
            on_prepared: Callable[[Pod], None] = lambda _p: None, net: NetOptions | None = None) -> int:
        """prepare + run-prepared without letting another process take the pod in between."""
        if interactive and len(apps) != 1 and opts.pod_manifest is None:
            raise ConfigError("--interactive needs a pod with exactly one app")
        pod = self.prepare(apps, opts, progress=progress, keep_lock=True)
        on_prepared(pod)
        return self.run_prepared(pod, interactive=interactive, accel=accel, stdout=stdout, stderr=stderr,
                                 trust=pod.read_json("trust.json"), net=net)

    # --- inspection ---------------------------------------------------------------------------------------

    def find(self, ref: str) -> Pod:
        """A pod by UUID or unique prefix."""
        return Pod.find(self.config.data_dir, ref)

    def status(self, ref: str, *, wait: float | None = None) -> dict[str, Any]:
        """Status of a pod; with ``wait`` (seconds, 0 = forever) wait until it is no longer running."""
        pod = self.find(ref)
        if wait is not None:
            wait_until(lambda: _fresh_state(pod) not in ("running", "prepared", "preparing", "embryo"),
                       timeout=wait if wait > 0 else None)
        pod.refresh()
        state = pod.state()
        info: dict[str, Any] = {"uuid": pod.uuid, "state": state}
        rec = pod.read_json(STAGE1_RECORD, {}) or {}
        info["created"] = rec.get("created")
        info["insecure_options"] = rec.get("insecure_options", [])
        try:
            manifest = self.pod_manifest(pod)
        except KvmrktError:
            manifest = None
        backend_info: dict[str, Any] = {}
        if pod.phase not in ("embryo", "prepare", "prepared"):
            try:
                backend_info = self.backend_for(pod).status(pod).to_dict()
            except KvmrktError as exc:
                backend_info = {"error": exc.message}
        info.update({k: backend_info.get(k) for k in ("backend", "accel", "pid", "started", "memory_mib", "vcpus")})
        info["backend"] = info["backend"] or rec.get("backend")
        exits = backend_info.get("app_exit_codes", {})
        errors = backend_info.get("app_errors", {})
        info["apps"] = [
            {"name": a.name, "image": a.image_name, "image_id": a.image_id, "exit_code": exits.get(a.name),
             "confinement": confinement.describe(a.confinement),
             **({"errors": errors[a.name]} if a.name in errors else {})}
            for a in (manifest.apps if manifest else ())
        ]
        info["jail"] = backend_info.get("jail")
        info["measured"] = (pod.read_json("measure.json", {}) or {}).get("measured")
        sel = pod.read_json("selinux.json", {}) or {}
        ann = dict(manifest.annotations) if manifest else {}
        info["selinux"] = {"process_label": ann.get("kvmrkt.selinux/process-label"),
                           "file_label": ann.get("kvmrkt.selinux/file-label"),
                           "process_label_applied": sel.get("process_applied"), "note": sel.get("reason")}
        finished = pod.read_json("exit.json", {}) or {}
        info["finished"] = finished.get("finished")
        info["integrity_failures"] = backend_info.get("integrity_failures") or finished.get("integrity_failures", [])
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
                manifest = self.pod_manifest(pod)
                apps = [{"name": a.name, "image": a.image_name} for a in manifest.apps]
            except KvmrktError:
                apps = []
            rec = pod.read_json(STAGE1_RECORD, {}) or {}
            out.append({"uuid": pod.uuid, "state": pod.state(), "apps": apps, "created": rec.get("created")})
        return out

    def cat_manifest(self, ref: str) -> dict[str, Any]:
        """The pod manifest as written at prepare time."""
        return self.pod_manifest(self.find(ref)).to_dict()

    # --- control ------------------------------------------------------------------------------------------

    def _wait_exited(self, pod: Pod, timeout: float) -> bool:
        return wait_until(lambda: _fresh_state(pod) != "running", timeout=timeout)

    def stop(self, ref: str, *, force: bool = False) -> str:
        """Stop a running pod (graceful: ``kvmrkt.stopping``, warning when the VM had to be killed; force: kill it).

        Returns the state after stopping.

        Raises:
            PodStateError: the pod is not running.
        """
        pod = self.find(ref)
        pod.require("running")
        backend = self.backend_for(pod)
        if force:
            backend.stop(pod, force=True)
        else:
            outcome = escalate(StopEscalation(self.config.stage1.stop_timeout),
                               soft=lambda: backend.stop(pod, force=False), hard=lambda: backend.stop(pod, force=True),
                               ended=lambda t: self._wait_exited(pod, t))
            if not outcome.forced:
                return pod.state()
            self.warn(outcome.reason)
        self._wait_exited(pod, 10)
        return pod.state()

    def enter(self, ref: str, app: str | None, argv: list[str], *, stdout: IO[bytes], stderr: IO[bytes],
              stdin: int | None = None, tty: bool = False) -> int:
        """Run a command in an app of a running pod; returns its exit code (``stdin``: an fd copied to it;
        ``tty``: on a terminal in the guest, whose size follows ``stdin``'s)."""
        pod = self.find(ref)
        pod.require("running")
        manifest = self.pod_manifest(pod)
        names = [a.name for a in manifest.apps]
        if app is None:
            if len(names) != 1:
                raise ConfigError(f"pod {pod.uuid} has several apps: choose one with --app", hint=", ".join(names))
            app = names[0]
        if app not in names:
            raise ConfigError(f"pod {pod.uuid} has no app {app!r}", hint="apps: " + ", ".join(names))
        opts = EnterOptions(stdin=stdin, tty=tty, forward_signals=(signal.SIGTERM,) if tty else
                            (signal.SIGINT, signal.SIGTERM))
        return self.backend_for(pod).enter(pod, manifest, app, argv or ["/bin/sh"], stdout=stdout, stderr=stderr,
                                           opts=opts)

    def _collect(self, pod: Pod) -> bool:
        """Delete a pod directory that this process holds locked, after network and backend cleanup; free its
        MCS pair. A pod whose networks cannot be torn down is kept (False), so nothing leaks unrecorded."""
        if not self._teardown_network(pod):
            pod.unlock()
            return False
        with contextlib.suppress(KvmrktError, OSError):
            selinux.release(self._selinux_file(), pod.uuid)
        with contextlib.suppress(KvmrktError, OSError):
            jails.release(self.config, pod.uuid)
        try:
            if pod.phase not in ("embryo", "prepare", "prepared"):
                self.backend_for(pod).gc(pod)
        except KvmrktError:
            pass
        pod.delete()
        return True

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
        if not self._collect(pod):
            raise PodStateError(f"pod {pod.uuid} was kept: its network could not be torn down", state=state,
                                hint="see the warning above; fix it and run `kvmrkt rm` again")

    def gc(self, *, grace_period: float, expire_prepared: float) -> dict[str, list[str]]:
        """Mark exited pods as garbage and delete garbage older than the grace period (rkt gc)."""
        marked: list[str] = []
        removed: list[str] = []
        for pod in Pod.all(self.config.data_dir):
            state = pod.state()
            try:
                if state == "exited":
                    pod.lock()
                    self._teardown_network(pod)  # a killed `run` left it: free addresses and ports now
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
                if self._collect(pod):
                    removed.append(pod.uuid)
        return {"marked": marked, "removed": removed}
