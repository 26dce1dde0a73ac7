"""``kvmrkt stage1 template build|list|rm``: the VM templates pods are restored from (``stage1_kvm.template``)."""

from __future__ import annotations

import contextlib
import time

import click

from kvmrkt.cli._base import FORMATS, CliContext, _dump, _progress, pass_ctx
from kvmrkt.cli.attest import stage1


@stage1.group("template")
def template() -> None:
    """VM templates: pods of a shape that has one start by restoring a snapshot of a booted VM, not by booting.

    A shape is everything the guest's state depends on (QEMU, accelerator, memory, vCPUs, kernel, initramfs,
    kernel command line, the devices). A pod whose shape has no template boots cold and its shape is recorded;
    `build` then builds templates for the shapes recorded. `[stage1] templates = false` turns restoring off."""


@template.command("build")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@pass_ctx
def template_build(c: CliContext, fmt: str) -> None:
    """Build a template for every shape a pod booted cold with (since the last build), replacing older ones.
    Shapes recorded for another kernel, initramfs or QEMU than the current ones are skipped, with a warning."""
    from kvmrkt.errors import TemplateError
    from stage1_kvm import template as tm
    from stage1_kvm.assets import load_assets
    from stage1_kvm.qemu import find_qemu

    config = c.config()
    cfg = config.stage1
    assets, qemu = load_assets(cfg), find_qemu(config)
    assets.verify()
    built, skipped = [], 0
    for shape in tm.wanted(cfg):
        if not tm.current(shape, assets, qemu):
            skipped += 1
            continue
        start = time.monotonic()
        tmpl = tm.build(cfg, assets, shape, qemu=qemu, progress=_progress)
        built.append({**tmpl.describe(), "build_seconds": round(time.monotonic() - start, 3)})
    if fmt == "json":
        _dump({"built": built, "skipped": skipped})
        return
    for t in built:
        click.echo(f"built {t['key']}  {t['memory_mib']} MiB  {t['vcpus']} vCPU  {t['disks']} disk(s)  "
                   f"{t['nics']} NIC(s)  {t['size'] / 2**20:.1f} MiB state  {t['build_seconds']:.1f}s")
    if not built and not skipped:
        have = 0
        with contextlib.suppress(TemplateError):  # (`template list` names a template that is not root's own)
            have = len(tm.listing(cfg))
        click.echo(f"nothing to build: no pod booted cold since the last build ({have} template(s) here, "
                   "`kvmrkt stage1 template list`)" if have else
                   "no shape is waiting for a template: run a pod first (each cold-booted shape is recorded)")
    if skipped:
        click.echo(f"warning: {skipped} recorded shape(s) are for other guest assets or another QEMU: skipped",
                   err=True)


@template.command("list")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@pass_ctx
def template_list(c: CliContext, fmt: str) -> None:
    """The templates built here, and how many recorded shapes wait for one."""
    from stage1_kvm import template as tm

    cfg = c.config().stage1
    rows = [t.describe() for t in tm.listing(cfg)]
    if fmt == "json":
        _dump({"templates": rows, "wanted": len(tm.wanted(cfg))})
        return
    click.echo(f"{'KEY':32}  {'MEMORY':>7}  VCPUS  DISKS  NICS  {'STATE':>9}  DIGEST")
    for t in rows:
        click.echo(f"{t['key']:32}  {t['memory_mib']:>4} MiB  {t['vcpus']:>5}  {t['disks']:>5}  {t['nics']:>4}  "
                   f"{t['size'] / 2**20:>5.1f} MiB  {t['digest'][:19]}")
    click.echo(f"{len(tm.wanted(cfg))} recorded shape(s) wait for a template (kvmrkt stage1 template build)")


@template.command("rm")
@click.argument("keys", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Remove every template and every recorded shape.")
@pass_ctx
def template_rm(c: CliContext, keys: tuple[str, ...], everything: bool) -> None:
    """Remove templates by key (pods of their shape boot cold again)."""
    from kvmrkt.errors import ConfigError
    from stage1_kvm import template as tm

    cfg = c.config().stage1
    if everything:
        tm.remove_all(cfg)
        return
    if not keys:
        raise ConfigError("name the templates to remove, or --all", hint="kvmrkt stage1 template list")
    missing = [k for k in dict.fromkeys(keys) if not tm.remove(cfg, k)]
    if missing:
        raise ConfigError(f"no template {', '.join(missing)}", hint="kvmrkt stage1 template list")
