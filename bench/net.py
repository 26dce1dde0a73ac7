"""Network benchmark: HTTP from the host to busybox ``httpd`` in a pod, through a forwarded port, versus the
same ``httpd`` binary run directly in a plain network namespace (a veth to the host), measured in the same
run. Pods on the default CNI network (ptp + portmap, tap joined by tc mirred) and, for the documented slow
path, on ``--net=user``. Prints JSON: TCP connect time (the network path alone), request latency
(sequential small GETs: median and p90; busybox httpd forks per request, which TCG makes slow) and
throughput (requests/s with 8 concurrent clients, from ``ab``; MB/s of a 32 MiB download), and ratios.

Usage (as root, after `make setup`):
    .venv/bin/python bench/net.py [--requests N] [--downloads N]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIG_MIB = 32
SERVE = f"mkdir -p /www && echo ok > /www/index.html && dd if=/dev/zero of=/www/big bs=1M count={BIG_MIB} " \
        "2>/dev/null && exec httpd -f -p 80 -h /www"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (http URLs built here)
        return bytes(r.read())


def _wait(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _get(url, 5)
            return
        except OSError:
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                sys.exit(f"server at {url} did not come up")
            time.sleep(0.2)


def _connect_ms(base: str, n: int) -> list[float]:
    """TCP handshakes only (answered by the guest kernel: the network path without the server's fork)."""
    host, port = base.removeprefix("http://").partition(":")[::2]
    out = []
    for _ in range(n):
        start = time.perf_counter()
        with socket.create_connection((host, int(port or 80)), timeout=10):
            out.append((time.perf_counter() - start) * 1000)
    return out


def _measure(base: str, requests: int, downloads: int) -> dict[str, float]:
    connect = _connect_ms(base, requests)
    lat = []
    for _ in range(requests):
        start = time.perf_counter()
        _get(base + "/index.html", 30)
        lat.append(time.perf_counter() - start)
    rates = []
    for _ in range(downloads):
        start = time.perf_counter()
        n = len(_get(base + "/big", 300))
        rates.append(n / (1 << 20) / (time.perf_counter() - start))
    ab = subprocess.run(["ab", "-q", "-n", str(requests * 2), "-c", "8", base + "/index.html"], capture_output=True,
                        text=True, check=True).stdout
    rps = float(re.search(r"Requests per second:\s+([\d.]+)", ab).group(1))  # type: ignore[union-attr]
    lat.sort()
    return {"tcp_connect_median_ms": round(statistics.median(connect), 3),
            "latency_median_ms": round(statistics.median(lat) * 1000, 2),
            "latency_p90_ms": round(lat[int(len(lat) * 0.9)] * 1000, 2),
            "requests_per_s_c8": round(rps, 1), "download_mib_s": round(statistics.median(rates), 1)}


@contextmanager
def _plain_netns(work: Path) -> Iterator[str]:
    """The baseline: busybox httpd in a network namespace joined to the host by a veth; yields its base URL."""
    ns, host_if, ns_if = "kvbench-base", "kvbench0h", "kvbench0n"
    www = work / "www"
    www.mkdir()
    (www / "index.html").write_text("ok\n")
    (www / "big").write_bytes(b"\0" * (BIG_MIB << 20))
    cmds = [["ip", "netns", "add", ns], ["ip", "link", "add", "name", host_if, "type", "veth", "peer", "name", ns_if],
            ["ip", "link", "set", "dev", ns_if, "netns", ns], ["ip", "addr", "add", "10.233.7.1/30", "dev", host_if],
            ["ip", "link", "set", "dev", host_if, "up"], ["ip", "-n", ns, "addr", "add", "10.233.7.2/30", "dev", ns_if],
            ["ip", "-n", ns, "link", "set", "dev", ns_if, "up"], ["ip", "-n", ns, "link", "set", "dev", "lo", "up"]]
    server = None
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        server = subprocess.Popen(["ip", "netns", "exec", ns, "/bin/busybox", "httpd", "-f", "-p", "80", "-h",
                                   str(www)])
        _wait("http://10.233.7.2/index.html", server)
        yield "http://10.233.7.2"
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "delete", ns], check=False, capture_output=True)


@contextmanager
def _pod(kvmrkt: list[str], net: str) -> Iterator[str]:
    """A pod serving the same files through a forwarded port; yields its base URL on the host."""
    port = _free_port()
    proc = subprocess.Popen([*kvmrkt, "run", f"--net={net}", "--port", f"80:{port}", "busybox", "--exec", "/bin/sh",
                             "--", "-c", SERVE], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait(f"http://127.0.0.1:{port}/index.html", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()  # a graceful stop: kvmrkt stops the VM and tears the network down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--downloads", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvmrkt-bench-") as tmp:
        work = Path(tmp)
        data, etc = work / "data", work / "etc"
        etc.mkdir()
        (etc / "config.toml").write_text('[measure]\ntcti = ""\n')
        (etc / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
        subprocess.run([REPO / "examples" / "busybox-image.sh", work / "img", "latest"], check=True,
                       capture_output=True)
        kvmrkt = [sys.executable, "-m", "kvmrkt", "--dir", str(data), "--config-dir", str(etc),
                  "--insecure-options=tpm"]  # measurement is not what this measures
        subprocess.run([*kvmrkt, "image", "import", f"oci:{work / 'img'}:latest", "--name", "busybox"], check=True,
                       capture_output=True)
        results: dict[str, object] = {"requests": args.requests, "downloads": args.downloads, "big_file_mib": BIG_MIB}
        with _plain_netns(work) as url:
            base = _measure(url, args.requests, args.downloads)
        with _pod(kvmrkt, "default") as url:
            cni = _measure(url, args.requests, args.downloads)
        with _pod(kvmrkt, "user") as url:
            user = _measure(url, args.requests, args.downloads)
        results.update({"plain_netns": base, "pod_default_net": cni, "pod_user_net": user})
        for name, m in (("default_net", cni), ("user_net", user)):
            results[f"ratio_{name}"] = {
                "tcp_connect": round(m["tcp_connect_median_ms"] / base["tcp_connect_median_ms"], 2),
                "latency": round(m["latency_median_ms"] / base["latency_median_ms"], 2),
                "requests_per_s": round(m["requests_per_s_c8"] / base["requests_per_s_c8"], 3),
                "download": round(m["download_mib_s"] / base["download_mib_s"], 3),
            }
        subprocess.run([*kvmrkt, "gc", "--grace-period=0s"], capture_output=True, check=False)
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
