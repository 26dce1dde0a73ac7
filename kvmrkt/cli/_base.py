"""The ``kvmrkt`` command line (stage0's face): shared pieces and the entry point.

Role: thin by design. Every command (one module per command group in this package) builds arguments, calls
into the library (mostly the ``Engine``; the OCI runtime, evidence and trust store for theirs) and prints; all
``KvmrktError`` failures are caught in ``main`` and become a message on stderr and a stable exit code. Trust
boundary: operator input; nothing here touches images, pods or processes directly.
"""

from __future__ import annotations

import errno
import gc
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import click

from kvmrkt import __version__
from kvmrkt.config import DEFAULT_CONFIG_DIR, RuntimeConfig, load_config
from kvmrkt.engine import Engine
from kvmrkt.errors import KvmrktError

FORMATS = click.Choice(["text", "json"])


class CliContext:
    """What every command gets (``pass_ctx``): the global flags, and the config and engine built from them."""

    def __init__(self, config_dir: Path, data_dir: Path | None, debug: bool, insecure: str) -> None:
        self.config_dir, self.data_dir, self.debug, self.insecure = config_dir, data_dir, debug, insecure

    def config(self, **overrides: Any) -> RuntimeConfig:
        return load_config(config_dir=self.config_dir, data_dir=self.data_dir, debug=self.debug,
                           insecure_options=self.insecure, overrides=overrides)

    def engine(self, **overrides: Any) -> Engine:
        return Engine(self.config(**overrides), warn=lambda m: click.secho(f"kvmrkt: {m}", err=True, fg="red"))


class _Progress:
    """Progress of long fetches and imports on stderr: a bar on a terminal, one line per step otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = ""
        self.drawn = 0.0

    def __call__(self, what: str, done: int, total: int | None) -> None:
        if not self.tty:
            if what != self.last:
                click.echo(f"kvmrkt: {what}", err=True)
            self.last = what
            return
        now = time.monotonic()
        if what == self.last and now - self.drawn < 0.1 and (total is None or done < total):
            return
        self.last, self.drawn = what, now
        if total:
            filled = int(30 * min(done, total) / total)
            line = f"{what} [{'#' * filled}{'.' * (30 - filled)}] {done >> 20}/{total >> 20} MiB"
        else:
            line = f"{what} {done >> 20} MiB" if done else what
        sys.stderr.write(f"\r\033[K{line}")
        if total is None and not done:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _progress(msg: str, done: int = 0, total: int | None = None) -> None:
    _PROGRESS(msg, done, total)


_PROGRESS = _Progress()


def _dump(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


pass_ctx = click.make_pass_decorator(CliContext)


class _Group(click.Group):
    """The command group, with command groups whose modules are imported only when one of their commands runs
    (or help lists them): ``kvmrkt oci`` pulls in the whole OCI runtime, which ``kvmrkt run`` does not need."""

    LAZY: ClassVar[dict[str, tuple[str, str]]] = {"oci": ("kvmrkt.cli.oci", "oci")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.LAZY})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.LAZY and cmd_name not in self.commands:
            module, attr = self.LAZY[cmd_name]
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dir", "data_dir", type=click.Path(path_type=Path), help="Data directory [default: /var/lib/kvmrkt].")
@click.option("--config-dir", type=click.Path(path_type=Path), default=DEFAULT_CONFIG_DIR, show_default=True,
              help="Directory holding config.toml (and, later, policy files).")
@click.option("--debug", is_flag=True, help="Show the guest console and tracebacks.")
@click.option("--insecure-options", default="", metavar="LIST",
              help="Comma list of checks to disable: image, tls, http, capabilities, paths, seccomp, tpm, "
                   "all-fetch, all-run, all. Each use is recorded.")
@click.version_option(__version__, "--version", prog_name="kvmrkt")
@click.pass_context
def cli(ctx: click.Context, data_dir: Path | None, config_dir: Path, debug: bool, insecure_options: str) -> None:
    """kvmrkt runs every pod in its own virtual machine (rkt's CLI, QEMU microVMs)."""
    ctx.obj = CliContext(config_dir, data_dir, debug, insecure_options)

def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError as exc:
        raise click.BadParameter(f"{text!r}: expected a duration like 0s, 30m, 24h") from exc



PULL_POLICY = click.option(
    "--pull-policy", type=click.Choice(["new", "update", "never"]), default="new", show_default=True,
    help="Registry images: new = fetch only when not in the store, update = always check the registry, "
         "never = store only.",
)




def skip_final_collection() -> None:
    """Called as a command ends: the interpreter then exits without its last garbage collections over every
    object the command made (80-130 ms of kvmrkt run's host time on a 2-core host, measured by
    bench/launch_profile.py). Nothing of kvmrkt's needs them: files, locks and sockets are closed by their own
    blocks, and atexit handlers still run."""
    gc.freeze()


def main() -> None:
    """Console entry point: run the CLI; KvmrktError becomes a message and its exit code."""
    try:
        _main()
    finally:
        skip_final_collection()


def _main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except KvmrktError as exc:
        if debug:
            raise
        click.echo(f"kvmrkt: error: {exc.diagnostics()}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # the host ran out of something, wherever a command was writing: no traceback
        if debug or exc.errno not in HOST_FAULTS:
            raise
        click.echo(f"kvmrkt: error: {exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
                   + "\n  hint: free space or fix the filesystem, then try again (kvmrkt gc and kvmrkt image gc remove "
                     "what is no longer needed, including what a failed command left)", err=True)
        sys.exit(1)
    sys.exit(0)


# A full, over-quota, read-only or failing filesystem: reported as such by every command.
HOST_FAULTS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})
