"""The ``kvmrkt`` command line: one module per command group, registered on the group in ``_base``."""

from kvmrkt.cli import attest, images, oci, pods, templates, trust
from kvmrkt.cli._base import cli, main

cli.add_command(oci.oci, "oci")

__all__ = ["attest", "cli", "images", "main", "oci", "pods", "templates", "trust"]
