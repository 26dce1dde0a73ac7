"""Commands racing each other on one data dir, with real VMs: two gc at once, gc racing run-prepared, rm racing
enter, two imports of the same image, trust writing while run loads the policy. Each command either succeeds or
fails with a clear error (an exit code of kvmrkt's and a ``kvmrkt:`` message, never a traceback), and afterwards
the state is consistent: ``list`` and ``status`` work, the store verifies, and (the fixture) nothing is leaked."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .conftest import Kvmrkt, Result
from .gpg import Gpg

SH = ["busybox", "--exec", "/bin/sh", "--"]


def together(kvmrkt: Kvmrkt, *commands: list[str], timeout: float = 180) -> list[Result]:
    """Start every command at once and wait for all of them."""
    procs = [subprocess.Popen(kvmrkt.argv(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv in commands]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(Result(proc.returncode, out, err))
    return results


def clean_failure(res: Result, *allowed: str) -> bool:
    """A failure kvmrkt reports itself: a message naming kvmrkt, one of the ``allowed`` texts, no traceback."""
    return "Traceback" not in res.err and res.err.startswith("kvmrkt") and any(a in res.err for a in allowed)


def consistent(kvmrkt: Kvmrkt) -> list[dict[str, object]]:
    """``list`` works and every listed pod's ``status`` works; returns the list."""
    pods: list[dict[str, object]] = json.loads(kvmrkt.ok("list", "--format", "json").out)
    for pod in pods:
        kvmrkt.ok("status", "--format", "json", str(pod["uuid"]))
    return pods


def test_two_gc_at_once(kvmrkt: Kvmrkt) -> None:
    for code in range(3):
        assert kvmrkt("run", *SH, "-c", f"exit {code}").rc == code
    prepared = kvmrkt.ok("prepare", "--quiet", *SH, "-c", "true").out.strip()
    for a, b in [together(kvmrkt, ["gc", "--grace-period=0s", "--expire-prepared=0s"],
                          ["gc", "--grace-period=0s", "--expire-prepared=0s"]) for _ in range(2)]:
        assert a.rc == 0 and b.rc == 0, a.err + b.err
        assert "Traceback" not in a.err + b.err
    assert consistent(kvmrkt) == []
    assert kvmrkt("status", prepared).rc == 7
    assert not list((kvmrkt.data / "pods").glob("*/*-*"))


def test_gc_racing_run_prepared(kvmrkt: Kvmrkt) -> None:
    """gc collecting prepared pods (--expire-prepared=0s) while they are being run: each pod either runs to its
    app's exit code or is refused as no longer prepared/present; gc never takes a pod that is running."""
    outcomes = set()
    for i in range(4):
        uuid = kvmrkt.ok("prepare", "--quiet", *SH, "-c", f"echo ran-{i}; exit 3").out.strip()
        run, gc = together(kvmrkt, ["run-prepared", uuid], ["gc", "--grace-period=0s", "--expire-prepared=0s"])
        assert gc.rc == 0 and "Traceback" not in gc.err, gc.err
        if run.rc == 3:
            assert f"ran-{i}" in run.out
            outcomes.add("ran")
        else:
            assert run.rc == 7, run.err
            assert clean_failure(run, "not prepared", "no pod", "in use by another kvmrkt process"), run.err
            outcomes.add("collected")
        pods = consistent(kvmrkt)
        assert all(p["state"] in ("exited", "exited-garbage") for p in pods), pods
    kvmrkt.ok("gc", "--grace-period=0s")
    assert consistent(kvmrkt) == []
    assert outcomes  # which outcome each race had depends on the scheduler; both are correct


def test_rm_racing_enter(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    """enter sessions and rm thrown at a pod whose app ends meanwhile: rm refuses a running pod, enter refuses
    an exited one, and once rm succeeds the pod is gone for every command."""
    uuid_file = tmp_path / "uuid"
    proc = kvmrkt.start("run", "--uuid-file-save", str(uuid_file), *SH, "-c", "sleep 3")
    uuid = kvmrkt.wait_running(uuid_file)
    removed = False
    for _ in range(40):
        results = together(kvmrkt, ["enter", uuid, "/bin/true"], ["rm", uuid], ["enter", uuid, "/bin/true"])
        for res in results:
            assert res.rc == 0 or clean_failure(res, "; stop it first", "; this needs it running", "no pod",
                                                "stopped running before enter", "starting or stopping",
                                                "the guest agent closed the channel (did the pod exit?)"), \
                f"exit code {res.rc}: {res.err}"
        removed = results[1].rc == 0
        if removed:
            break
    assert removed, "rm never succeeded"
    proc.communicate(timeout=60)
    assert kvmrkt("status", uuid).rc == 7
    assert kvmrkt("enter", uuid, "/bin/true").rc == 7
    assert consistent(kvmrkt) == []


def test_two_imports_of_the_same_image(kvmrkt: Kvmrkt, busybox_layout: Path, tmp_path: Path) -> None:
    fresh = Kvmrkt(tmp_path / "fresh", kvmrkt.config, kvmrkt.tcti)
    results = together(fresh, *[["image", "import", f"oci:{busybox_layout}:latest", "--name", "same"]] * 3)
    assert all(r.rc == 0 for r in results), [r.err for r in results]
    images = json.loads(fresh.ok("image", "list", "--format", "json").out)
    assert len(images) == 1, images
    fresh.ok("image", "verify", "same")
    assert fresh.ok("run", "same", "--exec", "/bin/sh", "--", "-c", "echo imported-once").out == "imported-once\n"
    fresh.ok("gc", "--grace-period=0s")


def test_trust_writes_while_run_loads_the_policy(kvmrkt: Kvmrkt, tmp_path: Path) -> None:
    """trust adds keys and policy entries (atomic writes) while pods load the policy: every run sees a whole
    policy (the permissive test default plus whatever trust added), never a torn file."""
    gpg = Gpg(tmp_path / "gnupg")
    keys = [gpg.export(gpg.new_key(f"k{i} <k{i}@example.com>"), tmp_path / f"k{i}.asc") for i in range(4)]
    trusts = [["trust", "--prefix", f"example.com/p{i}", str(key)] for i, key in enumerate(keys)]
    runs = [["run", "--net=none", *SH, "-c", "exit 0"]] * 4
    results = together(kvmrkt, *[c for pair in zip(trusts, runs, strict=True) for c in pair])
    for res in results:
        assert res.rc == 0 and "Traceback" not in res.err, res.err
    listed = kvmrkt.ok("trust", "list").out
    assert all(f"example.com/p{i}" in listed for i in range(4)), listed
    kvmrkt.ok("policy", "check", str(kvmrkt.config))


def test_imports_racing_image_gc(kvmrkt: Kvmrkt, busybox_layout: Path, tmp_path: Path) -> None:
    """Imports of new images while ``image gc`` runs: an import never fails because gc removed what it was
    writing (gc may remove a finished, unused image: that is what --grace-period=0s asks), and whatever is
    left verifies."""
    layout, bundle = tmp_path / "layout", tmp_path / "bundle"
    subprocess.run(["cp", "-a", str(busybox_layout), str(layout)], check=True)
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:latest", str(bundle)], check=True,
                   capture_output=True)
    for i in range(4):
        (bundle / "rootfs" / f"variant-{i}").write_bytes(os.urandom(256 << 10))
        subprocess.run(["umoci", "repack", "--image", f"{layout}:v{i}", str(bundle)], check=True, capture_output=True)
    for _round in range(2):
        imports = [["image", "import", f"oci:{layout}:v{i}", "--name", f"variant-{i}"] for i in range(4)]
        gcs = [["image", "gc", "--grace-period=0s"]] * 3
        results = together(kvmrkt, *[c for pair in zip(imports, [*gcs, gcs[0]], strict=True) for c in pair])
        for argv, res in zip([c for pair in zip(imports, [*gcs, gcs[0]], strict=True) for c in pair], results,
                             strict=True):
            assert res.rc == 0 and "Traceback" not in res.err, f"{argv}: exit {res.rc}: {res.err}"
        for image in json.loads(kvmrkt.ok("image", "list", "--format", "json").out):
            kvmrkt.ok("image", "verify", image["id"])
