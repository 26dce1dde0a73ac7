"""``kvmrkt`` pod commands: run, prepare, run-prepared, list, status, stop, rm, gc, enter, cat-manifest,
version, config (rkt's names and semantics)."""

from __future__ import annotations

import sys
import termios
import tty as ttymod
from pathlib import Path
from typing import Any

import click

from kvmrkt import __version__
from kvmrkt.cli._base import FORMATS, PULL_POLICY, CliContext, _dump, _duration, _progress, _when, cli, pass_ctx
from kvmrkt.host.files import write_atomic
from kvmrkt.images.records import no_progress
from kvmrkt.net.netconf import NetOptions, parse_dns, parse_nets, parse_port
from kvmrkt.pods.prepare import PodOptions
from kvmrkt.pods.runargs import APP_FLAGS_HELP, parse_apps, parse_env, parse_volume
from kvmrkt.stage1 import BACKEND_NAMES


def _pod_options(volume: tuple[str, ...], hostname: str | None, set_env: tuple[str, ...], stage1: str | None,
                 pod_manifest: Path | None, pull_policy: str) -> PodOptions:
    return PodOptions(volumes=[parse_volume(v) for v in volume], hostname=hostname,
                      env=[parse_env(e) for e in set_env], stage1=stage1, pod_manifest=pod_manifest,
                      pull_policy=pull_policy)



def _net_flags(f: Any) -> Any:
    for opt in reversed([
        click.option("--net", multiple=True, metavar="NAME[:CNI_ARGS][,NAME...]",
                     help="Networks to join: 'default' (172.16.28.0/24 with masquerading), any CNI network in "
                          "CONFIG_DIR/net.d, 'none' (loopback only) or 'user' (QEMU user-mode NAT: no bridge, "
                          "slower) [default: network.default in config, 'default']."),
        click.option("--port", multiple=True, metavar="NAME|PODPORT[/PROTO]:[HOSTIP:]HOSTPORT",
                     help="Forward a host port to a port the image names, or to a pod port number."),
        click.option("--dns", multiple=True, metavar="IP|host|none",
                     help="Name servers for /etc/resolv.conf; 'host' copies the host's file; 'none' ignores "
                          "what CNI returns [default: CNI's answer, else the image's own file]."),
        click.option("--dns-search", multiple=True, metavar="DOMAIN", help="DNS search domain."),
        click.option("--dns-opt", multiple=True, metavar="OPT", help="resolv.conf option (e.g. ndots:2)."),
        click.option("--dns-domain", metavar="DOMAIN", help="resolv.conf local domain."),
        click.option("--hosts-entry", multiple=True, metavar="IP=HOSTNAME|host",
                     help="Add an /etc/hosts entry; 'host' starts from the host's /etc/hosts."),
    ]):
        f = opt(f)
    return f


def _net_options(kw: dict[str, Any]) -> NetOptions:
    """Consume the network flags of ``_net_flags`` from a command's keyword arguments."""
    dns = parse_dns(dns=kw.pop("dns"), search=kw.pop("dns_search"), opts=kw.pop("dns_opt"),
                    domain=kw.pop("dns_domain"), hosts=kw.pop("hosts_entry"))
    return NetOptions(nets=parse_nets(kw.pop("net")), ports=tuple(parse_port(p) for p in kw.pop("port")), dns=dns)


SELINUX = click.option(
    "--selinux", type=click.Choice(["auto", "required"]), default=None,
    help="auto: apply the pod's sVirt label where SELinux is enabled (always allocated and recorded); required: "
         "refuse to run when it cannot be applied [default: selinux.mode in config, auto].",
)


def _pod_flags(f: Any) -> Any:
    for opt in reversed([
        click.option("--volume", multiple=True, metavar="NAME,kind=host|empty,source=PATH,readOnly=BOOL",
                     help="Define a pod volume (host volumes are shared into the VM over 9p)."),
        click.option("--hostname", help="Pod hostname [default: kvmrkt-<uuid prefix>]."),
        click.option("--set-env", multiple=True, metavar="K=V", help="Environment variable for every app."),
        click.option("--stage1", type=click.Choice(BACKEND_NAMES),
                     help="VM backend: qemu (QEMU started directly) or libvirt (a transient libvirt domain) "
                          "[default: stage1.backend in config, qemu]."),
        click.option("--pod-manifest", type=click.Path(path_type=Path, exists=True),
                     help="Run this pod manifest (cat-manifest format) instead of images and app flags."),
        click.option("--uuid-file-save", type=click.Path(path_type=Path), help="Write the pod UUID to this file."),
        PULL_POLICY,
    ]):
        f = opt(f)
    return f


_RUN_EPILOG = "\b\n" + APP_FLAGS_HELP + """
\b
Exit code: the app's exit code for a one-app pod; for several apps, the first non-zero exit code in app order.
kvmrkt's own failures use 2 (usage/config), 3 (image), 7 (pod state) and 8 (VM) and are explained on stderr;
10: the guest read image data that does not match what was measured (dm-verity), whatever the apps returned.
"""


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
             epilog=_RUN_EPILOG)
@_pod_flags
@_net_flags
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), help="Accelerator [default: auto].")
@click.option("--interactive", is_flag=True, help="Connect stdin to the app (one-app pods only).")
@SELINUX
@click.argument("images_and_flags", nargs=-1, type=click.UNPROCESSED, metavar="IMAGE [APP FLAGS] [-- ARGS ---] ...")
@pass_ctx
def run(c: CliContext, /, images_and_flags: tuple[str, ...], volume: tuple[str, ...], hostname: str | None,
        set_env: tuple[str, ...], stage1: str | None, pod_manifest: Path | None, uuid_file_save: Path | None,
        pull_policy: str, accel: str | None, interactive: bool, selinux: str | None, **net_flags: Any) -> None:
    """Run a pod: each IMAGE becomes one app, all in one new VM.

    IMAGE is an image in the store (name[:tag] or ID prefix), or a source fetched or imported on the way:
    docker://HOST[:PORT]/REPO[:TAG|@DIGEST], oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:TAG],
    FILE.aci.
    """
    net = _net_options(net_flags)
    apps = parse_apps(list(images_and_flags)) if not pod_manifest else []
    opts = _pod_options(volume, hostname, set_env, stage1, pod_manifest, pull_policy)
    engine = c.engine(accel=accel, backend=stage1, selinux_mode=selinux)

    def saved(pod: Any) -> None:
        if uuid_file_save:
            write_atomic(uuid_file_save, f"{pod.uuid}\n".encode(), mode=0o644)

    code = engine.run(apps, opts, interactive=interactive, stdout=sys.stdout.buffer, stderr=sys.stderr.buffer,
                      progress=_progress, on_prepared=saved, net=net)
    sys.exit(code)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
             epilog="\b\n" + APP_FLAGS_HELP)
@_pod_flags
@click.option("--quiet", is_flag=True, help="Print only the UUID.")
@click.argument("images_and_flags", nargs=-1, type=click.UNPROCESSED, metavar="IMAGE [APP FLAGS] [-- ARGS ---] ...")
@pass_ctx
def prepare(c: CliContext, images_and_flags: tuple[str, ...], volume: tuple[str, ...], hostname: str | None,
            set_env: tuple[str, ...], stage1: str | None, pod_manifest: Path | None, uuid_file_save: Path | None,
            pull_policy: str, quiet: bool) -> None:
    """Prepare a pod (resolve images, write the pod) without running it; prints its UUID."""
    apps = parse_apps(list(images_and_flags)) if not pod_manifest else []
    opts = _pod_options(volume, hostname, set_env, stage1, pod_manifest, pull_policy)
    pod = c.engine(backend=stage1).prepare(apps, opts, progress=no_progress if quiet else _progress)
    if uuid_file_save:
        write_atomic(uuid_file_save, f"{pod.uuid}\n".encode(), mode=0o644)
    click.echo(pod.uuid if quiet else f"prepared pod {pod.uuid}")


@cli.command("run-prepared")
@_net_flags
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), help="Accelerator [default: auto].")
@click.option("--interactive", is_flag=True, help="Connect stdin to the app (one-app pods only).")
@SELINUX
@click.argument("uuid")
@pass_ctx
def run_prepared(c: CliContext, /, uuid: str, accel: str | None, interactive: bool, selinux: str | None,
                 **net_flags: Any) -> None:
    """Run a pod made by `kvmrkt prepare`."""
    net = _net_options(net_flags)
    engine = c.engine(accel=accel, selinux_mode=selinux)
    sys.exit(engine.run_prepared(engine.find(uuid), interactive=interactive, stdout=sys.stdout.buffer,
                                 stderr=sys.stderr.buffer, net=net))


@cli.command("list")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.option("--no-legend", is_flag=True, help="Omit the header line.")
@pass_ctx
def list_(c: CliContext, fmt: str, no_legend: bool) -> None:
    """List pods."""
    pods = c.engine().list_pods()
    if fmt == "json":
        _dump(pods)
        return
    if not no_legend:
        click.echo(f"{'UUID':<38}{'STATE':<16}{'CREATED':<21}APPS")
    for p in pods:
        apps = ",".join(f"{a['name']}({a['image']})" for a in p["apps"])
        click.echo(f"{p['uuid']:<38}{p['state']:<16}{_when(p['created']):<21}{apps}")


@cli.command()
@click.option("--wait", "wait", type=float, default=None, is_flag=False, flag_value=0.0, metavar="[SECONDS]",
              help="Wait until the pod has exited (optionally at most SECONDS).")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.argument("uuid")
@pass_ctx
def status(c: CliContext, uuid: str, wait: float | None, fmt: str) -> None:
    """Show a pod's state, VM facts and per-app exit codes."""
    info = c.engine().status(uuid, wait=wait)
    if fmt == "json":
        _dump(info)
        return
    for key in ("uuid", "state", "backend", "accel", "pid", "memory_mib", "vcpus"):
        click.echo(f"{key}={info.get(key) if info.get(key) is not None else ''}")
    for key in ("created", "started", "finished"):
        click.echo(f"{key}={_when(info.get(key))}")
    sel = info.get("selinux") or {}
    click.echo(f"selinux={sel.get('process_label') or ''}"
               f"{' (not applied: SELinux disabled)' if sel.get('process_label_applied') is False else ''}")
    click.echo(f"measured={info.get('measured')}")
    net = info.get("network") or {}
    click.echo("networks=" + ",".join(f"{n['name']}:{n['interface']}:" + "+".join(n["ips"])
                                      for n in net.get("networks", [])))
    jail = info.get("jail") or {}
    if jail:
        limits, cg = jail.get("limits") or {}, jail.get("cgroup") or {}
        quota = limits.get("cpu_quota")
        where = f"{cg.get('path', '')}{' (removed)' if cg.get('removed') else ''}" if cg else "none"
        click.echo(f"jail=uid {jail.get('uid')} gid {jail.get('gid')}; cgroup {where}; limits: memory "
                   f"{limits.get('memory_limit_mib')} MiB, pids {limits.get('pids_max')}, "
                   f"cpu {'unlimited' if quota is None else quota}")
        click.echo(f"isolation={jail.get('isolation') or ''}")
    for app in info["apps"]:
        click.echo(f"app-{app['name']}={'' if app['exit_code'] is None else app['exit_code']}")
    failures = info.get("integrity_failures") or []
    click.echo("integrity=" + (f"FAILED ({len(failures)} reports, the first: {failures[0]})" if failures else "ok"))


@cli.command()
@click.option("--force", is_flag=True, help="Kill the VM instead of asking the apps to stop.")
@click.argument("uuids", nargs=-1, required=True)
@pass_ctx
def stop(c: CliContext, uuids: tuple[str, ...], force: bool) -> None:
    """Stop running pods: SIGTERM to every app, SIGKILL after stage1.stop_timeout, or --force."""
    engine = c.engine()
    for uuid in uuids:
        click.echo(f"{engine.find(uuid).uuid} {engine.stop(uuid, force=force)}")


@cli.command()
@click.argument("uuids", nargs=-1, required=True)
@pass_ctx
def rm(c: CliContext, uuids: tuple[str, ...]) -> None:
    """Remove pods that are not running."""
    engine = c.engine()
    for uuid in uuids:
        full = engine.find(uuid).uuid
        engine.remove(uuid)
        click.echo(f"removed {full}")



@cli.command()
@click.option("--grace-period", default="30m", show_default=True, help="Delete exited pods marked this long ago.")
@click.option("--expire-prepared", default="24h", show_default=True, help="Collect prepared pods this old.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@pass_ctx
def gc(c: CliContext, grace_period: str, expire_prepared: str, fmt: str) -> None:
    """Garbage-collect exited pods (mark, then delete after the grace period)."""
    result = c.engine().gc(grace_period=_duration(grace_period), expire_prepared=_duration(expire_prepared))
    if fmt == "json":
        _dump(result)
        return
    for uuid in result["marked"]:
        click.echo(f"marked {uuid}")
    for uuid in result["removed"]:
        click.echo(f"removed {uuid}")


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--app", help="App to enter (needed when the pod has several).")
@click.option("--interactive", "-i", is_flag=True, help="Copy stdin to the command (until EOF).")
@click.option("--tty", "-t", is_flag=True, help="Run it on a terminal in the guest connected to this one (implies -i).")
@click.argument("uuid")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def enter(c: CliContext, uuid: str, app: str | None, interactive: bool, tty: bool, cmd: tuple[str, ...]) -> None:
    """Run CMD (default /bin/sh) in an app of a running pod, through the guest agent; exits with its code.
    SIGINT and SIGTERM are passed on to it (with -t, Ctrl-C is typed into its terminal instead)."""
    engine = c.engine()
    if not tty:
        sys.exit(engine.enter(uuid, app, list(cmd), stdout=sys.stdout.buffer, stderr=sys.stderr.buffer,
                              stdin=sys.stdin.fileno() if interactive else None))
    if not sys.stdin.isatty():
        raise click.UsageError("--tty needs a terminal on stdin")
    saved = termios.tcgetattr(sys.stdin.fileno())
    try:
        ttymod.setraw(sys.stdin.fileno())
        code = engine.enter(uuid, app, list(cmd), stdout=sys.stdout.buffer, stderr=sys.stderr.buffer,
                            stdin=sys.stdin.fileno(), tty=True)
    finally:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
    sys.exit(code)


@cli.command("cat-manifest")
@click.argument("uuid")
@pass_ctx
def cat_manifest(c: CliContext, uuid: str) -> None:
    """Print a pod's manifest (JSON)."""
    _dump(c.engine().cat_manifest(uuid))


@cli.command()
@pass_ctx
def version(c: CliContext) -> None:
    """Print versions and what this host can do."""
    from kvmrkt.stage1 import BACKENDS
    from stage1_kvm.qemu import describe_accel

    accel = describe_accel()
    click.echo(f"kvmrkt version {__version__}")
    click.echo("stage1 backends: " + ", ".join(sorted(BACKENDS)))
    why = f" ({accel['kvm_unusable_because']})" if accel["auto"] != "kvm" else ""
    click.echo(f"accel auto: {accel['auto']}{why}")


@cli.command()
@click.option("--stage1", type=click.Choice(BACKEND_NAMES), help="Show the config as if --stage1 were given.")
@pass_ctx
def config(c: CliContext, stage1: str | None) -> None:
    """Print the merged configuration (config.toml plus flags) as JSON."""
    _dump(c.config(backend=stage1).to_dict())


