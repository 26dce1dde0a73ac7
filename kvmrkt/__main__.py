"""``python -m kvmrkt`` entry point."""

from kvmrkt.cli import main

main()
