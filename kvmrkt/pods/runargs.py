"""Pure parsing of rkt-style command lines: the app sections of ``run``/``prepare`` and the value syntax of
``--volume``, ``--mount``, ``--memory``, ``--cpu`` and ``--set-env``.

Role: turn ``IMAGE [app flags] [-- ARGS... ---] [IMAGE ...]`` into ``AppRequest`` values for the engine.
Trust boundary: command-line input from the operator; errors are ``ConfigError`` naming the bad token.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from kvmrkt.errors import ConfigError
from kvmrkt.pods.confinement import Request, check_caps, parse_seccomp_flag
from kvmrkt.pods.manifest import MountPoint, Volume, check_name

APP_FLAGS = ("--exec", "--set-env", "--environment", "--working-dir", "--user", "--group", "--name", "--memory",
             "--cpu", "--mount", "--caps-retain", "--caps-remove", "--seccomp")  # fmt: skip
APP_FLAGS_HELP = """\
App flags (after each IMAGE, apply to that app):
  --exec PATH            program to run instead of the image's entrypoint/cmd
  --set-env K=V          environment variable (repeatable); --environment is an alias
  --working-dir DIR      working directory
  --user USER            user name (from the image's /etc/passwd) or uid
  --group GROUP          group name (from the image's /etc/group) or gid
  --name NAME            app name (default: derived from the image name)
  --memory SIZE          memory limit, e.g. 256M, 1G, 512Mi (sizes the VM)
  --cpu N                CPU limit, e.g. 1, 2, 500m (sizes the VM)
  --mount volume=NAME,target=PATH   mount a pod volume into this app
  --caps-retain CAP,...  the app's capability bounding set is exactly these (default: the OCI default set)
  --caps-remove CAP,...  the default set without these
  --seccomp mode=retain|remove[,errno=E],SYSCALL|@SET,...   the app's seccomp filter: retain allows only the
                         listed calls, remove denies them (default: remove @kvmrkt/default-blacklist)
  -- ARGS... ---         arguments for the app (--- ends them; not needed for the last image)
"""


@dataclass
class AppRequest:
    """One app as the operator asked for it (unresolved: the image is still a reference)."""

    image: str
    exec: str | None = None
    args: list[str] = field(default_factory=list)
    env: list[tuple[str, str]] = field(default_factory=list)
    working_dir: str | None = None
    user: str | None = None
    group: str | None = None
    name: str | None = None
    memory_mib: int | None = None
    cpus: int | None = None
    mounts: list[MountPoint] = field(default_factory=list)
    confinement: Request = field(default_factory=Request)


def parse_kv_list(text: str, flag: str) -> dict[str, str]:
    """``a=b,c=d`` -> dict; a value may not contain commas."""
    out: dict[str, str] = {}
    for part in text.split(","):
        if "=" not in part:
            raise ConfigError(f"{flag}: expected key=value, got {part!r} in {text!r}")
        key, value = part.split("=", 1)
        out[key.strip()] = value
    return out


def parse_volume(text: str) -> Volume:
    """``NAME,kind=host|empty,source=PATH,readOnly=true|false`` (rkt's syntax)."""
    name, _, rest = text.partition(",")
    opts = parse_kv_list(rest, "--volume") if rest else {}
    unknown = set(opts) - {"kind", "source", "readOnly"}
    if unknown:
        raise ConfigError(f"--volume {text!r}: unknown option(s) {', '.join(sorted(unknown))}")
    ro = opts.get("readOnly", "false").lower()
    if ro not in ("true", "false"):
        raise ConfigError(f"--volume {text!r}: readOnly must be true or false")
    kind = opts.get("kind", "")
    if kind not in ("host", "empty"):
        raise ConfigError(f"--volume {text!r}: kind must be host or empty")
    return Volume(check_name("volume", name), kind, opts.get("source"), ro == "true")


def parse_mount(text: str) -> MountPoint:
    """``volume=NAME,target=PATH``."""
    opts = parse_kv_list(text, "--mount")
    if set(opts) != {"volume", "target"}:
        raise ConfigError(f"--mount {text!r}: expected volume=NAME,target=PATH")
    return MountPoint(opts["volume"], opts["target"])


_SIZE = re.compile(r"^(\d+)([KMGT]i?|[kmgt])?\Z")
_FACTORS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3,
            "Ti": 1024**4}  # fmt: skip


def parse_memory(text: str) -> int:
    """A memory size (Kubernetes quantity style: 512M, 1G, 256Mi, bytes) in MiB, rounded up."""
    m = _SIZE.match(text.strip())
    if not m:
        raise ConfigError(f"--memory {text!r}: expected a size like 256M, 1G or 512Mi")
    unit = (m.group(2) or "").upper().replace("I", "i")
    mib = math.ceil(int(m.group(1)) * _FACTORS[unit] / 1024**2)
    if mib < 1:
        raise ConfigError(f"--memory {text!r}: too small")
    return mib


def parse_cpu(text: str) -> int:
    """A CPU limit (``2``, ``1.5``, ``500m``) as whole vCPUs, rounded up."""
    t = text.strip()
    try:
        value = int(t[:-1]) / 1000 if t.endswith("m") else float(t)
    except ValueError as exc:
        raise ConfigError(f"--cpu {text!r}: expected a number of CPUs like 1, 2 or 500m") from exc
    if value <= 0:
        raise ConfigError(f"--cpu {text!r}: must be positive")
    return math.ceil(value)


def parse_env(text: str, flag: str = "--set-env") -> tuple[str, str]:
    """``K=V``."""
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"{flag} {text!r}: expected NAME=VALUE")
    key, value = text.split("=", 1)
    return key, value


def parse_apps(tokens: list[str]) -> list[AppRequest]:
    """Split ``IMAGE [app flags] [-- ARGS ---] IMAGE ...`` into app requests.

    Raises:
        ConfigError: an unknown app flag, a flag without value, or no image at all.
    """
    apps: list[AppRequest] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "---":  # ends an app's section even without "-- ARGS"
            i += 1
            continue
        if tok == "--":
            if not apps:
                raise ConfigError("'--' must follow an image")
            i += 1
            while i < len(tokens) and tokens[i] != "---":
                apps[-1].args.append(tokens[i])
                i += 1
            i += 1
            continue
        if tok.startswith("--"):
            flag, eq, value = tok.partition("=")
            if flag not in APP_FLAGS:
                raise ConfigError(f"unknown app flag {flag!r}", hint=APP_FLAGS_HELP)
            if not apps:
                raise ConfigError(f"{flag} must follow the image it applies to")
            if not eq:
                i += 1
                if i >= len(tokens):
                    raise ConfigError(f"{flag} needs a value")
                value = tokens[i]
            _apply_flag(apps[-1], flag, value)
            i += 1
            continue
        apps.append(AppRequest(image=tok))
        i += 1
    if not apps:
        raise ConfigError("no image given", hint="usage: kvmrkt run [flags] IMAGE [app flags] [-- ARGS ---] ...")
    return apps


def _apply_flag(app: AppRequest, flag: str, value: str) -> None:
    if flag == "--exec":
        app.exec = value
    elif flag in ("--set-env", "--environment"):
        app.env.append(parse_env(value, flag))
    elif flag == "--working-dir":
        app.working_dir = value
    elif flag == "--user":
        app.user = value
    elif flag == "--group":
        app.group = value
    elif flag == "--name":
        app.name = check_name("app", value)
    elif flag == "--memory":
        app.memory_mib = parse_memory(value)
    elif flag == "--cpu":
        app.cpus = parse_cpu(value)
    elif flag == "--mount":
        app.mounts.append(parse_mount(value))
    elif flag in ("--caps-retain", "--caps-remove"):
        caps = check_caps(c for c in value.split(",") if c.strip())
        if flag == "--caps-retain":
            app.confinement = replace(app.confinement, caps_retain=caps)
        else:
            app.confinement = replace(app.confinement, caps_remove=caps)
    elif flag == "--seccomp":
        app.confinement = replace(app.confinement, seccomp=parse_seccomp_flag(value))


def default_app_name(image_name: str, taken: set[str]) -> str:
    """rkt-like app name from an image name: last path segment without tag, made DNS-label safe, unique."""
    base = image_name.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0].lower()
    base = re.sub(r"[^a-z0-9-]+", "-", base).strip("-")[:55] or "app"
    name, n = base, 2
    while name in taken:
        name = f"{base}-{n}"
        n += 1
    return name
