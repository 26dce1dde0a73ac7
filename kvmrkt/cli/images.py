"""``kvmrkt fetch`` and ``kvmrkt image ...``."""

from __future__ import annotations

from pathlib import Path

import click

from kvmrkt.cli._base import FORMATS, PULL_POLICY, CliContext, _dump, _duration, _progress, _when, cli, pass_ctx
from kvmrkt.images.records import ImageRecord


@cli.command()
@PULL_POLICY
@click.option("--name", help="Store the image under this name [default: from the reference].")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.argument("refs", nargs=-1, required=True)
@pass_ctx
def fetch(c: CliContext, refs: tuple[str, ...], pull_policy: str, name: str | None, fmt: str) -> None:
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
def image_import(c: CliContext, ref: str, name: str | None, fmt: str) -> None:
    """Import an image: oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:TAG] (docker save),
    FILE.aci (appc, with FILE.aci.asc kept), or docker://... (same as fetch)."""
    _print_records([c.engine().import_image(ref, name=name, progress=_progress)], fmt)


@image.command("list")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.option("--no-legend", is_flag=True)
@pass_ctx
def image_list(c: CliContext, fmt: str, no_legend: bool) -> None:
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
def image_rm(c: CliContext, refs: tuple[str, ...]) -> None:
    """Remove images (refused while a pod that is not garbage uses them)."""
    engine = c.engine()
    for ref in refs:
        record = engine.remove_image(ref)
        click.echo(f"removed {record.id} {record.name}")


@image.command("gc")
@click.option("--grace-period", default="24h", show_default=True, help="Remove images unused for this long.")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@pass_ctx
def image_gc(c: CliContext, grace_period: str, fmt: str) -> None:
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
def image_inspect(c: CliContext, ref: str) -> None:
    """Print everything the store knows about an image (JSON)."""
    _dump(c.engine().image(ref).to_dict())


@image.command("cat-manifest")
@click.argument("ref")
@pass_ctx
def image_cat_manifest(c: CliContext, ref: str) -> None:
    """Print the image's own manifest (OCI manifest, or appc image manifest)."""
    _dump(c.engine().image_manifest(ref))


@image.command("verify")
@click.option("--format", "fmt", type=FORMATS, default="text", show_default=True)
@click.argument("refs", nargs=-1, required=True)
@pass_ctx
def image_verify(c: CliContext, refs: tuple[str, ...], fmt: str) -> None:
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
def image_extract(c: CliContext, ref: str, dest: Path, rootfs_only: bool) -> None:
    """Unpack an image, with its dependencies (what a pod sees), into a new directory DIR (DIR/manifest and
    DIR/rootfs, or the root filesystem only)."""
    click.echo(c.engine().extract_image(ref, dest, rootfs_only=rootfs_only, progress=_progress))


image.add_command(image_extract, name="render")  # appc dependencies are always applied: both are the same


@image.command("export")
@click.option("--overwrite", is_flag=True)
@click.argument("ref")
@click.argument("out", type=click.Path(path_type=Path))
@pass_ctx
def image_export(c: CliContext, ref: str, out: Path, overwrite: bool) -> None:
    """Write an image to a file: an ACI for appc images, an oci-archive for OCI images."""
    click.echo(c.engine().export_image(ref, out, overwrite=overwrite))


