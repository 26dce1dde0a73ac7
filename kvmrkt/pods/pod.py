"""Pod directories on disk: rkt's rename-and-flock state machine.

Role: create, find, lock, move and delete pod directories under ``DATA_DIR/pods/<phase>/<uuid>`` and write
their files atomically. The phase directory plus whether the directory is locked is the pod's state, so any
later kvmrkt process (or one started after a crash) rebuilds the same view. Trust boundary: pod directories
are root-owned (0700); their contents were written by kvmrkt or by the VM backend, never by apps.

| phase dir        | locked            | unlocked          |
|------------------|-------------------|-------------------|
| embryo           | embryo            | embryo            |
| prepare          | preparing         | aborted prepare   |
| prepared         | (starting)        | prepared          |
| run              | running           | exited            |
| exited-garbage   | deleting          | exited garbage    |
| garbage          | deleting          | garbage           |
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from kvmrkt.errors import PodError, PodNotFoundError, PodStateError
from kvmrkt.host.files import write_json
from kvmrkt.images.scratch import remove_path


class Phase(StrEnum):
    """The phase directory a pod lives in (``DATA_DIR/pods/<phase>/<uuid>``); with the lock, its state."""

    EMBRYO = "embryo"
    PREPARE = "prepare"
    PREPARED = "prepared"
    RUN = "run"
    EXITED_GARBAGE = "exited-garbage"
    GARBAGE = "garbage"


PHASES = tuple(Phase)
_STATES = {
    Phase.EMBRYO: ("embryo", "embryo"),
    Phase.PREPARE: ("preparing", "aborted prepare"),
    Phase.PREPARED: ("prepared", "prepared"),
    Phase.RUN: ("running", "exited"),
    Phase.EXITED_GARBAGE: ("deleting", "exited garbage"),
    Phase.GARBAGE: ("deleting", "garbage"),
}
# The only moves there are (as rkt's pods.go allows them): forward through the lifecycle, or to garbage from a
# pod that never ran. Anything else is a bug in the caller, refused before the rename.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.EMBRYO: frozenset({Phase.PREPARE, Phase.GARBAGE}),
    Phase.PREPARE: frozenset({Phase.PREPARED, Phase.GARBAGE}),
    Phase.PREPARED: frozenset({Phase.RUN, Phase.GARBAGE}),
    Phase.RUN: frozenset({Phase.EXITED_GARBAGE}),
    Phase.EXITED_GARBAGE: frozenset(),
    Phase.GARBAGE: frozenset(),
}


@dataclass
class Pod:
    """A pod directory. ``path`` follows the pod through renames done by this object."""

    uuid: str
    data_dir: Path
    phase: Phase
    _lock_fd: int | None = None

    @property
    def path(self) -> Path:
        """The pod directory as of the last known phase."""
        return self.data_dir / "pods" / self.phase / self.uuid

    # --- discovery -------------------------------------------------------------------------------------

    @classmethod
    def create(cls, data_dir: Path) -> Pod:
        """Make a new embryo pod directory with a fresh UUID, locked by this process."""
        for phase in PHASES:
            (data_dir / "pods" / phase).mkdir(parents=True, exist_ok=True, mode=0o700)
        pod = cls(str(uuidlib.uuid4()), data_dir, Phase.EMBRYO)
        pod.path.mkdir(mode=0o700)
        pod.lock()
        return pod

    @classmethod
    def all(cls, data_dir: Path) -> list[Pod]:
        """Every pod directory, in any phase (a pod caught mid-rename may be listed once or not at all)."""
        pods: list[Pod] = []
        seen: set[str] = set()
        for phase in PHASES:
            base = data_dir / "pods" / phase
            with contextlib.suppress(FileNotFoundError):
                for entry in sorted(base.iterdir()):
                    if entry.is_dir() and entry.name not in seen:
                        seen.add(entry.name)
                        pods.append(cls(entry.name, data_dir, phase))
        return pods

    @classmethod
    def live_uuids(cls, data_dir: Path) -> list[str]:
        """The pods that still hold leases (MCS pairs, jail uids, share grants): every pod not yet garbage."""
        return [p.uuid for p in cls.all(data_dir) if p.phase not in (Phase.EXITED_GARBAGE, Phase.GARBAGE)]

    @classmethod
    def find(cls, data_dir: Path, ref: str) -> Pod:
        """Find a pod by full UUID or by a unique UUID prefix.

        Raises:
            PodNotFoundError: no pod, or the prefix is ambiguous.
        """
        ref = ref.strip()
        pods = cls.all(data_dir)
        matches = [p for p in pods if p.uuid == ref] or [p for p in pods if ref and p.uuid.startswith(ref)]
        if not matches:
            raise PodNotFoundError(f"no pod {ref!r}", hint="`kvmrkt list` shows the pods")
        if len(matches) > 1:
            raise PodNotFoundError(f"pod prefix {ref!r} is ambiguous: {', '.join(p.uuid for p in matches)}")
        return matches[0]

    def refresh(self) -> None:
        """Find the pod's current phase (another process may have moved it).

        Raises:
            PodNotFoundError: the pod is gone.
        """
        for phase in PHASES:
            if (self.data_dir / "pods" / phase / self.uuid).is_dir():
                self.phase = phase
                return
        raise PodNotFoundError(f"pod {self.uuid} no longer exists")

    # --- locking and state ----------------------------------------------------------------------------

    def lock(self, *, blocking: bool = False, shared: bool = False) -> int:
        """Take the pod directory's flock; returns the fd (kept until ``unlock``).

        Raises:
            PodStateError: the pod is locked by another process (running, or being handled).
        """
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise PodStateError(f"pod {self.uuid} is in use by another kvmrkt process", state=self.state()) from exc
            raise
        self._lock_fd = fd
        return fd

    def unlock(self) -> None:
        """Release the lock held by this object, if any."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def lock_fd(self) -> int | None:
        """The fd holding the lock (to hand to a process that must keep the pod locked)."""
        return self._lock_fd

    def is_locked(self) -> bool:
        """True when some process (possibly this one) holds the pod lock."""
        if self._lock_fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)
        return False

    def state(self) -> str:
        """rkt's state string for this pod."""
        locked_name, unlocked_name = _STATES[self.phase]
        return locked_name if self.is_locked() else unlocked_name

    def move(self, phase: Phase | str) -> None:
        """Move the directory to another phase with rename(2) (the lock, on the inode, stays).

        Raises:
            PodStateError: this object does not hold the pod's lock, or the lifecycle has no such move.
        """
        to = Phase(phase)
        if self._lock_fd is None:
            raise PodStateError(f"pod {self.uuid}: moving it to {to} needs its lock", state=self.state())
        if to not in TRANSITIONS[self.phase]:
            raise PodStateError(f"pod {self.uuid} cannot move from {self.phase} to {to}", state=self.state())
        target = self.data_dir / "pods" / to / self.uuid
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.rename(self.path, target)
        self.phase = to

    def require(self, *states: str) -> None:
        """Raise PodStateError unless the pod is in one of ``states``."""
        st = self.state()
        if st not in states:
            raise PodStateError(f"pod {self.uuid} is {st}; this needs it {' or '.join(states)}", state=st)

    # --- files ----------------------------------------------------------------------------------------

    def file(self, name: str) -> Path:
        """A path inside the pod directory."""
        return self.path / name

    def write_json(self, name: str, obj: Any) -> None:
        """Atomically write a JSON file in the pod directory."""
        write_json(self.file(name), obj)

    def read_json(self, name: str, default: Any = None) -> Any:
        """Read a JSON file of the pod directory, or ``default`` when it does not exist.

        Raises:
            PodError: the file exists but is not valid JSON.
        """
        try:
            return json.loads(self.file(name).read_text())
        except FileNotFoundError:
            return default
        except (OSError, ValueError) as exc:
            raise PodError(f"pod {self.uuid}: cannot read {name}: {exc}") from exc

    def age(self) -> float:
        """Seconds since the pod directory last changed phase (rename updates its ctime)."""
        return time.time() - self.path.stat().st_ctime

    def delete(self) -> None:
        """Remove the directory tree (caller holds the lock or knows nobody else can)."""
        remove_path(self.path)  # iterative: whatever depth the tree has
        self.unlock()

    @contextlib.contextmanager
    def locked(self, *, shared: bool = False) -> Iterator[Pod]:
        """Context manager form of lock/unlock."""
        self.lock(shared=shared)
        try:
            yield self
        finally:
            self.unlock()
