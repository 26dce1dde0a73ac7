"""``kvmrkt-oci`` (also ``kvmrkt oci``): the OCI runtime command line as runc defines it, for containerd's runc
shim (``BinaryName``), ``ctr run --runc-binary`` and ``podman --runtime``.

Role: parse runc's flags, call ``kvmrkt.ocirt.runtime``, print. Errors go to stderr and, with ``--log``, to that file
as JSON lines (``--log-format json``) that the shim shows to the user; the exit code is 1, as runc's.
Trust boundary: the caller is the container engine (root); see ``kvmrkt.ocirt.runtime``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

import click

from kvmrkt import __version__, jsondoc
from kvmrkt.cli._base import CliContext, skip_final_collection
from kvmrkt.config import DEFAULT_CONFIG_DIR, load_config
from kvmrkt.engine import Engine
from kvmrkt.errors import KvmrktError
from kvmrkt.ocirt.bundle import OCI_VERSION, parse_signal
from kvmrkt.ocirt.runtime import OciRuntime, features
from kvmrkt.stage1 import EnterOptions

DEFAULT_ROOT = Path("/run/kvmrkt-oci")


class _OciCtx:
    def __init__(self, root: Path, log: Path | None, log_format: str, config_dir: Path, data_dir: Path | None,
                 insecure: str) -> None:
        self.root, self.log_path, self.log_format = root, log, log_format
        self.config_dir, self.data_dir, self.insecure = config_dir, data_dir, insecure
        self._log: IO[str] | None = None

    @property
    def log(self) -> IO[str] | None:
        if self._log is None and self.log_path is not None:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            self._log = os.fdopen(fd, "a")  # O_NOFOLLOW: a symlink planted at the path is refused
        return self._log

    def say(self, level: str, msg: str) -> None:
        if self.log is not None:
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            line = json.dumps({"level": level, "msg": msg, "time": when}) if self.log_format == "json" else \
                f'time="{when}" level={level} msg={json.dumps(msg)}'
            self.log.write(line + "\n")
            self.log.flush()

    def runtime(self) -> OciRuntime:
        config = load_config(config_dir=self.config_dir, data_dir=self.data_dir, insecure_options=self.insecure)
        return OciRuntime(self.root, Engine(config, warn=lambda m: self.say("warning", m)))


pass_oci = click.make_pass_decorator(_OciCtx)
_ACTIVE: dict[str, _OciCtx] = {}  # this process's context, for errors raised after click has unwound


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", type=click.Path(path_type=Path), default=DEFAULT_ROOT, show_default=True,
              help="Directory for container state (kvmrkt-oci keeps it in ROOT/kvmrkt-oci).")
@click.option("--log", type=click.Path(path_type=Path), help="Also write errors and warnings to this file.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--systemd-cgroup", is_flag=True,
              help="Accepted for compatibility: kvmrkt-oci places cgroups by path (linux.cgroupsPath); "
                   "systemd's slice:prefix:name form is refused.")
@click.option("--debug", is_flag=True, hidden=True)
@click.option("--config-dir", type=click.Path(path_type=Path), envvar="KVMRKT_CONFIG_DIR",
              default=DEFAULT_CONFIG_DIR, show_default=True, help="kvmrkt's config dir [env KVMRKT_CONFIG_DIR].")
@click.option("--dir", "data_dir", type=click.Path(path_type=Path), envvar="KVMRKT_DIR",
              help="kvmrkt's data dir, where the containers' pods live [env KVMRKT_DIR].")
@click.option("--insecure-options", envvar="KVMRKT_INSECURE_OPTIONS", default="",
              help="As for kvmrkt (e.g. tpm: run unmeasured) [env KVMRKT_INSECURE_OPTIONS].")
@click.version_option(f"{__version__}\nspec: {OCI_VERSION}", "--version", "-v", prog_name="kvmrkt-oci",
                      message="%(prog)s version %(version)s")
@click.pass_context
def oci(ctx: click.Context, root: Path, log: Path | None, log_format: str, systemd_cgroup: bool, debug: bool,
        config_dir: Path, data_dir: Path | None, insecure_options: str) -> None:
    """An OCI runtime (runc's command line) that runs every container in its own kvmrkt VM.

    \b
    containerd: runtime handler with the runc shim and BinaryName = "/usr/local/bin/kvmrkt-oci"
    ctr:        ctr run --runc-binary /usr/local/bin/kvmrkt-oci IMAGE ID CMD...
    podman:     podman --runtime /usr/local/bin/kvmrkt-oci run ...
    """
    outer = ctx.find_object(CliContext)  # as `kvmrkt oci`: kvmrkt's own --config-dir/--dir/--insecure-options apply
    if outer is not None:
        default = click.core.ParameterSource.DEFAULT
        if ctx.get_parameter_source("config_dir") == default:
            config_dir = outer.config_dir
        data_dir = data_dir or outer.data_dir
        insecure_options = insecure_options or outer.insecure
    ctx.obj = _ACTIVE["ctx"] = _OciCtx(root, log, log_format, config_dir, data_dir, insecure_options)


@oci.command()
@click.option("--bundle", "-b", type=click.Path(path_type=Path, exists=True, file_okay=False), default=".",
              help="The bundle directory (config.json and the rootfs).")
@click.option("--pid-file", type=click.Path(path_type=Path), help="Write the container process's host pid here.")
@click.option("--console-socket", type=click.Path(path_type=Path), help="Unix socket to send a terminal's master to.")
@click.option("--no-pivot", is_flag=True, hidden=True)
@click.option("--no-new-keyring", is_flag=True, hidden=True)
@click.option("--preserve-fds", type=int, default=0, hidden=True)
@click.argument("container_id")
@pass_oci
def create(c: _OciCtx, bundle: Path, pid_file: Path | None, console_socket: Path | None, no_pivot: bool,
           no_new_keyring: bool, preserve_fds: int, container_id: str) -> None:
    """Boot the container's VM and set its process up, held until `start`."""
    c.runtime().create(container_id, bundle, pid_file, console_socket=console_socket)


@oci.command()
@click.argument("container_id")
@pass_oci
def start(c: _OciCtx, container_id: str) -> None:
    """Start the process of a created container."""
    c.runtime().start(container_id)


@oci.command()
@click.argument("container_id")
@pass_oci
def state(c: _OciCtx, container_id: str) -> None:
    """Print the container's state (runtime-spec state JSON)."""
    click.echo(json.dumps(c.runtime().state(container_id), indent=2))


@oci.command()
@click.option("--all", "-a", "every", is_flag=True, help="Signal every process in the container's VM.")
@click.argument("container_id")
@click.argument("signal", default="SIGTERM")
@pass_oci
def kill(c: _OciCtx, every: bool, container_id: str, signal: str) -> None:
    """Send a signal (name or number) to the container's process, inside its VM."""
    c.runtime().kill(container_id, parse_signal(signal), every_process=every)


@oci.command()
@click.option("--force", "-f", is_flag=True, help="Kill a running container first.")
@click.argument("container_id")
@pass_oci
def delete(c: _OciCtx, force: bool, container_id: str) -> None:
    """Delete a container (and its stopped VM's pod)."""
    c.runtime().delete(container_id, force=force)


@oci.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--process", "-p", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A runtime-spec process JSON (args, env, cwd, user.uid/gid, terminal).")
@click.option("--detach", "-d", is_flag=True, help="Return at once; the pid file's process carries the exit status.")
@click.option("--pid-file", type=click.Path(path_type=Path))
@click.option("--console-socket", type=click.Path(path_type=Path))
@click.option("--tty", "-t", is_flag=True)
@click.option("--cwd", help="Working directory [default: the container's].")
@click.option("--env", "-e", "env_flags", multiple=True, metavar="K=V", help="Environment (replaces the container's).")
@click.option("--user", "-u", metavar="UID[:GID]", help="User [default: the container's].")
@click.option("--preserve-fds", type=int, default=0, hidden=True)
@click.argument("container_id")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_oci
def exec(c: _OciCtx, process: Path | None, detach: bool, pid_file: Path | None, console_socket: Path | None,
         tty: bool, cwd: str | None, env_flags: tuple[str, ...], user: str | None, preserve_fds: int, container_id: str,
         command: tuple[str, ...]) -> None:
    """Run another process in a running container's VM."""
    args, terminal = list(command), tty
    env: tuple[str, ...] | None = tuple(env_flags) or None
    uid, gid = _user(user) if user else (None, None)
    if process is not None:
        try:
            spec: dict[str, Any] = jsondoc.load(process)
            args = [str(a) for a in spec.get("args") or []]
            terminal = terminal or bool(spec.get("terminal"))
            env = tuple(str(e) for e in spec["env"]) if isinstance(spec.get("env"), list) else env
            cwd = str(spec["cwd"]) if spec.get("cwd") else cwd
            user_spec = spec.get("user") or {}
            uid, gid = int(user_spec.get("uid", uid or 0)), int(user_spec.get("gid", gid or 0))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise click.BadParameter(f"cannot read {process}: {exc}") from exc
    if terminal != (console_socket is not None):
        raise click.UsageError("a terminal (--tty or process.terminal) needs --console-socket, and the reverse")
    overrides = EnterOptions(env=env, cwd=cwd, uid=uid, gid=gid)
    code = c.runtime().exec(container_id, args, detach=detach, pid_file=pid_file, console_socket=console_socket,
                            process=overrides)
    sys.exit(code)


def _user(text: str) -> tuple[int, int]:
    uid, _, gid = text.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise click.BadParameter(f"--user {text!r}: expected UID[:GID] (numbers)")
    return int(uid), int(gid or 0)


@oci.command()
@click.option("--format", "-f", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.argument("container_id")
@click.argument("ps_args", nargs=-1)
@pass_oci
def ps(c: _OciCtx, fmt: str, container_id: str, ps_args: tuple[str, ...]) -> None:
    """Host pids of the container (its supervisor process)."""
    pids = c.runtime().ps(container_id)
    if fmt == "json":
        click.echo(json.dumps(pids))
    else:
        click.echo("PID")
        for pid in pids:
            click.echo(pid)


@oci.command("list")
@click.option("--format", "-f", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--quiet", "-q", is_flag=True)
@pass_oci
def list_(c: _OciCtx, fmt: str, quiet: bool) -> None:
    """List containers."""
    states = c.runtime().containers()
    if fmt == "json":
        click.echo(json.dumps(states))
        return
    if not quiet:
        click.echo(f"{'ID':<24}{'PID':<10}{'STATUS':<10}{'BUNDLE':<40}CREATED")
    for s in states:
        click.echo(s["id"] if quiet else f"{s['id']:<24}{s['pid']:<10}{s['status']:<10}{s['bundle']:<40}{s['created']}")


@oci.command("features")
def features_() -> None:
    """What this runtime supports (runtime-spec features JSON)."""
    click.echo(json.dumps(features(), indent=2))


def main() -> None:
    """Console entry point (``kvmrkt-oci``): errors -> stderr, the --log file, exit 1."""
    try:
        _main()
    finally:
        skip_final_collection()


def _main() -> None:
    try:
        oci.main(standalone_mode=False, prog_name="kvmrkt-oci")
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        _log_error(exc.format_message())
        sys.exit(1)
    except click.exceptions.Abort:
        sys.exit(130)
    except KvmrktError as exc:
        if "--debug" in sys.argv[1:]:
            raise
        _log_error(exc.diagnostics())
        click.echo(f"kvmrkt-oci: {exc.diagnostics()}", err=True)
        sys.exit(1)
    sys.exit(0)


def _log_error(msg: str) -> None:
    """Also write an error to the --log file (once the global options were parsed; click's context is gone
    by the time main() catches the error)."""
    if "ctx" in _ACTIVE:
        _ACTIVE["ctx"].say("error", msg)


if __name__ == "__main__":
    main()
