"""A private Kubernetes node for tests: Debian's containerd with its CRI plugin, driven by crictl.

Role: test harness. ``CriNode.start`` runs containerd inside ``unshare --net``: a network namespace of its own
(with loopback up) plays the node's, so CNI's bridge, veths and iptables rules, and any bug in a runtime that
rewires "the node's" network, stay off the machine's real interfaces. Everything else is private too: the
containerd root, state, sockets, the runc shims' state root, pod network namespaces (under the state dir), CNI
config, and the pods' cgroups (under a parent named for the node). Two runtime handlers: ``runc`` and ``kvmrkt``
(the stock runc shim with ``BinaryName`` = a kvmrkt-oci wrapper). The sandbox ("pause") image is built here from
Debian's busybox-static with umoci and imported into the ``k8s.io`` namespace: nothing is pulled.

Trust boundary: none of kvmrkt's; the harness trusts Debian's containerd, runc, CNI plugins and the crictl built
by ``tests/tools/build_go_tools.py``. ``stop`` removes every pod, stops containerd by pid, kills any shim left
(by pid, found by the node's socket in its command line) and reports what it had to clean up as leaks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAUSE_IMAGE = "localhost/kvmrkt-pause:1"
POD_SUBNET = "10.250.0.0/24"


def build_pause_image(layout: Path, archive: Path) -> None:
    """A one-binary sandbox image (busybox-static running ``sleep``) as a docker archive for ``ctr import``."""
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "b"
        for argv in (["umoci", "init", "--layout", str(layout)], ["umoci", "new", "--image", f"{layout}:1"],
                     ["umoci", "unpack", "--image", f"{layout}:1", str(bundle)]):
            subprocess.run(argv, check=True, capture_output=True)
        (bundle / "rootfs" / "bin").mkdir()
        shutil.copy2("/bin/busybox", bundle / "rootfs" / "bin" / "busybox")
        subprocess.run(["umoci", "repack", "--image", f"{layout}:1", str(bundle)], check=True, capture_output=True)
    subprocess.run(["umoci", "config", "--image", f"{layout}:1", "--config.entrypoint", "/bin/busybox",
                    "--config.cmd", "sleep", "--config.cmd", "2147483647"], check=True, capture_output=True)
    subprocess.run(["skopeo", "copy", f"oci:{layout}:1", f"docker-archive:{archive}:{PAUSE_IMAGE}"], check=True,
                   capture_output=True)


def containerd_config(base: Path, kvmrkt_oci: Path) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    runtimes = f"{cri}.containerd.runtimes"
    return f"""version = 2
root = "{base}/root"
state = "{base}/state"
[grpc]
  address = "{base}/c.sock"
[ttrpc]
  address = "{base}/t.sock"
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{base}/net.d"
[{cri}.containerd]
  default_runtime_name = "runc"
[{runtimes}.runc]
  runtime_type = "io.containerd.runc.v2"
[{runtimes}.runc.options]
  Root = "{base}/runc"
[{runtimes}.kvmrkt]
  runtime_type = "io.containerd.runc.v2"
[{runtimes}.kvmrkt.options]
  BinaryName = "{kvmrkt_oci}"
  Root = "{base}/kvmrkt-oci"
"""


CNI_CONFIG = {
    "cniVersion": "1.0.0",
    "name": "kvmrkt-cri-test",
    "plugins": [
        {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]], "routes": [{"dst": "0.0.0.0/0"}]}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}


@dataclass
class CriNode:
    """A running private containerd + CRI, and crictl pointed at it."""

    base: Path
    crictl_bin: Path
    proc: subprocess.Popen[bytes]
    cgroup_parent: str
    leaks: list[str] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.base / "c.sock"

    @classmethod
    def start(cls, base: Path, crictl_bin: Path, kvmrkt_oci: Path, timeout: float = 60) -> CriNode:
        """Start containerd in a new network namespace under ``base`` (keep it short: a unix socket path must fit
        in 108 bytes) and import the pause image."""
        base.mkdir()
        (base / "net.d").mkdir()
        (base / "net.d" / "10-kvmrkt-cri-test.conflist").write_text(json.dumps(CNI_CONFIG))
        (base / "config.toml").write_text(containerd_config(base, kvmrkt_oci))
        # `unshare` (without --fork) and `sh` exec, so the pid is containerd's.
        proc = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec containerd --config "$0"',
             str(base / "config.toml")], stdout=subprocess.DEVNULL, stderr=(base / "containerd.log").open("w"))
        node = cls(base, crictl_bin, proc, f"kvmrkt-cri-{os.getpid()}")
        try:
            deadline = time.monotonic() + timeout
            while node.crictl("version", timeout=10).returncode != 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"containerd did not start:\n{node.log()}")
                time.sleep(0.1)
            archive = base / "pause.tar"
            build_pause_image(base / "pause-oci", archive)
            res = node.ctr("image", "import", str(archive))
            if res.returncode != 0:
                raise RuntimeError(f"ctr image import failed: {res.stderr}")
        except BaseException:
            node.stop()
            raise
        return node

    def log(self) -> str:
        return (self.base / "containerd.log").read_text(errors="replace")[-3000:]

    def crictl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        endpoint = f"unix://{self.socket}"
        # in the node's namespace: exec, attach and port-forward stream from containerd's server on its loopback
        return subprocess.run(["nsenter", f"--net=/proc/{self.proc.pid}/ns/net", str(self.crictl_bin),
                               "--runtime-endpoint", endpoint, "--image-endpoint", endpoint,
                               "--timeout", "60s", *args], capture_output=True, text=True, timeout=timeout,
                              check=False)

    def node_run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a command in the node's network namespace (containerd's)."""
        return subprocess.run(["nsenter", f"--net=/proc/{self.proc.pid}/ns/net", *argv], capture_output=True,
                              text=True, timeout=60, check=False)

    def ctr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
                              capture_output=True, text=True, timeout=120, check=False)

    def pod_config(self, path: Path, name: str) -> Path:
        """A PodSandboxConfig (crictl's JSON) with this node's cgroup parent and a log directory under ``path``."""
        path.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "metadata": {"name": name, "namespace": "default", "uid": f"{name}-uid", "attempt": 1},
            "log_directory": str(path / "logs"),
            # kubelet's default: each container has its own PID namespace (CRI's own default, POD, is what a
            # pod spec's shareProcessNamespace asks for)
            "linux": {"cgroup_parent": f"/{self.cgroup_parent}/{name}",
                      "security_context": {"namespace_options": {"pid": 1}}},
        }
        (path / "pod.json").write_text(json.dumps(cfg))
        return path / "pod.json"

    def shims(self) -> list[int]:
        """Pids of containerd shims serving this node (their command line names its socket)."""
        marker = str(self.socket).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if entry.name.isdigit() and b"containerd-shim" in argv[0] and marker in argv:
                    pids.append(int(entry.name))
        return pids

    def netns(self) -> list[str]:
        """Pod network namespaces this node holds (containerd mounts them under its state dir)."""
        return [str(p) for p in (self.base / "state").rglob("cni-*") if p.is_file()]

    def stop(self) -> None:
        """Remove every pod, stop containerd and any shim left (by pid); record what had to be cleaned up."""
        if self.proc.poll() is None:
            pods = self.crictl("pods", "-q").stdout.split()
            if pods:
                self.leaks.append(f"pods {pods}")
                for pod in pods:
                    self.crictl("stopp", pod)
                    self.crictl("rmp", "-f", pod)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.shims():
            self.leaks.append(f"shim {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.netns():
            self.leaks.append(f"netns {self.netns()}")
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            point = line.split()[4]
            if point.startswith(f"{self.base}/"):
                self.leaks.append(f"mount {point}")
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        for ctrl in Path("/sys/fs/cgroup").iterdir():
            top = ctrl / self.cgroup_parent
            if top.is_dir():
                for d in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if d.is_dir():
                        with contextlib.suppress(OSError):
                            d.rmdir()
                with contextlib.suppress(OSError):
                    top.rmdir()
        shutil.rmtree(self.base, ignore_errors=True)
