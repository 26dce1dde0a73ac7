"""A second, tiny stage1 backend that proves the stage0 -> stage1 contract without a VM (tests only).

Role: implement every ``kvmrkt.stage1.Stage1`` method for real in its own terms, so the engine's sequencing
(prepare, trust, measured launch, stop escalation, gc) can be tested in seconds without root: no mounts, no
network namespaces, no QEMU, no TPM. The "guest" is a loop in the calling process that plays each app by a
script the test writes to ``CONFIG_DIR/fake-stage1.json``; like a real backend it keeps all of a pod's state
in the pod directory (any process may call any method), and every call is appended to
``CONFIG_DIR/fake-stage1.calls`` so a test can prove what was (never) called.

Script: ``{"apps": {NAME: BEHAVIOUR}, "run_error": MESSAGE}``; BEHAVIOUR is ``{"exit": N}`` (ends at once with
N), ``{"block": "term"}`` (runs until SIGTERM, then exits 143), ``{"block": "ignore-term"}`` (ignores SIGTERM;
the guest SIGKILLs it ``[stage1] stop_timeout`` after a soft stop, 137), ``{"block": "hung"}`` (the guest
accepts a soft stop and then does nothing: only a forced stop ends it), ``{"block": "agent-down"}`` (the soft
stop request fails with ``AgentError``). ``run_error``: the "VM" dies after ``before_boot`` (``VMLaunchError``).

Trust boundary: none of its own; it is test code, selected only by tests that register it in ``BACKENDS``.
"""

from __future__ import annotations

import json
import os
import signal as signals
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

from kvmrkt.config import RuntimeConfig
from kvmrkt.errors import AgentError, ConfigError, PodStateError, VMLaunchError
from kvmrkt.pods.pod import Pod
from kvmrkt.stage1 import PLAIN_ENTER, BackendStatus, EnterOptions, GuestState, RunOptions, RunResult, Stage1

if TYPE_CHECKING:  # annotations only: the engine hands the backend a validated manifest
    from kvmrkt.pods.manifest import PodManifest

NAME = "fake"
TARGET = "tests.engine.fake_stage1:FakeStage1"
SCRIPT = "fake-stage1.json"
CALLS = "fake-stage1.calls"
RUN_RECORD = "fake-run.json"
GUEST = "fake-guest.json"
STOP = "fake-stop.json"
SIGNAL = "fake-signal.json"
GO = "fake-go"
WINSIZE = "fake-winsize.json"
RUNTIME_FILES = (GUEST, STOP, SIGNAL, GO, WINSIZE)
KILLED = 128 + signals.SIGKILL
TERMINATED = 128 + signals.SIGTERM
TICK = 0.01


def calls(config: RuntimeConfig) -> list[str]:
    """Every backend call made so far with this config ("run <uuid>", "stop <uuid> force", ...)."""
    path = config.config_dir / CALLS
    return path.read_text().splitlines() if path.exists() else []


def write_script(config: RuntimeConfig, apps: dict[str, dict[str, Any]], run_error: str | None = None) -> None:
    """Choose how the fake guest plays the next pods' apps (see the module docstring)."""
    (config.config_dir / SCRIPT).write_text(json.dumps({"apps": apps, "run_error": run_error}))


class FakeStage1(Stage1):
    """A backend whose "VM" is a polling loop in the process that runs the pod (it holds the pod lock)."""

    name: ClassVar[str] = NAME
    network_modes: ClassVar[frozenset[str]] = frozenset({"none"})
    user_port_forwards: ClassVar[bool] = False

    def _log(self, *words: str) -> None:
        with (self.config.config_dir / CALLS).open("a") as fh:
            fh.write(" ".join(words) + "\n")

    def _script(self) -> dict[str, Any]:
        path = self.config.config_dir / SCRIPT
        doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        return doc

    @staticmethod
    def _holds_lock(pod: Pod) -> bool:
        """The caller holds an fd on this very pod directory (the flock was taken on it by ``Pod.lock``)."""
        if pod.lock_fd is None:
            return False
        try:
            held, here = os.fstat(pod.lock_fd), os.stat(pod.path)
        except OSError:
            return False
        return (held.st_dev, held.st_ino) == (here.st_dev, here.st_ino)

    # --- run -----------------------------------------------------------------------------------------

    def run(
        self, pod: Pod, manifest: PodManifest, opts: RunOptions, *, stdout: IO[bytes], stderr: IO[bytes]
    ) -> RunResult:
        self._log("run", pod.uuid)
        if pod.phase != "run" or not self._holds_lock(pod):
            raise PodStateError(f"pod {pod.uuid} must be in the run phase and locked by the running process",
                                state=pod.state())
        if opts.network.mode not in self.network_modes:
            raise ConfigError(f"the {self.name} backend cannot run --net={opts.network.mode} pods")
        script = self._script()
        behaviour = {a.name: script.get("apps", {}).get(a.name, {"exit": 0}) for a in manifest.apps}
        for name in RUNTIME_FILES:  # a fresh launch: nothing left from an earlier one is believed
            pod.file(name).unlink(missing_ok=True)
        pod.write_json(GUEST, {"ready": False, "held": False, "pids": {}, "exits": {}})
        pod.write_json(RUN_RECORD, {"backend": self.name, "pid": os.getpid(), "started": time.time(),
                                    "memory_mib": opts.jail.memory_mib, "vcpus": opts.jail.vcpus,
                                    "jail": opts.jail.to_dict(), "rootfs": {k: str(v) for k, v in opts.rootfs.items()}})
        opts.before_boot({"backend": self.name, "accel": "none", "cmdline": "fake", "memory_mib": opts.jail.memory_mib,
                          "vcpus": opts.jail.vcpus, "network": opts.network.mode,
                          "jail": opts.jail.to_dict()}).wait()  # the measured launch's gate, as a VMM's start
        self._log("booted", pod.uuid)
        if script.get("run_error"):
            raise VMLaunchError(f"fake VM of pod {pod.uuid} died: {script['run_error']}")
        return self._supervise(pod, manifest, opts, behaviour)

    def _supervise(self, pod: Pod, manifest: PodManifest, opts: RunOptions,
                   behaviour: dict[str, dict[str, Any]]) -> RunResult:
        """Play the apps until each has an exit code, answering stop and signal requests."""
        guest = pod.read_json(GUEST)
        guest["ready"] = True
        guest["held"] = opts.hold
        pod.write_json(GUEST, guest)
        while opts.hold and not pod.file(GO).exists():
            sig = pod.read_json(SIGNAL)
            if sig:  # before the held start a signal ends the pod
                return self._finish(pod, manifest, {a.name: 128 + int(sig["signum"]) for a in manifest.apps}, True)
            time.sleep(TICK)
        guest.update(held=False, pids={a.name: 100 + i for i, a in enumerate(manifest.apps)})
        exits = {name: int(b["exit"]) for name, b in behaviour.items() if "exit" in b}
        guest["exits"] = dict(exits)
        pod.write_json(GUEST, guest)
        soft_at: float | None = None
        while len(exits) < len(manifest.apps):
            stop = pod.read_json(STOP) or {}
            sig = pod.read_json(SIGNAL) or {}
            if stop.get("force"):
                return self._finish(pod, manifest, {a.name: exits.get(a.name, KILLED) for a in manifest.apps}, True)
            if stop and soft_at is None:
                soft_at = time.monotonic()
            for name, b in behaviour.items():
                if name in exits or b.get("block") == "hung":
                    continue
                ignores_term = b.get("block") == "ignore-term"
                if soft_at is not None:
                    if not ignores_term:
                        exits[name] = TERMINATED
                    elif time.monotonic() - soft_at >= self.config.stage1.stop_timeout:
                        exits[name] = KILLED
                elif sig and not (ignores_term and int(sig["signum"]) == signals.SIGTERM):
                    exits[name] = 128 + int(sig["signum"])
            guest["exits"] = dict(exits)
            pod.write_json(GUEST, guest)
            time.sleep(TICK)
        return self._finish(pod, manifest, exits, bool(pod.read_json(STOP)))

    def _finish(self, pod: Pod, manifest: PodManifest, exits: dict[str, int], stopped: bool) -> RunResult:
        guest = pod.read_json(GUEST)
        guest.update(done=True, exits=exits)
        pod.write_json(GUEST, guest)
        self._log("ended", pod.uuid)
        return RunResult(exit_codes={a.name: exits[a.name] for a in manifest.apps}, stopped=stopped)

    # --- operations of a running pod -----------------------------------------------------------------

    def _require_running(self, pod: Pod) -> dict[str, Any]:
        pod.refresh()
        guest = pod.read_json(GUEST)
        if pod.state() != "running" or not isinstance(guest, dict) or guest.get("done"):
            raise AgentError(f"pod {pod.uuid}: the fake guest is not running")
        return guest

    def stop(self, pod: Pod, *, force: bool) -> None:
        self._log("stop", pod.uuid, "force" if force else "soft")
        if force:
            if pod.read_json(GUEST) is not None:  # no guest: nothing to kill
                pod.write_json(STOP, {"force": True})
            return
        self._require_running(pod)
        if any(b.get("block") == "agent-down" for b in self._script().get("apps", {}).values()):
            raise AgentError(f"pod {pod.uuid}: the fake guest agent does not answer")
        if not pod.file(STOP).exists():
            pod.write_json(STOP, {"force": False})

    def enter(
        self, pod: Pod, manifest: PodManifest, app: str, argv: list[str], *, stdout: IO[bytes], stderr: IO[bytes],
        opts: EnterOptions = PLAIN_ENTER,
    ) -> int:
        """"Runs" argv by echoing it; ``exit N`` returns N. Only a started app that has not exited can be entered."""
        self._log("enter", pod.uuid, app)
        guest = self._require_running(pod)
        if app not in guest.get("pids", {}) or app in guest.get("exits", {}):
            raise AgentError(f"pod {pod.uuid}: app {app} is not running")
        stdout.write((" ".join(argv) + "\n").encode())
        return int(argv[1]) if len(argv) == 2 and argv[0] == "exit" and argv[1].isdigit() else 0

    def status(self, pod: Pod) -> BackendStatus:
        rec = pod.read_json(RUN_RECORD) or {}
        guest = pod.read_json(GUEST) or {}
        return BackendStatus(self.name, accel="none", pid=rec.get("pid"), started=rec.get("started"),
                             memory_mib=rec.get("memory_mib"), vcpus=rec.get("vcpus"), jail=rec.get("jail"),
                             app_exit_codes=dict(guest.get("exits", {})), guest_ready=bool(guest.get("ready")))

    def guest_state(self, pod: Pod) -> GuestState:
        guest = pod.read_json(GUEST) or {}
        return GuestState(ready=bool(guest.get("ready")), held=bool(guest.get("held")), done=bool(guest.get("done")),
                          pids=dict(guest.get("pids", {})), exits=dict(guest.get("exits", {})))

    def start_held(self, pod: Pod) -> None:
        self._log("start_held", pod.uuid)
        if not self._require_running(pod).get("held"):
            raise AgentError(f"pod {pod.uuid} is not waiting for a held start")
        pod.file(GO).touch()

    def signal(self, pod: Pod, signum: int, *, every_process: bool = False) -> None:
        self._log("signal", pod.uuid, str(signum))
        self._require_running(pod)
        pod.write_json(SIGNAL, {"signum": signum, "every_process": every_process})

    def resize(self, pod: Pod, rows: int, cols: int) -> None:
        self._require_running(pod)
        pod.write_json(WINSIZE, {"rows": rows, "cols": cols})

    def gc(self, pod: Pod) -> None:
        """Remove the fake guest's runtime files (idempotent; a half-created pod has none)."""
        self._log("gc", pod.uuid)
        for name in RUNTIME_FILES:
            Path(pod.file(name)).unlink(missing_ok=True)
