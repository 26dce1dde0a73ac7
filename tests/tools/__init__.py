"""Build and run the third-party test tools (Go binaries built from vendored source); not part of kvmrkt."""
