"""``kvmrkt trust`` (rkt's trust store, as policy drop-ins) and ``kvmrkt policy check|explain``."""

from __future__ import annotations

from pathlib import Path

import click

from kvmrkt.cli._base import FORMATS, CliContext, _dump, cli, pass_ctx
from kvmrkt.errors import PolicyLoadError


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--prefix", help="Trust the key for images whose name starts with PREFIX (path segments).")
@click.option("--root", is_flag=True, help="Trust the key for every image (the policy default).")
@click.argument("args", nargs=-1, metavar="KEY.asc... | list | rm FINGERPRINT...")
@pass_ctx
def trust(c: CliContext, args: tuple[str, ...], prefix: str | None, root: bool) -> None:
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
def policy_check(c: CliContext, path: Path | None) -> None:
    """Lint the policy files in PATH (a config directory, or a policy.json in one) and load every key.

    Drop-ins only add requirements (each scope is listed with the policy.json scope it must keep)."""
    from policy.model import DROPIN_RULE, load_policy
    from policy.signatures import check_keys

    config_dir = (path.parent if path.is_file() else path) if path else c.config_dir
    pol = load_policy(config_dir)
    if pol is None:
        raise PolicyLoadError(f"{config_dir}: no policy.json: every image is rejected",
                              hint="trust a key with `kvmrkt trust --prefix NAME KEY.asc` (writes policy.json)")
    check_keys(pol)
    click.echo(f"ok: {len(pol.files)} file(s), {len(pol.transports)} scope(s), policy digest {pol.digest}")
    click.echo(f"drop-in rule: {DROPIN_RULE}")
    for transport, scope, dropin, cover in pol.dropins:
        under = f"keeps every requirement of policy.json's {cover}" if cover else "under policy.json's default"
        click.echo(f"  {dropin.name}: transports.{transport}[{scope!r}] {under}")


@policy.command("explain")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.argument("image")
@pass_ctx
def policy_explain(c: CliContext, image: str, fmt: str) -> None:
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
    for dep in info["dependencies"]:
        v = dep["verdict"]
        click.echo(f"dependency {dep['identity']} ({dep['image'][:19]}): " + (
            "accepted" if v["accepted"] else f"rejected ({v['reason']}): {v['message']}"))


