"""Measured launch: every fact of a pod's launch is logged and extended into the TPM before its VM runs.

Role: build the launch events (manifest, each image with its own verdict, stage1 facts, policy digest, insecure
options) and hand them to ``measure.tpm.Measurer``; or record, loudly, that the pod runs unmeasured under
``--insecure-options=tpm``. Trust boundary: fail closed: no TPM, a dead TPM or a damaged log stops the launch;
a PCR that moved under kvmrkt is recorded as tamper evidence and announced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvmrkt.config import RuntimeConfig
from kvmrkt.errors import TpmUnavailableError
from kvmrkt.images.store import Store
from kvmrkt.pods.manifest import PodManifest
from kvmrkt.pods.pod import Pod
from kvmrkt.pods.records import MEASURE
from kvmrkt.trust import admission
from measure.events import Event, launch_events
from measure.tpm import Measurer


def _measurer(config: RuntimeConfig, what: str) -> Measurer:
    """The configured TPM's measurer.

    Raises:
        TpmUnavailableError: no TPM is configured (fail closed).
    """
    cfg = config.measure
    if not cfg.tcti:
        raise TpmUnavailableError(
            f"no TPM is configured and /dev/tpmrm0 does not exist: the {what} cannot be measured",
            hint='set [measure] tcti in config.toml (e.g. "swtpm:port=2321" for an emulated TPM), or run '
                 "with --insecure-options=tpm (unmeasured)")
    return Measurer(cfg.tcti, cfg.pcr, cfg.log_dir)


def measure_launch(config: RuntimeConfig, store: Store, pod: Pod, manifest: PodManifest, trust: dict[str, Any],
                   facts: dict[str, Any], *, policy_digest: str | None, warn: Callable[[str], None],
                   apps: list[dict[str, Any]] | None = None) -> None:
    """Log and extend the launch into the TPM (fail closed), or record that the pod runs unmeasured under
    --insecure-options=tpm. ``apps``: the per-app events, when they do not come from the image store."""
    if "tpm" in config.insecure_options:
        warn(f"WARNING: --insecure-options=tpm: pod {pod.uuid} runs UNMEASURED (nothing in the TPM)")
        pod.write_json(MEASURE, {"measured": False, "reason": "--insecure-options=tpm"})
        return
    measurer = _measurer(config, "pod")
    deps: list[dict[str, Any]] = []
    if apps is None:
        apps, deps = admission.measured_images(manifest, store, trust)
    events = launch_events(pod=pod.uuid, manifest=manifest.canonical_bytes(), apps=apps, dependencies=deps,
                           stage1=facts, trust={"policy": policy_digest, "decisions": trust},
                           insecure=sorted(config.insecure_options))
    recnums = measurer.measure(events)
    warn_about(measurer, warn)
    pod.write_json(MEASURE, {"measured": True, "pcr": measurer.pcr, "log": str(measurer.log.path),
                             "records": recnums, "events": [e.kind for e in events]})


def warn_about(measurer: Measurer, warn: Callable[[str], None]) -> None:
    """Announce what reconciling the log with the TPM found: a reset cycle ended, or tamper evidence."""
    if measurer.ended:
        warn(f"note: {measurer.ended[1]}: the measurement log of the last reset cycle is kept as "
             f"{measurer.ended[0]} and a new one started")
    if measurer.mismatch:
        warn(f"WARNING: TAMPER EVIDENCE: PCR {measurer.pcr} holds {measurer.mismatch[1].hex()[:16]}..., "
             f"where kvmrkt's log leads to {measurer.mismatch[0].hex()[:16]}...: something outside "
             f"kvmrkt extended it (or the log was edited). Recorded in {measurer.log.path}; until the "
             "TPM is reset (host reboot), no verifier will accept this host's evidence")


def measure_app_added(config: RuntimeConfig, pod: Pod, app: dict[str, Any], *, warn: Callable[[str], None]) -> None:
    """Log and extend an app added to a running pod (a container created in its sandbox VM) as one more ``app``
    event of the pod's launch, before it runs: a verifier groups it with the pod's other apps and judges it by
    the same reference. Fail closed as ``measure_launch``; under --insecure-options=tpm it is announced instead."""
    if "tpm" in config.insecure_options:
        warn(f"WARNING: --insecure-options=tpm: app {app.get('app')} of pod {pod.uuid} runs UNMEASURED")
        return
    measurer = _measurer(config, "app")
    recnums = measurer.measure([Event("app", {"pod": pod.uuid, **app})])
    warn_about(measurer, warn)
    rec = pod.read_json(MEASURE, {}) or {}
    if rec.get("measured"):
        pod.write_json(MEASURE, {**rec, "records": [*rec.get("records", []), *recnums],
                                 "events": [*rec.get("events", []), "app"]})
