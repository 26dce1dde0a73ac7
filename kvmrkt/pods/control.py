"""Controlling pods that exist: stop, enter, remove, and garbage collection.

Role: rkt's ``stop``, ``enter``, ``rm`` and ``gc``: each takes the pod's lock (or requires the state that proves
who holds it), and collecting a pod frees everything it held (network, MCS pair, jail uid, the backend's files)
before its directory goes. Trust boundary: pods are found by UUID under the data directory only; only the
recorded VMM of a pod is ever signalled (the backend checks it); a pod whose network cannot be torn down is
kept, so nothing leaks unrecorded.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from typing import IO

from kvmrkt.config import RuntimeConfig
from kvmrkt.errors import AgentError, ConfigError, KvmrktError, PodStateError
from kvmrkt.host.mounts import mounts_under
from kvmrkt.host.wait import wait_until
from kvmrkt.pods import jail as jails
from kvmrkt.pods import labels
from kvmrkt.pods.pod import Phase, Pod
from kvmrkt.pods.records import NOT_STARTED, backend_for, fresh_state, pod_manifest
from kvmrkt.pods.stopping import StopEscalation, escalate
from kvmrkt.stage1 import EnterOptions


class PodControl:
    """Stop, enter, remove and collect pods, for one command. ``teardown_network(pod)`` frees a pod's networks
    (False: it could not, and said why)."""

    def __init__(self, config: RuntimeConfig, *, teardown_network: Callable[[Pod], bool],
                 warn: Callable[[str], None]) -> None:
        self.config = config
        self.teardown_network = teardown_network
        self.warn = warn

    def find(self, ref: str) -> Pod:
        """A pod by UUID or unique prefix."""
        return Pod.find(self.config.data_dir, ref)

    def _wait_exited(self, pod: Pod, timeout: float) -> bool:
        return wait_until(lambda: fresh_state(pod) != "running", timeout=timeout)

    def stop(self, ref: str, *, force: bool = False) -> str:
        """Stop a running pod (graceful: ``kvmrkt.pods.stopping``, warning when the VM had to be killed; force:
        kill it).

        Returns the state after stopping.

        Raises:
            PodStateError: the pod is not running.
        """
        pod = self.find(ref)
        pod.require("running")
        backend = backend_for(self.config, pod)
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
        manifest = pod_manifest(pod)
        names = [a.name for a in manifest.apps]
        if app is None:
            if len(names) != 1:
                raise ConfigError(f"pod {pod.uuid} has several apps: choose one with --app", hint=", ".join(names))
            app = names[0]
        if app not in names:
            raise ConfigError(f"pod {pod.uuid} has no app {app!r}", hint="apps: " + ", ".join(names))
        opts = EnterOptions(stdin=stdin, tty=tty, forward_signals=(signal.SIGTERM,) if tty else
                            (signal.SIGINT, signal.SIGTERM))
        try:
            return backend_for(self.config, pod).enter(pod, manifest, app, argv or ["/bin/sh"], stdout=stdout,
                                                       stderr=stderr, opts=opts)
        except AgentError as exc:
            if not pod.path.exists():  # moved on to exited (or removed) meanwhile
                raise PodStateError(f"pod {pod.uuid} stopped running before enter reached it",
                                    state="exited") from None
            if isinstance(exc.__cause__, FileNotFoundError):  # its supervisor has no session socket (yet/any more)
                raise PodStateError(f"pod {pod.uuid} is not taking enter sessions: it is starting or stopping",
                                    state="running", hint="try again, or see `kvmrkt status`") from None
            raise

    def collect(self, pod: Pod) -> bool:
        """Delete a pod directory that this process holds locked, after network and backend cleanup; free its
        MCS pair and jail uid. A pod whose networks cannot be torn down, or with something still mounted under its
        directory, is kept (False)."""
        if not self.teardown_network(pod):
            pod.unlock()
            return False
        labels.release(self.config, pod.uuid)
        with contextlib.suppress(KvmrktError, OSError):
            jails.release(self.config, pod.uuid)
        try:
            if pod.phase not in NOT_STARTED:
                backend_for(self.config, pod).gc(pod)
        except KvmrktError:
            pass
        left = mounts_under(pod.path)
        if left:  # never delete through a mount (a pod's shared export binds host files under it)
            self.warn(f"pod {pod.uuid} was kept: {left[0]} is still mounted; unmount it and remove the pod again")
            pod.unlock()
            return False
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
        if not self.collect(pod):
            left = mounts_under(pod.path)
            why = f"{left[0]} is still mounted" if left else "its network could not be torn down"
            raise PodStateError(f"pod {pod.uuid} was kept: {why}", state=state,
                                hint="see the warning above; fix it and run `kvmrkt rm` again")

    def gc(self, *, grace_period: float, expire_prepared: float) -> dict[str, list[str]]:
        """Mark exited pods as garbage and delete garbage older than the grace period (rkt gc)."""
        marked: list[str] = []
        removed: list[str] = []
        for pod in Pod.all(self.config.data_dir):
            try:  # a pod another process (a second gc, rm) takes meanwhile is its to handle
                state = pod.state()
                if state == "exited":
                    pod.lock()
                    self.teardown_network(pod)  # a killed `run` left it: free addresses and ports now
                    pod.move(Phase.EXITED_GARBAGE)
                    pod.unlock()
                    marked.append(pod.uuid)
                elif (state in ("aborted prepare", "embryo") and not pod.is_locked()) or (
                    state == "prepared" and pod.age() > expire_prepared
                ):
                    pod.lock()
                    pod.move(Phase.GARBAGE)
                    pod.unlock()
                    marked.append(pod.uuid)
            except (PodStateError, FileNotFoundError):
                continue
        for pod in Pod.all(self.config.data_dir):
            try:
                if pod.state() not in ("exited garbage", "garbage") or pod.age() < grace_period:
                    continue
                pod.lock()
            except (PodStateError, FileNotFoundError):
                continue
            if self.collect(pod):
                removed.append(pod.uuid)
        return {"marked": marked, "removed": removed}
