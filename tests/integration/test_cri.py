"""The CRI harness itself (tests/integration/cri.py): a private containerd with the CRI plugin answers crictl, and
a pod sandbox under the runc handler gets an IP on the pod network and leaves nothing behind. (kvmrkt's own pod
handling under CRI is being rebuilt; its scenarios come with it.)"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from .cri import POD_SUBNET, CriNode


def test_crictl_answers_and_a_runc_pod_gets_an_ip_and_leaves_nothing(cri: CriNode, tmp_path: Path) -> None:
    version = cri.crictl("version")
    assert version.returncode == 0 and "RuntimeName:  containerd" in version.stdout, version.stderr
    info = cri.crictl("info")
    assert info.returncode == 0, info.stderr
    conditions = {c["type"]: c["status"] for c in json.loads(info.stdout)["status"]["conditions"]}
    assert conditions == {"RuntimeReady": True, "NetworkReady": True}, info.stdout[:2000]
    assert cri.crictl("inspecti", "localhost/kvmrkt-pause:1").returncode == 0

    run = cri.crictl("runp", "--runtime", "runc", str(cri.pod_config(tmp_path / "pod", "smoke")))
    assert run.returncode == 0, f"{run.stderr}\n{cri.log()}"
    pod = run.stdout.strip()
    status = json.loads(cri.crictl("inspectp", "-o", "json", pod).stdout)["status"]
    assert status["state"] == "SANDBOX_READY"
    assert ipaddress.ip_address(status["network"]["ip"]) in ipaddress.ip_network(POD_SUBNET)
    assert cri.shims() and cri.netns()

    assert cri.crictl("stopp", pod).returncode == 0
    assert cri.crictl("rmp", pod).returncode == 0
    assert cri.crictl("pods", "-q").stdout.split() == []
    assert cri.shims() == [] and cri.netns() == []
