"""The trust gate loads gpg and cryptography (``policy.signatures``) only when a requirement checks a signature:
an accept-anything scope judges without them (kvmrkt run's start-up), a signedBy scope still verifies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

JUDGE = """
import sys
from pathlib import Path
from kvmrkt.config import load_config
from kvmrkt.errors import PolicyDeniedError
from kvmrkt.images.store import Store
from kvmrkt.trust.gate import TrustGate
from policy.trust import Subject
config = load_config(config_dir=Path(sys.argv[1]), data_dir=Path(sys.argv[2]))
gate = TrustGate(config, Store(config.data_dir), warn=print)
subject = Subject("docker", "example.com/app:1", "example.com/app:1", "sha256:" + "a" * 64)
try:
    gate._decide(subject, {}, None)
    verdict = "accepted"
except PolicyDeniedError as exc:
    verdict = "rejected: " + exc.message
print(verdict)
print("signatures loaded" if "policy.signatures" in sys.modules else "signatures not loaded")
"""


def _judge(tmp_path: Path, policy: dict[str, object]) -> list[str]:
    etc, data = tmp_path / "etc", tmp_path / "data"
    etc.mkdir()
    (etc / "policy.json").write_text(json.dumps(policy))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", JUDGE, str(etc), str(data)], env=env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_accept_anything_judges_without_loading_signature_code(tmp_path: Path) -> None:
    assert _judge(tmp_path, {"default": [{"type": "insecureAcceptAnything"}]}) == [
        "accepted", "signatures not loaded"]


def test_reject_scope_judges_without_loading_signature_code(tmp_path: Path) -> None:
    verdict, loaded = _judge(tmp_path, {"default": [{"type": "reject"}]})
    assert verdict.startswith("rejected") and loaded == "signatures not loaded"


def test_signed_by_still_verifies_and_rejects_the_unsigned(tmp_path: Path) -> None:
    """The hostile case: an unsigned image under a signedBy scope is rejected, by the signature code."""
    key = tmp_path / "key.asc"
    key.write_text("-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nbm90IGEga2V5\n-----END PGP PUBLIC KEY BLOCK-----\n")
    verdict, loaded = _judge(tmp_path, {"default": [{"type": "signedBy", "keyType": "GPGKeys",
                                                     "keyPath": str(key)}]})
    assert verdict.startswith("rejected"), verdict
    assert loaded == "signatures loaded"
