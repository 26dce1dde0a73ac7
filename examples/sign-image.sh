#!/bin/sh
# Sign an OCI image layout for kvmrkt's trust policy: examples/sign-image.sh LAYOUT IDENTITY GNUPGHOME PUBKEY_OUT
# Makes a signing key in GNUPGHOME if it has none, signs the image's manifest for IDENTITY (the name the image
# will be imported as) with `skopeo standalone-sign`, puts the signature in LAYOUT.signatures/signature-1 and
# exports the public key to PUBKEY_OUT. Commands are echoed so they can be repeated by hand.
set -eu
layout=$1 identity=$2
export GNUPGHOME=$3
pubkey=$4
run() { echo "+ $*" >&2; "$@"; }
mkdir -p -m 700 "$GNUPGHOME"
if ! gpg --batch --list-secret-keys --with-colons 2>/dev/null | grep -q '^sec'; then
  run gpg --batch --pinentry-mode loopback --passphrase '' --quick-gen-key "kvmrkt demo <demo@kvmrkt.invalid>" ed25519 sign never
fi
fpr=$(gpg --batch --list-secret-keys --with-colons | awk -F: '/^fpr/{print $10; exit}')
digest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' "$layout/index.json")
mkdir -p "$layout.signatures"
run skopeo standalone-sign "$layout/blobs/sha256/${digest#sha256:}" "$identity" "$fpr" --output "$layout.signatures/signature-1"
run gpg --batch --armor --export --output "$pubkey" --yes "$fpr"
