"""OCI lifecycle hooks (``config.json`` ``hooks``): parsed strictly, run on the host at the spec's points.

Role: ``prestart`` and ``createRuntime`` hooks run at the end of ``create`` (the VM is up and the process held),
``poststart`` after ``start`` released the process and before it returns, ``poststop`` after ``delete`` removed the
container; each hook gets the container's state JSON on its stdin, only its own ``env``, and is killed at its
``timeout``. A failing prestart/createRuntime hook fails ``create`` (the container is removed again, as the spec's
step 9 says); a failing poststart or poststop hook is a logged warning and the lifecycle goes on.
``createContainer`` and ``startContainer`` hooks run in the container's namespaces, which are inside the VM, where
no host program can run: a bundle that has them is refused, not run somewhere else.

Trust boundary: like runc, kvmrkt-oci runs hooks as root on the host: the bundle is written by the engine
(containerd, podman), which decides which hooks exist; ``config.json`` (and so the hooks) is measured with the
launch. Values are checked (absolute paths, string lists, ``K=V`` env, positive timeouts) before anything runs.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvmrkt.errors import ConfigError, ManifestError

RUN_ON_HOST = ("prestart", "createRuntime", "poststart", "poststop")
IN_CONTAINER = ("createContainer", "startContainer")


@dataclass(frozen=True, slots=True)
class Hook:
    """One hook: ``path`` is executed with ``args`` (``args[0]`` is its argv[0]) and only ``env``."""

    path: str
    args: tuple[str, ...]
    env: tuple[str, ...] = ()
    timeout: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "args": list(self.args), "env": list(self.env), "timeout": self.timeout}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Hook:
        return cls(d["path"], tuple(d["args"]), tuple(d["env"]), d["timeout"])


Hooks = dict[str, tuple[Hook, ...]]


def parse(doc: dict[str, Any]) -> Hooks:
    """The hooks of a ``config.json`` document, by kind.

    Raises:
        ManifestError: a malformed hook (the field is named), or a hook kind that would have to run inside the VM.
    """
    raw = doc.get("hooks", {})
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ManifestError("config.json: hooks must be an object")
    out: Hooks = {}
    for kind, entries in raw.items():
        if kind in IN_CONTAINER and entries:
            raise ManifestError(f"config.json: hooks.{kind} run in the container's namespaces, which are inside "
                                "the VM, where no host program can run: not supported by kvmrkt-oci",
                                hint="use prestart/createRuntime/poststart/poststop hooks, which run on the host")
        if kind not in RUN_ON_HOST:
            if entries:
                raise ManifestError(f"config.json: unknown hook kind hooks.{kind}")
            continue
        if not isinstance(entries, list):
            raise ManifestError(f"config.json: hooks.{kind} must be a list")
        out[kind] = tuple(_hook(e, f"hooks.{kind}[{i}]") for i, e in enumerate(entries))
    return out


def _hook(entry: Any, where: str) -> Hook:
    if not isinstance(entry, dict):
        raise ManifestError(f"config.json: {where} must be an object")
    path = entry.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        raise ManifestError(f"config.json: {where}.path must be an absolute path")
    args, env = entry.get("args", [path]), entry.get("env", [])
    for name, value in (("args", args), ("env", env)):
        if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v for v in value):
            raise ManifestError(f"config.json: {where}.{name} must be a list of strings")
    if not all("=" in e for e in env):
        raise ManifestError(f"config.json: {where}.env entries must be KEY=VALUE")
    timeout = entry.get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0):
        raise ManifestError(f"config.json: {where}.timeout must be a positive number of seconds")
    return Hook(path, tuple(args or [path]), tuple(env), timeout)


def run(hooks: Hooks, kind: str, state: dict[str, Any], *, warn: Callable[[str], None] | None = None) -> None:
    """Run the hooks of one kind in order, each with ``state`` (JSON) on its stdin. With ``warn`` a failure is
    reported there and the next hook runs (poststart, poststop); without, the first failure raises.

    Raises:
        ConfigError: a hook failed, timed out or could not be started (only without ``warn``).
    """
    data = json.dumps(state).encode()
    for i, hook in enumerate(hooks.get(kind, ())):
        try:
            _run_one(hook, data)
        except ConfigError as exc:
            msg = f"{kind} hook {i} ({hook.path}): {exc.message}"
            if warn is None:
                raise ConfigError(msg) from None
            warn(msg)


def _run_one(hook: Hook, data: bytes) -> None:
    try:
        proc = subprocess.run(list(hook.args), executable=hook.path, input=data, env=dict(
            e.split("=", 1) for e in hook.env), capture_output=True, timeout=hook.timeout, check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"did not finish within its timeout of {hook.timeout}s and was killed") from None
    except OSError as exc:
        raise ConfigError(f"cannot run it: {exc.strerror}") from None
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", "replace").strip()[-500:]
        raise ConfigError(f"exited with status {proc.returncode}" + (f": {tail}" if tail else ""))
