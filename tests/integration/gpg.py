"""Real GnuPG keys and signatures for tests, in a private GNUPGHOME (never the user's keyring)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path


class Gpg:
    """A throwaway GnuPG home."""

    def __init__(self, home: Path) -> None:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.home = home
        self.env = {**os.environ, "GNUPGHOME": str(home)}

    def run(self, *args: str, faked_time: str | None = None, input_bytes: bytes | None = None) -> bytes:
        extra = [f"--faked-system-time={faked_time}!"] if faked_time else []
        proc = subprocess.run(["gpg", "--batch", "--pinentry-mode", "loopback", "--passphrase", "", *extra, *args],
                              env=self.env, input=input_bytes, capture_output=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"gpg {' '.join(args)} failed: {proc.stderr.decode()}")
        return proc.stdout

    def fingerprints(self) -> list[str]:
        out = self.run("--list-keys", "--with-colons").decode()
        return [line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:")]

    def new_key(self, uid: str, *, usage: str = "sign", expire: str = "never", faked_time: str | None = None) -> str:
        before = set(self.fingerprints())
        self.run("--quick-gen-key", uid, "ed25519", usage, expire, faked_time=faked_time)
        return next(f for f in self.fingerprints() if f not in before)

    def add_signing_subkey(self, primary: str) -> str:
        before = set(self.fingerprints())
        self.run("--quick-add-key", primary, "ed25519", "sign", "never")
        return next(f for f in self.fingerprints() if f not in before)

    def revoke_first_subkey(self, primary: str) -> None:
        self.run("--command-fd", "0", "--edit-key", primary, input_bytes=b"key 1\nrevkey\ny\n0\n\ny\nsave\n")

    def export(self, fpr: str, path: Path) -> Path:
        path.write_bytes(self.run("--armor", "--export", fpr))
        return path

    def sign(self, data: bytes, *signers: str, faked_time: str | None = None) -> bytes:
        """A binary OpenPGP signed message (what simple signing uses), by one or more keys."""
        args = [a for s in signers for a in ("-u", f"{s}!")]
        return self.run(*args, "--sign", "--output", "-", faked_time=faked_time, input_bytes=data)

    def detach_sign(self, signer: str, path: Path) -> bytes:
        return self.run("-u", f"{signer}!", "--armor", "--detach-sign", "--output", "-", str(path))

    def standalone_sign(self, manifest: Path, reference: str, signer: str, out: Path) -> None:
        """A simple-signing signature made by skopeo (the real producer)."""
        subprocess.run(["skopeo", "standalone-sign", str(manifest), reference, signer, "--output", str(out)],
                       env=self.env, check=True, capture_output=True)


def payload(digest: str, reference: str, kind: str = "atomic container signature", **critical: object) -> bytes:
    return json.dumps({"critical": {"type": kind, "image": {"docker-manifest-digest": digest},
                                    "identity": {"docker-reference": reference}, **critical},
                       "optional": {"creator": "kvmrkt tests"}}).encode()
