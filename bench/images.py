"""Image import benchmark: ``kvmrkt image import`` (verify + unpack + erofs build) of a large multi-layer OCI
image versus ``umoci unpack`` and ``skopeo copy`` of the same image, in the same run. Prints JSON: medians and
ratios (baseline time / kvmrkt time, so > 1.0 means kvmrkt is faster).

Usage (as root, after `make setup`): .venv/bin/python bench/images.py [--runs N] [--layers N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Host trees copied into the image, one layer each (real files: text, binaries, symlinks, many small files).
SOURCES = ["/usr/lib/python3.11", "/usr/share/perl", "/usr/lib/x86_64-linux-gnu/perl", "/usr/share/locale",
           "/usr/lib/gcc"]  # fmt: skip


def _run(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{proc.stderr.decode()[-2000:]}")
    return time.perf_counter() - start


def build_image(work: Path, layers: int) -> tuple[Path, int, int]:
    layout = work / "big"
    subprocess.run([REPO / "examples" / "busybox-image.sh", layout, "latest"], check=True, capture_output=True)
    for src in [s for s in SOURCES if Path(s).is_dir()][: layers - 1]:
        bundle = work / "bundle"
        subprocess.run(["umoci", "unpack", "--image", f"{layout}:latest", bundle], check=True, capture_output=True)
        dest = bundle / "rootfs" / src.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dest, symlinks=True)
        subprocess.run(["umoci", "repack", "--image", f"{layout}:latest", bundle], check=True, capture_output=True)
        shutil.rmtree(bundle)
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads((layout / "blobs" / "sha256" / index["manifests"][0]["digest"][7:]).read_text())
    compressed = sum(int(x["size"]) for x in manifest["layers"])
    return layout, len(manifest["layers"]), compressed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmrkt-bench-images-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        layout, nlayers, compressed = build_image(work, args.layers)
        # The bench measures unpacking, not trust (the default with no policy is to reject every image).
        (work / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        times: dict[str, list[float]] = {"kvmrkt_import": [], "umoci_unpack": [], "skopeo_copy": []}
        for i in range(args.runs):
            data = work / f"kvmrkt-{i}"
            times["kvmrkt_import"].append(_run([sys.executable, "-m", "kvmrkt", "--dir", str(data), "--config-dir",
                                               str(work), "image", "import", f"oci:{layout}:latest"]))
            shutil.rmtree(data)
            times["umoci_unpack"].append(_run(["umoci", "unpack", "--image", f"{layout}:latest",
                                               str(work / f"bundle-{i}")]))
            shutil.rmtree(work / f"bundle-{i}")
            times["skopeo_copy"].append(_run(["skopeo", "copy", "-q", f"oci:{layout}:latest",
                                              f"oci:{work / f'copy-{i}'}:latest"]))
            shutil.rmtree(work / f"copy-{i}")
        med = {k: statistics.median(v) for k, v in times.items()}
        print(json.dumps({
            "layers": nlayers,
            "compressed_mib": round(compressed / 2**20, 1),
            "runs": args.runs,
            "median_s": {k: round(v, 2) for k, v in med.items()},
            "all_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
            "ratio_umoci_unpack_over_kvmrkt_import": round(med["umoci_unpack"] / med["kvmrkt_import"], 3),
            "ratio_skopeo_copy_over_kvmrkt_import": round(med["skopeo_copy"] / med["kvmrkt_import"], 3),
            "kvmrkt_import_mib_per_s": round(compressed / 2**20 / med["kvmrkt_import"], 1),
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
