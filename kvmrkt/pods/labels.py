"""A pod's SELinux labels (sVirt): a unique MCS pair per pod, applied to its VMM and its files.

Role: allocate the pair at prepare, decide at launch whether the process label can be applied on this host
(refusing in ``required`` mode when it cannot), label the pod's files, free the pair when the pod is collected.
Trust boundary: the labels are kvmrkt's; the pairs of pods that no longer exist are freed first, so two live
pods never share one.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from kvmrkt.config import RuntimeConfig
from kvmrkt.errors import KvmrktError, SELinuxError
from kvmrkt.pods.manifest import PodManifest
from kvmrkt.pods.pod import Pod
from kvmrkt.pods.records import SELINUX, SelinuxRecord
from policy import selinux

PROCESS_LABEL = "kvmrkt.selinux/process-label"
FILE_LABEL = "kvmrkt.selinux/file-label"


def _pairs_file(config: RuntimeConfig) -> Path:
    return config.data_dir / "selinux" / "mcs.json"


def allocate(config: RuntimeConfig, uuid: str) -> selinux.Label:
    """A unique MCS pair for a new pod (pairs of pods that no longer exist are freed first)."""
    cfg = config.selinux
    return selinux.allocate(_pairs_file(config), uuid, Pod.live_uuids(config.data_dir), categories=cfg.categories,
                            process=cfg.process_context or None, file=cfg.file_context or None)


def release(config: RuntimeConfig, uuid: str) -> None:
    """Free a collected pod's pair (best effort: a pair left behind is freed at the next allocation)."""
    with contextlib.suppress(KvmrktError, OSError):
        selinux.release(_pairs_file(config), uuid)


def apply(config: RuntimeConfig, pod: Pod, manifest: PodManifest) -> SelinuxRecord:
    """Decide how the pod's labels are applied here, refusing in required mode when they cannot be."""
    ann = dict(manifest.annotations)
    on = selinux.enabled()
    if not on and config.selinux.mode == "required":
        raise SELinuxError(f"pod {pod.uuid} needs its SELinux label applied, but SELinux is not enabled on "
                           "this host", hint="run with --selinux=auto, or on a host with SELinux enabled")
    process = ann.get(PROCESS_LABEL, "")
    info = SelinuxRecord(process, ann.get(FILE_LABEL, ""), on and bool(process),
                         "" if on else "SELinux is disabled on this host: the label is allocated and recorded, "
                                       "files carry it as an xattr, QEMU runs unconfined")
    pod.write_json(SELINUX, info.to_dict())
    return info


def label_files(config: RuntimeConfig, pod: Pod, labels: SelinuxRecord) -> None:
    """Label the pod directory and its files (sockets are labelled by QEMU's exec context when enabled)."""
    if not labels.file:
        return
    paths = [pod.path, *(p for p in pod.path.rglob("*") if not p.is_symlink())]
    failed = selinux.label_files(paths, labels.file)
    if failed and config.selinux.mode == "required":
        raise SELinuxError(f"cannot label pod files: {failed[0]}")
