"""Launching a prepared pod: trust judged again, disks verified, labels, network, measured launch, the VM.

Role: ``run``, ``run-prepared`` and kvmrkt-oci's supervisor end here. ``boot`` is the one path into a backend's
``run``: it decides the jail and the labels, sets up the network, and measures the launch from the backend's
``before_boot`` hook, before any guest code runs (in a forked child, ``kvmrkt.host.forked``, while the backend
starts the VMM paused); whatever happens, the network is torn down when the VM ends.
Trust boundary: the pod directory is locked by this process for the whole run; images are judged by the policy
as it is now, not as it was at prepare; the backend gets typed, validated inputs only (``LaunchRequest`` ->
``RunOptions``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from kvmrkt.config import RuntimeConfig
from kvmrkt.errors import ConfigError, IntegrityError, KvmrktError, PodStateError
from kvmrkt.host import forked
from kvmrkt.host.forked import Pending
from kvmrkt.host.timeline import stamp
from kvmrkt.images.records import Progress, no_progress
from kvmrkt.images.store import Store
from kvmrkt.net.netconf import NetOptions
from kvmrkt.net.network import Intent, PodNetworks
from kvmrkt.pods import confinement, labels
from kvmrkt.pods import jail as jails
from kvmrkt.pods.manifest import PodManifest
from kvmrkt.pods.measured import measure_launch
from kvmrkt.pods.pod import Phase, Pod
from kvmrkt.pods.prepare import PodOptions, Preparer
from kvmrkt.pods.records import EXIT, TRUST, ExitRecord, backend_for, pod_manifest
from kvmrkt.pods.runargs import AppRequest
from kvmrkt.stage1 import CgroupPlacement, RunOptions, RunResult, Stage1
from kvmrkt.trust.gate import TrustGate


def pod_exit_code(codes: dict[str, int]) -> int:
    """One app: its exit code. Several: the first non-zero exit code in app order, else 0."""
    return next((c for c in codes.values() if c != 0), 0)


@dataclass(frozen=True, slots=True)
class LaunchRequest:
    """What the caller of ``boot`` decides about a launch (the rest, stage0 decides from the pod and the config).

    ``rootfs``/``verity``: each app's root disk (or shared directory) and its dm-verity parameters;
    ``shared_roots``: apps whose root is a host directory (read-only or not); ``interactive``, ``tty``, ``hold``,
    ``accel``, ``shared_export``: as ``RunOptions``; ``measured_apps``: the per-app events when they do not come
    from the image store (OCI bundles); ``cgroup``: see ``CgroupPlacement``.
    """

    rootfs: Mapping[str, Path]
    accel: str
    verity: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    shared_roots: Mapping[str, bool] = field(default_factory=dict)
    interactive: bool = False
    tty: bool = False
    hold: bool = False
    shared_export: bool = False
    measured_apps: list[dict[str, Any]] | None = None
    cgroup: CgroupPlacement | None = None  # the VMM's cgroup, where the caller wants it (an OCI cgroupsPath)


class Launcher:
    """Runs prepared pods, for one command."""

    def __init__(self, config: RuntimeConfig, store: Store, trust: TrustGate, preparer: Preparer,
                 networks: PodNetworks, *, warn: Callable[[str], None]) -> None:
        self.config = config
        self.store = store
        self.trust = trust
        self.preparer = preparer
        self.networks = networks
        self.warn = warn

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
            if pod.phase != Phase.PREPARED:
                raise PodStateError(f"pod {pod.uuid} is {pod.state()}, not prepared", state=pod.state())
            manifest = pod_manifest(pod)
            if interactive and len(manifest.apps) != 1:
                raise ConfigError("--interactive needs a pod with exactly one app")
            if trust is None:
                trust = self.trust.judge_pod(manifest)
                pod.write_json(TRUST, trust)
            rootfs, verity = self.preparer.app_disks(manifest)
            backend = backend_for(self.config, pod)
            ports = [p for a in manifest.apps for p in self.store.get(a.image_id).ports]
            intent = self.networks.intent(net or NetOptions(), ports, modes=backend.network_modes,
                                          user_forwards=backend.user_port_forwards)
            request = LaunchRequest(rootfs=rootfs, verity=verity, interactive=interactive,
                                    accel=accel or self.config.stage1.accel)
            result = self.boot(pod, manifest, backend, request, trust=trust, intent=intent, stdout=stdout,
                               stderr=stderr)
            return pod_exit_code(result.exit_codes)
        finally:
            pod.unlock()

    def boot(self, pod: Pod, manifest: PodManifest, backend: Stage1, request: LaunchRequest, *,
             trust: dict[str, Any], intent: Intent, stdout: IO[bytes], stderr: IO[bytes]) -> RunResult:
        """Run a prepared pod that this process holds locked: labels, network, measured launch, the VM; the
        network is torn down when the VM ends."""
        applied = labels.apply(self.config, pod, manifest)
        jail = replace(jails.for_pod(self.config, manifest), placement=request.cgroup)
        for layer in confinement.lifted(self.config.insecure_options):
            self.warn(f"WARNING: --insecure-options={layer}: the apps of pod {pod.uuid} run without the {layer} "
                      "restrictions")

        def before_boot(facts: dict[str, Any]) -> Pending:
            labels.label_files(self.config, pod, applied)
            stage1 = {**facts, "selinux": applied.to_dict()}
            policy_digest = self.trust.policy_digest()

            def measure() -> None:
                measure_launch(self.config, self.store, pod, manifest, trust, stage1, policy_digest=policy_digest,
                               warn=self.warn, apps=request.measured_apps)
                stamp("measured")

            return forked.start("measured launch", measure)  # overlaps the VMM's start; the guest waits for it

        pod.move(Phase.RUN)
        try:
            network = self.networks.setup(pod, manifest, intent, owner=(jail.uid, jail.gid))
            stamp("network-up")
            opts = RunOptions(rootfs=request.rootfs, verity=request.verity, interactive=request.interactive,
                              accel=request.accel, shared_roots=request.shared_roots, hold=request.hold,
                              tty=request.tty, shared_export=request.shared_export, jail=jail,
                              exec_label=applied.process if applied.process_applied else None,
                              network=network,
                              before_boot=before_boot)
            result = backend.run(pod, manifest, opts, stdout=stdout, stderr=stderr)
        finally:
            self.teardown_network(pod)
            stamp("network-down")
        pod.write_json(EXIT, ExitRecord(result.exit_codes, result.stopped, result.integrity_failures,
                                        time.time()).to_dict())
        if result.integrity_failures:
            raise IntegrityError(result.integrity_failures, result.exit_codes)
        return result

    def teardown_network(self, pod: Pod) -> bool:
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
        pod = self.preparer.prepare(apps, opts, progress=progress, keep_lock=True)
        on_prepared(pod)
        return self.run_prepared(pod, interactive=interactive, accel=accel, stdout=stdout, stderr=stderr,
                                 trust=pod.read_json(TRUST), net=net)
