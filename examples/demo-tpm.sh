#!/bin/sh
# Give the demo a TPM: examples/demo-tpm.sh [CONFIG_DIR]   (default /etc/kvmrkt)
# The host's /dev/tpmrm0 when it has one; otherwise an EMULATED TPM (swtpm) on 127.0.0.1, port 2321 (control 2322)
# or the next free pair, with its state in /var/lib/kvmrkt/swtpm (pid, port, log), started once and left running
# (its PCRs must outlive the demo): a running one is reused only when it is verifiably the demo's own swtpm.
# Points [measure] tcti in CONFIG_DIR/config.toml at that TPM, but only in a [measure] table the demo wrote itself
# (marked by a comment line); anyone else's [measure] table is left as it is. The logic: kvmrkt/demo_tpm.py.
# KVMRKT_DEMO_TPM_STATE and KVMRKT_DEMO_TPM_PORT move the state directory and the first port tried.
set -eu
py=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python
if [ ! -x "$py" ]; then
  echo "examples/demo-tpm.sh: $py is missing: run make setup" >&2
  exit 1
fi
exec "$py" -m kvmrkt.demo_tpm "$@"
