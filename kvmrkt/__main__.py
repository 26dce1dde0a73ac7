"""``python -m kvmrkt`` entry point."""

from kvmrkt.host.timeline import stamp

stamp("cli-start")
from kvmrkt.cli import main  # noqa: E402  (after the first stamp: the imports are a stage of their own)

stamp("imports-done")
main()
