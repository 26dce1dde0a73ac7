"""The ``kvmrkt`` command line: one module per command group, registered on the group in ``_base``."""

from kvmrkt.cli import attest, images, pods, trust
from kvmrkt.cli._base import cli, main

__all__ = ["attest", "cli", "images", "main", "pods", "trust"]
