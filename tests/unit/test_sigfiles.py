"""kvmrkt.trust.sigfiles: the names of stored signature files and their mapping to a SignatureSet."""

from __future__ import annotations

from pathlib import Path

from kvmrkt.trust import sigfiles
from kvmrkt.trust.sigfiles import SignatureSet, signature_set


def test_names_round_trip() -> None:
    assert sigfiles.source_name(3) == "signature-3" and sigfiles.simple_name(3) == "simple-3"
    payload, sig = sigfiles.cosign_names(2)
    assert (payload, sig) == ("cosign-2.payload", "cosign-2.sig")
    assert sigfiles.is_cosign_signature(sig) and not sigfiles.is_cosign_signature(payload)
    assert sigfiles.cosign_payload_of(sig) == payload


def test_stored_files_map_to_a_signature_set_in_name_order(tmp_path: Path) -> None:
    files = {"simple-2": b"s2", "simple-1": b"s1", "cosign-1.payload": b"p1", "cosign-1.sig": b"c1",
             sigfiles.DETACHED: b"asc"}
    target = tmp_path / "image.aci"
    assert signature_set(files, target) == SignatureSet(simple=(b"s1", b"s2"), cosign=((b"p1", b"c1"),),
                                                        detached=((b"asc", target),))


def test_hostile_names_are_ignored_or_fail_closed() -> None:
    # a signature without its payload gets an empty one (fails verification); a payload alone, a detached
    # signature with nothing to check it against, and unknown names count for nothing
    files = {"cosign-9.sig": b"c", "cosign-8.payload": b"p", "detached.asc": b"asc", "signature-1": b"x",
             "README": b"r"}
    sigs = signature_set(files, None)
    assert sigs == SignatureSet(cosign=((b"", b"c"),)) and len(sigs) == 1
