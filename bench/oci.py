"""OCI runtime benchmark: `ctr run --rm` wall time to exit of a busybox container running ``true`` with
kvmrkt-oci (a measured VM per container) versus runc on the same image, in the same run, under a private
containerd; host memory per running container (PSS of the kvmrkt supervisor and QEMU, versus runc's
container process; the containerd shim is the same for both and not counted); and host memory of a Kubernetes
pod (the CRI node of tests/integration/cri.py, crictl): the pod's sandbox alone, then with two containers
running in its VM (what the containers add: their holders and the guest memory they touch), against what one
VM per container would cost (three sandboxes' worth: pause and two containers, from the same run's figure).

Usage (as root, after `make setup`):
    .venv/bin/python bench/oci.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchtpm import swtpm

REPO = Path(__file__).resolve().parents[1]
NS = "bench"


def _pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with open(task / "children") as fh:
            out += [int(p) for p in fh.read().split()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    base = Path(f"/tmp/kvmrkt-bench-ctrd-{os.getpid()}")
    base.mkdir()
    with tempfile.TemporaryDirectory(prefix="kvmrkt-bench-") as tmp:
        work = Path(tmp)
        try:
            with swtpm(work) as tcti:
                print(json.dumps(_bench(work, base, tcti, args.runs), indent=2))
        finally:
            shutil.rmtree(base, ignore_errors=True)


def _bench(work: Path, base: Path, tcti: str, runs: int) -> dict[str, object]:
    etc, data = work / "etc", work / "data"
    etc.mkdir()
    # The bench's own TPM keeps its own log (the host's log belongs to the host's TPM).
    (etc / "config.toml").write_text(f'[measure]\ntcti = "{tcti}"\nlog_dir = "{data / "measure"}"\n')
    runtime = work / "kvmrkt-oci"
    runtime.write_text(f"#!/bin/sh\nexec {Path(sys.executable).parent / 'kvmrkt-oci'} --config-dir {etc} "
                       f"--dir {data} \"$@\"\n")
    runtime.chmod(0o755)
    (base / "config.toml").write_text(
        f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n[grpc]\n  address = "{base}/c.sock"\n')
    ctrd = subprocess.Popen(["containerd", "--config", str(base / "config.toml")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while not (base / "c.sock").exists():
            if ctrd.poll() is not None:
                sys.exit("containerd did not start")
            time.sleep(0.05)
        ctr = ["ctr", "--address", str(base / "c.sock"), "--namespace", NS]
        subprocess.run([REPO / "examples" / "busybox-image.sh", work / "img", "latest"], check=True,
                       capture_output=True)
        subprocess.run(["skopeo", "copy", f"oci:{work / 'img'}:latest",
                        f"docker-archive:{work / 'bb.tar'}:localhost/busybox:latest"], check=True, capture_output=True)
        subprocess.run([*ctr, "image", "import", str(work / "bb.tar")], check=True, capture_output=True)
        image = "localhost/busybox:latest"

        def run(name: str, extra: list[str]) -> float:
            start = time.perf_counter()
            subprocess.run([*ctr, "run", "--rm", *extra, image, name, "/bin/true"], check=True, capture_output=True)
            return time.perf_counter() - start

        kv_args = ["--runc-binary", str(runtime)]
        run("warm-kv", kv_args)
        run("warm-runc", [])
        kv, rc = [], []
        for i in range(runs):
            kv.append(run(f"kv{i}", kv_args))
            rc.append(run(f"rc{i}", []))
        memory = _memory(ctr, image, kv_args)
        memory.update(_pod_memory(work, runtime))
        return {
            "runs": runs,
            "ctr_run_kvmrkt_median_s": round(statistics.median(kv), 3),
            "ctr_run_runc_median_s": round(statistics.median(rc), 3),
            "ratio": round(statistics.median(kv) / statistics.median(rc), 1),
            "kvmrkt_s": [round(x, 3) for x in kv],
            "runc_s": [round(x, 3) for x in rc],
            **memory,
        }
    finally:
        ctrd.terminate()
        ctrd.wait()
        subprocess.run(["umount", "-R", str(base / "root")], capture_output=True, check=False)


def _memory(ctr: list[str], image: str, kv_args: list[str]) -> dict[str, float]:
    """PSS of what each runtime keeps on the host for one running container."""
    out: dict[str, float] = {}
    for label, extra in (("kvmrkt", kv_args), ("runc", [])):
        name = f"mem-{label}"
        subprocess.run([*ctr, "run", "-d", *extra, image, name, "/bin/sleep", "600"], check=True, capture_output=True)
        time.sleep(2)
        ps = subprocess.run([*ctr, "task", "ps", name], capture_output=True, text=True, check=True).stdout
        pid = int(ps.split()[2])  # "PID INFO\n<pid> -"
        procs = [pid, *_children(pid)]  # kvmrkt: the supervisor and its QEMU; runc: the container process
        out[f"{label}_host_pss_mib"] = round(sum(_pss_mib(p) for p in procs), 1)
        if label == "kvmrkt":
            out["kvmrkt_supervisor_pss_mib"] = round(_pss_mib(pid), 1)
            out["kvmrkt_qemu_pss_mib"] = round(sum(_pss_mib(p) for p in procs[1:]), 1)
        subprocess.run([*ctr, "task", "kill", "-s", "SIGKILL", name], capture_output=True, check=False)
        time.sleep(1.5)
        subprocess.run([*ctr, "task", "delete", "-f", name], capture_output=True, check=False)
        subprocess.run([*ctr, "container", "delete", name], capture_output=True, check=False)
    return out


def _tree_pss(pids: list[int]) -> float:
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += _children(pid)
    return sum(_pss_mib(p) for p in seen)


def _pod_memory(work: Path, runtime: Path) -> dict[str, float]:
    """PSS on the host of one CRI pod under kvmrkt: the sandbox alone, then with two busybox containers."""
    sys.path.insert(0, str(REPO))
    from tests.integration.cri import PAUSE_IMAGE, CriNode
    from tests.tools.build_go_tools import cached

    tools = cached("cri-tools")
    if tools is None:
        return {}
    node = CriNode.start(Path(f"/tmp/kvmrkt-bench-cri-{os.getpid()}"), tools / "bin" / "crictl", runtime)
    try:
        pod_json = node.pod_config(work / "pod", "bench")
        run = node.crictl("runp", "--runtime", "kvmrkt", str(pod_json))
        if run.returncode != 0:
            sys.exit(f"crictl runp failed: {run.stderr}")
        pod = run.stdout.strip()
        time.sleep(2)
        sandbox = json.loads(node.crictl("inspectp", "-o", "json", pod).stdout)["info"]["pid"]
        alone = _tree_pss([sandbox])
        holders = []
        for name in ("one", "two"):
            cfg = work / f"{name}.json"
            cfg.write_text(json.dumps({"metadata": {"name": name}, "image": {"image": PAUSE_IMAGE},
                                       "command": ["/bin/busybox", "sleep", "600"], "log_path": f"{name}.log",
                                       "linux": {"security_context": {"namespace_options": {"pid": 1}}}}))
            made = node.crictl("create", pod, str(cfg), str(pod_json))
            cid = made.stdout.strip()
            started = node.crictl("start", cid) if made.returncode == 0 else made
            if started.returncode != 0:
                sys.exit(f"crictl create/start failed: {started.stderr}")
            holders.append(json.loads(node.crictl("inspect", "-o", "json", cid).stdout)["info"]["pid"])
        time.sleep(2)
        both = _tree_pss([sandbox, *holders])
        node.crictl("stopp", pod)
        node.crictl("rmp", pod)
    finally:
        node.stop()
    return {"cri_pod_sandbox_pss_mib": round(alone, 1), "cri_pod_two_containers_pss_mib": round(both, 1),
            "cri_one_vm_per_container_pss_mib": round(3 * alone, 1)}


if __name__ == "__main__":
    main()
