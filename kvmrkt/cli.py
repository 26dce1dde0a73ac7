"""The ``kvmrkt`` command line (stage0's face): parse flags, call the engine, print results.

Role: thin by design. Every command builds arguments, calls one ``Engine`` method and prints; all
``KvmrktError`` failures are caught in ``main`` and become a message on stderr and a stable exit code.
Trust boundary: operator input; nothing here touches images, pods or processes directly.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from kvmrkt import __version__
from kvmrkt.config import DEFAULT_CONFIG_DIR, RuntimeConfig, load_config
from kvmrkt.engine import Engine, PodOptions
from kvmrkt.errors import KvmrktError
from kvmrkt.runargs import APP_FLAGS_HELP, parse_apps, parse_env, parse_volume
from kvmrkt.store import ImageRecord, no_progress

FORMATS = click.Choice(["text", "json"])


class _Ctx:
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


pass_ctx = click.make_pass_decorator(_Ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dir", "data_dir", type=click.Path(path_type=Path), help="Data directory [default: /var/lib/kvmrkt].")
@click.option("--config-dir", type=click.Path(path_type=Path), default=DEFAULT_CONFIG_DIR, show_default=True,
              help="Directory holding config.toml (and, later, policy files).")
@click.option("--debug", is_flag=True, help="Show the guest console and tracebacks.")
@click.option("--insecure-options", default="", metavar="LIST",
              help="Comma list of checks to disable: image, tls, http, pubkey, ondisk, capabilities, paths, "
                   "seccomp, tpm, selinux, all-fetch, all-run, all. Each use is recorded.")
@click.version_option(__version__, "--version", prog_name="kvmrkt")
@click.pass_context
def cli(ctx: click.Context, data_dir: Path | None, config_dir: Path, debug: bool, insecure_options: str) -> None:
    """kvmrkt runs every pod in its own virtual machine (rkt's CLI, QEMU microVMs)."""
    ctx.obj = _Ctx(config_dir, data_dir, debug, insecure_options)


def _pod_options(volume: tuple[str, ...], hostname: str | None, set_env: tuple[str, ...], stage1: str | None,
                 pod_manifest: Path | None, pull_policy: str) -> PodOptions:
    return PodOptions(volumes=[parse_volume(v) for v in volume], hostname=hostname,
                      env=[parse_env(e) for e in set_env], stage1=stage1, pod_manifest=pod_manifest,
                      pull_policy=pull_policy)


PULL_POLICY = click.option(
    "--pull-policy", type=click.Choice(["new", "update", "never"]), default="new", show_default=True,
    help="Registry images: new = fetch only when not in the store, update = always check the registry, "
         "never = store only.",
)


def _pod_flags(f: Any) -> Any:
    for opt in reversed([
        click.option("--volume", multiple=True, metavar="NAME,kind=host|empty,source=PATH,readOnly=BOOL",
                     help="Define a pod volume (host volumes are shared into the VM over 9p)."),
        click.option("--hostname", help="Pod hostname [default: kvmrkt-<uuid prefix>]."),
        click.option("--set-env", multiple=True, metavar="K=V", help="Environment variable for every app."),
        click.option("--stage1", type=click.Choice(["qemu"]), help="VM backend [default: from config, qemu]."),
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
kvmrkt's own failures use 2 (usage/config), 3 (image), 7 (pod state) and 8 (VM) and are explained on stderr.
"""


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
             epilog=_RUN_EPILOG)
@_pod_flags
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), help="Accelerator [default: auto].")
@click.option("--interactive", is_flag=True, help="Connect stdin to the app (one-app pods only).")
@click.argument("images_and_flags", nargs=-1, type=click.UNPROCESSED, metavar="IMAGE [APP FLAGS] [-- ARGS ---] ...")
@pass_ctx
def run(c: _Ctx, images_and_flags: tuple[str, ...], volume: tuple[str, ...], hostname: str | None,
        set_env: tuple[str, ...], stage1: str | None, pod_manifest: Path | None, uuid_file_save: Path | None,
        pull_policy: str, accel: str | None, interactive: bool) -> None:
    """Run a pod: each IMAGE becomes one app, all in one new VM.

    IMAGE is an image in the store (name[:tag] or ID prefix), or a source fetched or imported on the way:
    docker://HOST[:PORT]/REPO[:TAG|@DIGEST], oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:TAG],
    FILE.aci.
    """
    apps = parse_apps(list(images_and_flags)) if not pod_manifest else []
    opts = _pod_options(volume, hostname, set_env, stage1, pod_manifest, pull_policy)
    engine = c.engine(accel=accel, backend=stage1)

    def saved(pod: Any) -> None:
        if uuid_file_save:
            uuid_file_save.write_text(pod.uuid + "\n")

    code = engine.run(apps, opts, interactive=interactive, stdout=sys.stdout.buffer, stderr=sys.stderr.buffer,
                      progress=_progress, on_prepared=saved)
    sys.exit(code)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
             epilog="\b\n" + APP_FLAGS_HELP)
@_pod_flags
@click.option("--quiet", is_flag=True, help="Print only the UUID.")
@click.argument("images_and_flags", nargs=-1, type=click.UNPROCESSED, metavar="IMAGE [APP FLAGS] [-- ARGS ---] ...")
@pass_ctx
def prepare(c: _Ctx, images_and_flags: tuple[str, ...], volume: tuple[str, ...], hostname: str | None,
            set_env: tuple[str, ...], stage1: str | None, pod_manifest: Path | None, uuid_file_save: Path | None,
            pull_policy: str, quiet: bool) -> None:
    """Prepare a pod (resolve images, write the pod) without running it; prints its UUID."""
    apps = parse_apps(list(images_and_flags)) if not pod_manifest else []
    opts = _pod_options(volume, hostname, set_env, stage1, pod_manifest, pull_policy)
    pod = c.engine(backend=stage1).prepare(apps, opts, progress=no_progress if quiet else _progress)
    if uuid_file_save:
        uuid_file_save.write_text(pod.uuid + "\n")
    click.echo(pod.uuid if quiet else f"prepared pod {pod.uuid}")


@cli.command("run-prepared")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), help="Accelerator [default: auto].")
@click.option("--interactive", is_flag=True, help="Connect stdin to the app (one-app pods only).")
@click.argument("uuid")
@pass_ctx
def run_prepared(c: _Ctx, uuid: str, accel: str | None, interactive: bool) -> None:
    """Run a pod made by `kvmrkt prepare`."""
    engine = c.engine(accel=accel)
    sys.exit(engine.run_prepared(engine.find(uuid), interactive=interactive, stdout=sys.stdout.buffer,
                                 stderr=sys.stderr.buffer))


@cli.command("list")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.option("--no-legend", is_flag=True, help="Omit the header line.")
@pass_ctx
def list_(c: _Ctx, fmt: str, no_legend: bool) -> None:
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
def status(c: _Ctx, uuid: str, wait: float | None, fmt: str) -> None:
    """Show a pod's state, VM facts and per-app exit codes."""
    info = c.engine().status(uuid, wait=wait)
    if fmt == "json":
        _dump(info)
        return
    for key in ("uuid", "state", "backend", "accel", "pid", "memory_mib", "vcpus"):
        click.echo(f"{key}={info.get(key) if info.get(key) is not None else ''}")
    for key in ("created", "started", "finished"):
        click.echo(f"{key}={_when(info.get(key))}")
    for app in info["apps"]:
        click.echo(f"app-{app['name']}={'' if app['exit_code'] is None else app['exit_code']}")


@cli.command()
@click.option("--force", is_flag=True, help="Kill the VM instead of asking the apps to stop.")
@click.argument("uuids", nargs=-1, required=True)
@pass_ctx
def stop(c: _Ctx, uuids: tuple[str, ...], force: bool) -> None:
    """Stop running pods: SIGTERM to every app, SIGKILL after stage1.stop_timeout, or --force."""
    engine = c.engine()
    for uuid in uuids:
        click.echo(f"{engine.find(uuid).uuid} {engine.stop(uuid, force=force)}")


@cli.command()
@click.argument("uuids", nargs=-1, required=True)
@pass_ctx
def rm(c: _Ctx, uuids: tuple[str, ...]) -> None:
    """Remove pods that are not running."""
    engine = c.engine()
    for uuid in uuids:
        full = engine.find(uuid).uuid
        engine.remove(uuid)
        click.echo(f"removed {full}")


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError as exc:
        raise click.BadParameter(f"{text!r}: expected a duration like 0s, 30m, 24h") from exc


@cli.command()
@click.option("--grace-period", default="30m", show_default=True, help="Delete exited pods marked this long ago.")
@click.option("--expire-prepared", default="24h", show_default=True, help="Collect prepared pods this old.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@pass_ctx
def gc(c: _Ctx, grace_period: str, expire_prepared: str, fmt: str) -> None:
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
@click.argument("uuid")
@click.argument("cmd", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def enter(c: _Ctx, uuid: str, app: str | None, cmd: tuple[str, ...]) -> None:
    """Run CMD (default /bin/sh) in an app of a running pod, through the guest agent; exits with its code."""
    sys.exit(c.engine().enter(uuid, app, list(cmd), stdout=sys.stdout.buffer, stderr=sys.stderr.buffer))


@cli.command("cat-manifest")
@click.argument("uuid")
@pass_ctx
def cat_manifest(c: _Ctx, uuid: str) -> None:
    """Print a pod's manifest (JSON)."""
    _dump(c.engine().cat_manifest(uuid))


@cli.command()
@pass_ctx
def version(c: _Ctx) -> None:
    """Print versions and what this host can do."""
    from stage1_kvm.qemu import describe_accel

    accel = describe_accel()
    click.echo(f"kvmrkt version {__version__}")
    click.echo("stage1 backends: qemu")
    why = f" ({accel['kvm_unusable_because']})" if accel["auto"] != "kvm" else ""
    click.echo(f"accel auto: {accel['auto']}{why}")


@cli.command()
@click.option("--stage1", help="Show the config as if --stage1 were given.")
@pass_ctx
def config(c: _Ctx, stage1: str | None) -> None:
    """Print the merged configuration (config.toml plus flags) as JSON."""
    _dump(c.config(backend=stage1).to_dict())


@cli.command()
@PULL_POLICY
@click.option("--name", help="Store the image under this name [default: from the reference].")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.argument("refs", nargs=-1, required=True)
@pass_ctx
def fetch(c: _Ctx, refs: tuple[str, ...], pull_policy: str, name: str | None, fmt: str) -> None:
    """Fetch images into the store and print their IDs.

    REF is docker://HOST[:PORT]/REPO[:TAG|@DIGEST] (also oci://...), or a local source (oci:DIR[:TAG],
    oci-archive:FILE, docker-archive:FILE, FILE.aci). Registry credentials come from CONFIG_DIR/auth.d/*.json,
    a registry's CA from CONFIG_DIR/certs.d/HOST[:PORT]/ca.crt; --insecure-options=http,tls allow plain HTTP
    and unverified TLS for local registries.
    """
    engine = c.engine()
    records = [engine.fetch(ref, name=name, pull_policy=pull_policy if pull_policy != "new" else "update",
                            progress=_progress) for ref in refs]
    _print_records(records, fmt)


def _print_records(records: list[ImageRecord], fmt: str) -> None:
    if fmt == "json":
        _dump([r.to_dict() for r in records])
    for r in records if fmt != "json" else []:
        click.echo(f"{r.id} {r.name}")


@cli.group()
def image() -> None:
    """Manage images in the store."""


@image.command("import")
@click.option("--name", help="Store the image under this name [default: from the source].")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.argument("ref", metavar="SOURCE")
@pass_ctx
def image_import(c: _Ctx, ref: str, name: str | None, fmt: str) -> None:
    """Import an image: oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:TAG] (docker save),
    FILE.aci (appc, with FILE.aci.asc kept), or docker://... (same as fetch)."""
    _print_records([c.engine().import_image(ref, name=name, progress=_progress)], fmt)


@image.command("list")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.option("--no-legend", is_flag=True)
@pass_ctx
def image_list(c: _Ctx, fmt: str, no_legend: bool) -> None:
    """List images."""
    images = c.engine().images()
    if fmt == "json":
        _dump([{**r.to_dict(), "names": names} for r, names in images])
        return
    if not no_legend:
        click.echo(f"{'ID':<20}{'NAME':<44}{'KIND':<5}{'ROOTFS':>10}  IMPORTED")
    for r, names in images:
        for name in names or ["<none>"]:
            click.echo(f"{r.id[:19]:<20}{name:<44}{r.kind:<5}{r.rootfs_size // 1024:>8}Ki  {_when(r.imported)}")


@image.command("rm")
@click.argument("refs", nargs=-1, required=True)
@pass_ctx
def image_rm(c: _Ctx, refs: tuple[str, ...]) -> None:
    """Remove images (refused while a pod that is not garbage uses them)."""
    engine = c.engine()
    for ref in refs:
        record = engine.remove_image(ref)
        click.echo(f"removed {record.id} {record.name}")


@image.command("gc")
@click.option("--grace-period", default="24h", show_default=True, help="Remove images unused for this long.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@pass_ctx
def image_gc(c: _Ctx, grace_period: str, fmt: str) -> None:
    """Remove images no pod has used for the grace period, and files no image needs."""
    result = c.engine().image_gc(grace_period=_duration(grace_period))
    if fmt == "json":
        _dump(result)
        return
    for line in result["images"]:
        click.echo(f"removed {line}")
    click.echo(f"removed {len(result['files'])} unreferenced file(s)")


@image.command("inspect")
@click.argument("ref")
@pass_ctx
def image_inspect(c: _Ctx, ref: str) -> None:
    """Print everything the store knows about an image (JSON)."""
    _dump(c.engine().image(ref).to_dict())


@image.command("cat-manifest")
@click.argument("ref")
@pass_ctx
def image_cat_manifest(c: _Ctx, ref: str) -> None:
    """Print the image's own manifest (OCI manifest, or appc image manifest)."""
    _dump(c.engine().image_manifest(ref))


@image.command("verify")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.argument("refs", nargs=-1, required=True)
@pass_ctx
def image_verify(c: _Ctx, refs: tuple[str, ...], fmt: str) -> None:
    """Re-hash every blob of the images and check their guest rootfs (rebuilt when damaged)."""
    engine = c.engine()
    results = [engine.verify_image(ref) for ref in refs]
    if fmt == "json":
        _dump(results)
        return
    for r in results:
        click.echo(f"{r['id']} {r['name']}: {len(r['blobs'])} blob(s) and the rootfs verified")


@image.command("extract")
@click.option("--rootfs-only", is_flag=True, help="Only the root filesystem, directly in DIR.")
@click.argument("ref")
@click.argument("dest", type=click.Path(path_type=Path))
@pass_ctx
def image_extract(c: _Ctx, ref: str, dest: Path, rootfs_only: bool) -> None:
    """Unpack an image, with its dependencies (what a pod sees), into a new directory DIR (DIR/manifest and
    DIR/rootfs, or the root filesystem only)."""
    click.echo(c.engine().extract_image(ref, dest, rootfs_only=rootfs_only, progress=_progress))


image.add_command(image_extract, name="render")  # appc dependencies are always applied: both are the same


@image.command("export")
@click.option("--overwrite", is_flag=True)
@click.argument("ref")
@click.argument("out", type=click.Path(path_type=Path))
@pass_ctx
def image_export(c: _Ctx, ref: str, out: Path, overwrite: bool) -> None:
    """Write an image to a file: an ACI for appc images, an oci-archive for OCI images."""
    click.echo(c.engine().export_image(ref, out, overwrite=overwrite))


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--prefix", help="Trust the key for images whose name starts with PREFIX (path segments).")
@click.option("--root", is_flag=True, help="Trust the key for every image (the policy default).")
@click.argument("args", nargs=-1, metavar="KEY.asc... | list | rm FINGERPRINT...")
@pass_ctx
def trust(c: _Ctx, args: tuple[str, ...], prefix: str | None, root: bool) -> None:
    """Trust GPG keys for image name prefixes (rkt's trust store), written as policy drop-ins.

    \b
      kvmrkt trust --prefix example.com/app KEY.asc
      kvmrkt trust --root KEY.asc
      kvmrkt trust list
      kvmrkt trust rm FINGERPRINT
    """
    from policy import truststore

    config_dir = c.config_dir
    if args[:1] == ("list",):
        for entry in truststore.trusted(config_dir):
            click.echo(f"{entry['fingerprint']}  {entry['scope']}  {entry['file']}")
        return
    if args[:1] == ("rm",):
        for fpr in args[1:]:
            click.echo(f"removed {fpr} from: {', '.join(truststore.untrust(config_dir, fpr))}")
        return
    if not args:
        raise click.UsageError("give KEY.asc files, `list` or `rm FINGERPRINT`")
    for key in args:
        fpr, path = truststore.trust(config_dir, Path(key), prefix=prefix, root=root)
        click.echo(f"trusting key {fpr} for {'every image' if root else prefix!r} ({path})")


@cli.group()
def policy() -> None:
    """Inspect the image trust policy (CONFIG_DIR/policy.json and policy.d/*.json)."""


@policy.command("check")
@click.argument("path", required=False, type=click.Path(path_type=Path, exists=True))
@pass_ctx
def policy_check(c: _Ctx, path: Path | None) -> None:
    """Lint the policy files in PATH (a config directory, or a policy.json in one) and load every key."""
    from policy.model import load_policy
    from policy.signatures import check_keys

    config_dir = (path.parent if path.is_file() else path) if path else c.config_dir
    pol = load_policy(config_dir)
    if pol is None:
        click.echo(f"{config_dir}: no policy.json: every image is rejected")
        sys.exit(4)
    check_keys(pol)
    click.echo(f"ok: {len(pol.files)} file(s), {len(pol.transports)} scope(s), policy digest {pol.digest}")


@policy.command("explain")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.argument("image")
@pass_ctx
def policy_explain(c: _Ctx, image: str, fmt: str) -> None:
    """Show which scope and keys apply to a stored image, and the verdict."""
    info = c.engine().explain(image)
    if fmt == "json":
        _dump(info)
        return
    click.echo(f"image: {info['image']} ({info['transport']}, identity {info['identity']})")
    click.echo(f"signed digest: {info['signed_digest']}; signatures stored: {len(info['signatures'])}")
    click.echo(f"scope: {info['scope']}")
    for r in info["requirements"]:
        pins = f" pinned to {', '.join(r['keyFingerprints'])}" if r["keyFingerprints"] else ""
        click.echo(f"  requires {r['type']}{pins} ({r['where']})")
    verdict = info["verdict"]
    click.echo("verdict: accepted" if verdict["accepted"] else f"verdict: rejected ({verdict['reason']}): "
               f"{verdict['message']}")


@cli.group()
def attest() -> None:
    """Measured launch evidence (the TPM event log)."""


@attest.command("init")
@click.option("--out-dir", type=click.Path(path_type=Path), default=Path("."), show_default=True)
@pass_ctx
def attest_init(c: _Ctx, out_dir: Path) -> None:
    """Derive the attestation key (restricted ECDSA P-256 signing key in the endorsement hierarchy; the same
    key every time on this TPM) and write ak.pem and ek.pem for enrolment by the security team."""
    ak, ek = c.engine().attest_init(out_dir)
    click.echo(f"wrote {ak} and {ek}")


@attest.command("quote")
@click.option("--nonce", required=True, help="The verifier's challenge, hex (16-64 bytes).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Evidence file (JSON).")
@click.option("--tpm2-tools-dir", type=click.Path(path_type=Path),
              help="Also write quote.msg, quote.sig, quote.pcrs and ak.pem for tpm2_checkquote "
                   "(-l sha256:PCR -g sha256 -q NONCE).")
@pass_ctx
def attest_quote(c: _Ctx, nonce: str, output: Path, tpm2_tools_dir: Path | None) -> None:
    """Quote the measurement PCR with the AK and write the evidence (quote, PCR value, event log, AK, boot id)."""
    evidence = c.engine().attest_quote(nonce, tpm2_tools_dir)
    output.write_text(json.dumps(evidence, indent=2) + "\n")
    click.echo(f"wrote {output}")


@attest.command("verify")
@click.option("--ak-pub", type=click.Path(path_type=Path, exists=True), required=True, help="The enrolled AK.")
@click.option("--nonce", required=True, help="The nonce the quote must be over (hex).")
@click.option("--reference", type=click.Path(path_type=Path, exists=True), help="Reference policy (JSON).")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.argument("evidence", type=click.Path(path_type=Path, exists=True))
@pass_ctx
def attest_verify(c: _Ctx, evidence: Path, ak_pub: Path, nonce: str, reference: Path | None, fmt: str) -> None:
    """Verify evidence offline: signature, quote, nonce, PCR digest, log replay, then the reference policy.

    \b
    Reference policy (all keys optional):
      {"images": [{"digest": "sha256:..."}, {"name": "example.com/app:1", "signer": "FPR"}],
       "stage1": {"kernel": ["sha256:..."], "initrd": ["sha256:..."]},
       "allow_insecure": []}
    """
    from kvmrkt.errors import AttestationError
    from measure import attest as attestation

    try:
        report = attestation.verify(_load_json_file(evidence), ak_pem=ak_pub.read_bytes(), nonce=_hex(nonce),
                                    reference=_load_json_file(reference) if reference else None)
    except AttestationError as exc:
        if fmt == "json":
            _dump({"ok": False, "failed_check": exc.check, "message": exc.message, "report": exc.report})
        elif exc.report:
            _print_launches(exc.report)
        raise
    if fmt == "json":
        _dump(report)
        return
    click.echo(f"evidence verified: boot {report['boot_id']}, PCR {report['pcr']}, "
               f"{report['attested_events']} attested event(s), {report['unattested_events']} not yet in the quote")
    _print_launches(report)


def _print_launches(report: dict[str, Any]) -> None:
    click.echo(f"{'TIME':<20}{'POD':<38}{'VERDICT':<10}APPS / IMAGES")
    for x in report["launches"]:
        when = _when(x["time"]) if x["time"] else "-"
        images = ", ".join(f"{a}={i[:19]}" for a, i in zip(x["apps"], x["images"], strict=False))
        click.echo(f"{when:<20}{x['pod']:<38}{x['verdict']:<10}{images}")
        for p in x["problems"]:
            click.echo(f"{'':<20}  - {p}")


def _hex(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise click.BadParameter(f"{text[:20]!r} is not hex") from exc


def _load_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"{path}: {exc}") from exc


@attest.command("log")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.argument("log_file", required=False, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@pass_ctx
def attest_log(c: _Ctx, log_file: Path | None, fmt: str) -> None:
    """Check and print an event log (default: this boot's), and compare its replay with the TPM's PCR."""
    info = c.engine().event_log(log_file)
    if fmt == "json":
        _dump(info)
        return
    click.echo(f"log {info['path']} (boot {info['boot_id']}), PCR {info['pcr']}, initial {info['initial'][:16]}...")
    for ev in info["events"]:
        click.echo(f"{ev['recnum']:>6}  {ev['digest'][:16]}  {ev['event'][:150]}")
    click.echo(f"replayed PCR {info['pcr']}: {info['replayed']}")
    if info.get("tpm") is not None:
        click.echo(f"TPM      PCR {info['pcr']}: {info['tpm']} ({'matches' if info['matches'] else 'DOES NOT MATCH'})")
    if info.get("matches") is False:
        sys.exit(5)


@cli.group()
def stage1() -> None:
    """Manage the guest assets (kernel, initramfs)."""


@stage1.command("build")
@click.option("--kernel", type=click.Choice(["minimal", "debian-cloud"]), default=None,
              help="minimal: built from linux-source-6.1 (default); debian-cloud: Debian's packaged cloud kernel.")
@click.option("--force", is_flag=True, help="Rebuild even when the cache is up to date.")
@pass_ctx
def stage1_build(c: _Ctx, kernel: str | None, force: bool) -> None:
    """Build (or reuse) the guest kernel and initramfs, and record their digests."""
    from stage1_kvm.assets import build_assets

    cfg = c.config().stage1
    assets = build_assets(cfg, kernel or cfg.kernel, force=force, progress=_progress)
    click.echo(f"kernel {assets.kernel} {assets.kernel_digest}")
    click.echo(f"initrd {assets.initrd} {assets.initrd_digest}")


def main() -> None:
    """Console entry point: run the CLI; KvmrktError becomes a message and its exit code."""
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
    sys.exit(0)
