#!/bin/sh
# Give the demo a TPM: /dev/tpmrm0 when the host has one; otherwise an EMULATED TPM (swtpm) on 127.0.0.1:2321
# with its state in /var/lib/kvmrkt/swtpm, started once and left running (its PCRs must outlive the demo).
# Writes [measure] tcti into CONFIG_DIR/config.toml only if that file has no [measure] table yet.
set -eu
config_dir=${1:-/etc/kvmrkt}
state=/var/lib/kvmrkt/swtpm
mkdir -p "$config_dir"
if [ -e /dev/tpmrm0 ]; then
  tcti="device:/dev/tpmrm0"
  echo "kvmrkt demo: using the host's TPM (/dev/tpmrm0)"
else
  tcti="swtpm:host=127.0.0.1,port=2321"
  mkdir -p -m 700 "$state"
  if [ -f "$state/pid" ] && kill -0 "$(cat "$state/pid")" 2>/dev/null; then
    echo "kvmrkt demo: this host has no TPM; using the EMULATED TPM (swtpm, pid $(cat "$state/pid")) already running"
  else
    echo "kvmrkt demo: this host has no TPM; starting an EMULATED TPM (swtpm) -- measurements are not hardware-backed"
    echo "+ swtpm socket --tpm2 --tpmstate dir=$state --server type=tcp,port=2321 --ctrl type=tcp,port=2322 --flags not-need-init,startup-clear --daemon --pid file=$state/pid"
    swtpm socket --tpm2 --tpmstate dir="$state" --server type=tcp,port=2321 --ctrl type=tcp,port=2322 \
      --flags not-need-init,startup-clear --daemon --pid file="$state/pid" --log file="$state/log"
  fi
fi
if ! grep -qs '^\[measure\]' "$config_dir/config.toml"; then
  printf '\n[measure]\ntcti = "%s"\npcr = 15\n' "$tcti" >> "$config_dir/config.toml"
  echo "kvmrkt demo: wrote [measure] tcti = \"$tcti\" to $config_dir/config.toml"
fi
