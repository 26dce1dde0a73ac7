"""The ``kvmrkt`` command line: one module per command group, registered on the group in ``_base`` (``oci``, the
OCI runtime's commands, is imported only when used: see ``_base._Group``)."""

from kvmrkt.cli import attest, images, pods, templates, trust
from kvmrkt.cli._base import cli, main

__all__ = ["attest", "cli", "images", "main", "pods", "templates", "trust"]
