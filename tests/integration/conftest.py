"""Fixtures for integration tests: real QEMU VMs booting kvmrkt's guest kernel, images built with umoci.

Each test gets its own data and config directories; the kvmrkt CLI runs as a subprocess exactly as an operator
runs it. After each test, any process whose command line mentions the test's data directory (its QEMUs) is a
leak: it is killed by pid and the test fails; so is any network namespace, veth or CNI iptables rule that was
not there before the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from kvmrkt.config import Stage1Config
from kvmrkt.errors import AssetError
from kvmrkt.host.wait import wait_until
from stage1_kvm.assets import load_assets
from tests.tools.build_go_tools import cached

from .cri import CriNode

REPO = Path(__file__).resolve().parents[2]


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "integration tests need root"
    for prog in ("qemu-system-x86_64", "umoci", "mkfs.erofs", "swtpm", "skopeo", "gpg", "docker-registry", "actool",
                 "libvirtd", "virtlogd", "veritysetup", "tpm2_checkquote", "xmllint", "ip", "tc", "iptables-save"):
        if not shutil.which(prog):
            return f"{prog} is not installed (run `make setup`)"
    if not Path("/usr/lib/cni/ptp").exists():
        return "CNI plugins are not installed (run `make setup`)"
    try:
        load_assets(Stage1Config(), "minimal")
        load_assets(Stage1Config(), "debian-cloud")
    except AssetError as exc:
        return f"guest assets are not built: {exc.message} (run `make setup`)"
    return None


@pytest.fixture(scope="session", autouse=True)
def capabilities(request: pytest.FixtureRequest) -> None:
    reason = _missing()
    if reason:
        if request.config.getoption("--require-capabilities"):
            pytest.fail(f"required capability missing: {reason}")
        pytest.skip(f"missing capability: {reason}")


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> bool:
    """Wait until a process we started accepts TCP connections on a loopback port (False if it died)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.02)
    return False


@dataclass
class Swtpm:
    """A real software TPM (swtpm) on loopback, for measured launch."""

    port: int
    proc: subprocess.Popen[bytes]
    state: Path

    def restart(self) -> None:
        """Stop and start this TPM on the same state and port: a TPM reset (resetCount goes up, PCRs 0-15 are
        zero again), as at a host reboot."""
        stop_swtpm(self)
        new = start_swtpm(self.state, self.port)
        self.proc = new.proc

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"


def _answers(sock_path: str) -> bool:
    """Whether a daemon listens on a unix socket (the file alone may be left from one that is gone)."""
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(sock_path)
        except OSError:
            return False
    return True


# The pid file of the libvirtd this test session started (None: it found one running, which it must not stop).
OWN_LIBVIRTD: list[Path] = []


def libvirtd_answers() -> bool:
    """Whether a libvirtd serves the system URI now."""
    return _answers("/run/libvirt/libvirt-sock")


def start_libvirtd(pidfile: Path) -> None:
    """Start libvirtd as a daemon writing ``pidfile``, and wait until it answers."""
    subprocess.run(["libvirtd", "-d", "-p", str(pidfile)], check=True)
    deadline = time.monotonic() + 30
    while not _answers("/run/libvirt/libvirt-sock"):
        assert time.monotonic() < deadline, "libvirtd did not start"
        time.sleep(0.1)


@pytest.fixture(scope="session")
def libvirtd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real libvirtd (and virtlogd) on the system URI: the one running, or one started here and stopped after."""
    uri = "qemu:///system"
    if _answers("/run/libvirt/libvirt-sock"):
        yield uri
        return
    # (a socket file left by a libvirtd that is gone, as after a session's processes are ended, answers
    # nothing: libvirtd replaces it when it starts)
    pids = tmp_path_factory.mktemp("libvirtd")
    started = ["libvirtd"]
    if not _answers("/run/libvirt/virtlogd-sock"):
        subprocess.run(["virtlogd", "-d", "-p", str(pids / "virtlogd.pid")], check=True)
        started.append("virtlogd")
    start_libvirtd(pids / "libvirtd.pid")
    OWN_LIBVIRTD.append(pids / "libvirtd.pid")
    yield uri
    for name in started:
        pid = int((pids / f"{name}.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)


def _free_port_pair() -> int:
    """A loopback port whose next port is free too (swtpm serves the TPM on one and its control on the next)."""
    import socket

    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def start_swtpm(state: Path, port: int | None = None) -> Swtpm:
    """Start swtpm on a free pair of loopback ports (retrying if another process takes one first), or on
    ``port`` (to restart a TPM: the same state and TCTI, the next TPM reset cycle)."""
    fixed = port
    for _attempt in range(50):
        port = fixed or _free_port_pair()
        proc = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
                                 "--server", f"type=tcp,port={port}", "--ctrl", f"type=tcp,port={port + 1}",
                                 "--flags", "not-need-init,startup-clear"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if wait_port(port, proc):
            return Swtpm(port, proc, state)
        proc.kill()
        proc.wait()
        time.sleep(0.1)
    raise RuntimeError("swtpm did not start")


def stop_swtpm(tpm: Swtpm) -> None:
    tpm.proc.terminate()
    tpm.proc.wait(timeout=10)


@pytest.fixture
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """A TPM of the test's own: a measurement log proves its PCR's whole history since the TPM was reset, so
    tests that each keep their own log cannot share one (each would see the others' extends as tampering)."""
    tpm = start_swtpm(tmp_path_factory.mktemp("swtpm"))
    yield tpm
    stop_swtpm(tpm)


@pytest.fixture(scope="session")
def busybox_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An OCI image layout of Debian's busybox, built with umoci."""
    out = tmp_path_factory.mktemp("images") / "busybox-oci"
    subprocess.run([REPO / "examples" / "busybox-image.sh", out, "latest"], check=True, capture_output=True)
    return out


def _our_processes(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and b"qemu" in cmdline.split(b"\0", 1)[0]:
            pids.append(int(entry.name))
    return pids


def net_snapshot() -> dict[str, set[str]]:
    """Host network state pods could leak: kvmrkt namespaces, veths, iptables rules naming a CNI container,
    kvmrkt-firewall's per-pod chains, and libvirt pods' taps left in the host's namespace (``kvmrkt.net.taps``)."""
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    return {
        "netns": {ln.split()[0] for ln in out("ip", "netns", "list").splitlines() if ln.startswith("kvmrkt-")},
        "veth": {link["ifname"] for link in json.loads(out("ip", "-j", "link", "show"))
                 if link["ifname"].startswith("veth")},
        "rules": {ln for ln in out("iptables-save").splitlines()
                  if (ln.startswith("-A") and 'id: \\"' in ln) or ln.startswith(":KVMRKT-")},
        "lent taps": {p.name for p in Path("/sys/class/net").glob("kvt*") if (p / "tun_flags").exists()},
    }


# The pods of this test session get cgroups of their own, so that sessions run side by side (by several
# developers' worktrees) do not count each other's pods as leaks.
CGROUP_PARENT = f"kvmrkt-test-{os.getpid()}"


@pytest.fixture(scope="session", autouse=True)
def _session_cgroups() -> Iterator[None]:
    yield
    for ctrl in ("memory", "cpu", "pids", "unified"):
        with contextlib.suppress(OSError):
            (Path("/sys/fs/cgroup") / ctrl / CGROUP_PARENT).rmdir()


def jail_leaks(data: Path) -> list[str]:
    """What pods of a data dir could leave behind on the host beyond networks: cgroups, mounts (the libvirt
    backend's bind mounts), grants on shared directories, jail directories, processes running as a jail uid."""
    leaks = []
    for ctrl in ("memory", "cpu", "pids"):
        base = Path("/sys/fs/cgroup") / ctrl / CGROUP_PARENT
        if base.is_dir():
            leaks += [str(d) for d in base.iterdir() if d.is_dir()]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        root, point = line.split()[3:5]
        # The libvirt backend binds a pod's files from the data dir to /run/kvmrkt/<uuid>; another session's
        # pods bind from theirs (the bind's root is the source path: the test dirs are on the root fs here).
        if point.startswith(str(data)) or (point.startswith("/run/kvmrkt/") and root.startswith(str(data))):
            leaks.append(f"mount {point}")
    grants = data / "jail" / "shares.json"
    if grants.exists() and json.loads(grants.read_text()):
        leaks.append(f"share grants {grants.read_text()}")
    return leaks


def net_leaks(before: dict[str, set[str]]) -> dict[str, set[str]]:
    """What exists now and did not in ``before``, less what belongs to another session's live pods (suites and
    benches run side by side on one host: their pods are not this test's leaks)."""
    now = net_snapshot()
    new = {k: v - before[k] for k, v in now.items() if v - before[k]}
    foreign = _foreign_pods() if new else set()
    if not foreign:
        return new
    names = {f"kvmrkt-{u}" for u in foreign}
    ids = {str(ns.get("id")) for ns in json.loads(_out("ip", "-j", "netns", "list") or "[]") if ns["name"] in names}
    veths = {link["ifname"] for link in json.loads(_out("ip", "-j", "link", "show"))
             if str(link.get("link_netnsid")) in ids}
    rules = {ln for ln in new.get("rules", set()) if any(f'id: \\"{u}\\"' in ln for u in foreign)}
    chains = {m.group(1) for ln in rules for m in [re.search(r"-j (KVMRKT-[0-9A-F]+)", ln)] if m}
    theirs = {"netns": names, "veth": veths, "lent taps": {p for p in new.get("lent taps", set())
                                                           if any(p.startswith(f"kvt{u.replace('-', '')[:10]}")
                                                                  for u in foreign)},
              "rules": rules | {ln for ln in new.get("rules", set()) if ln.split()[0][1:] in chains}}
    new = {k: v - theirs.get(k, set()) for k, v in new.items()}
    return {k: v for k, v in new.items() if v}


def _out(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


POD_DIR = re.compile(r"/pods/[a-z-]+/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})(/|$)")
SESSION_TMP: list[str] = []  # this test session's temporary base directory (every test's data dir is under it)


@pytest.fixture(scope="session", autouse=True)
def _session_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    SESSION_TMP.append(str(tmp_path_factory.getbasetemp()))


def _foreign_pods() -> set[str]:
    """The uuids of pods whose directory a live process holds open outside this session's temporary directory
    (a pod's supervising ``kvmrkt`` holds its directory locked from its creation to its end)."""
    found: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            m = POD_DIR.search(target)
            if m and not any(target.startswith(base) for base in SESSION_TMP):
                found.add(m.group(1))
    return found


@dataclass
class Result:
    rc: int
    out: str
    err: str


@dataclass
class Kvmrkt:
    """Runs the kvmrkt CLI against a private data dir and config dir."""

    data: Path
    config: Path
    tcti: str = ""
    backend: str = "qemu"
    image: str = "busybox:latest"
    templates: Path | None = None  # pods start from VM templates kept there (else: templates off, pods boot)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "kvmrkt", "--dir", str(self.data), "--config-dir", str(self.config), *args]

    def __call__(self, *args: str, input: str | None = None, timeout: float = 120) -> Result:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, input=input, timeout=timeout,
                              cwd=REPO)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def ok(self, *args: str, **kw: object) -> Result:
        res = self(*args, **kw)  # type: ignore[arg-type]
        assert res.rc == 0, f"kvmrkt {' '.join(args)} failed ({res.rc}):\n{res.out}\n{res.err}"
        return res

    def start(self, *args: str) -> subprocess.Popen[str]:
        """Start a long-running kvmrkt command in the background."""
        proc = subprocess.Popen(self.argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=REPO)
        self.procs.append(proc)
        return proc

    def write_config(self, text: str) -> None:
        """Write config.toml; every test config measures into the test's swtpm, with the event log in the data
        directory, runs pods without a network unless it says otherwise (tests/integration/test_network.py
        asks for networks explicitly), and boots every pod unless ``templates`` names where its VM templates are
        (a test's pods never pick up templates built elsewhere on the host)."""
        if "[measure]" not in text:
            text += f'\n[measure]\ntcti = "{self.tcti}"\n'
        if "log_dir" not in text:
            text = text.replace("[measure]\n", f'[measure]\nlog_dir = "{self.data / "measure"}"\n', 1)
        if "[network]" not in text:
            text += '\n[network]\ndefault = "none"\n'
        if "cgroup_parent" not in text:
            text = text.replace("[jail]\n", f'[jail]\ncgroup_parent = "{CGROUP_PARENT}"\n', 1) if "[jail]\n" in \
                text else text + f'\n[jail]\ncgroup_parent = "{CGROUP_PARENT}"\n'
        line = "" if re.search(r"^templates(_dir)? *=", text, re.M) else (
            f'templates_dir = "{self.templates}"\n' if self.templates else "templates = false\n")
        if self.backend != "qemu":
            line += f'backend = "{self.backend}"\n'
        if line:
            text = text.replace("[stage1]\n", "[stage1]\n" + line, 1) if "[stage1]\n" in text else (
                text + "\n[stage1]\n" + line)
        (self.config / "config.toml").write_text(text)

    def wait_running(self, uuid_file: Path, timeout: float = 60) -> str:
        """Wait until a pod started in the background has its apps running; return its UUID."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if uuid_file.exists() and uuid_file.read_text().strip():
                uuid = uuid_file.read_text().strip()
                st = self("status", "--format", "json", uuid)
                if st.rc == 0 and '"state": "running"' in st.out:
                    guest = self.data / "pods" / "run" / uuid / "guest-status"
                    if guest.exists() and "START" in guest.read_text():
                        return uuid
            time.sleep(0.1)
        raise AssertionError("pod did not start in time")


def use_backend(kvmrkt: Kvmrkt, request: pytest.FixtureRequest, backend: str) -> Kvmrkt:
    """Point a test's kvmrkt at a stage1 backend (starting libvirtd for ``libvirt``); ``qemu-template``: the
    qemu backend with pods restored from VM templates (``vm_templates``) where their shape has one."""
    if backend == "libvirt":
        request.getfixturevalue("libvirtd")
    if backend == "qemu-template":
        backend, kvmrkt.templates = "qemu", request.getfixturevalue("vm_templates")
    kvmrkt.backend = backend
    kvmrkt.write_config(BASE_CONFIG)
    if kvmrkt.templates and not any(kvmrkt.templates.glob("*/template.json")):
        # The shape of a plain one-app pod: booted once (which records it), then built.
        kvmrkt.ok("run", "busybox", "--exec", "/bin/true")
        kvmrkt.ok("stage1", "template", "build")
    return kvmrkt


@pytest.fixture(scope="session")
def vm_templates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where a test session keeps its VM templates (root-only, as kvmrkt requires)."""
    path = tmp_path_factory.mktemp("templates")
    path.chmod(0o700)
    return path


def wait_output(kvmrkt: Kvmrkt, uuid: str, text: str, app: str = "busybox", timeout: float = 30) -> None:
    """Wait until an app of a running pod has written ``text`` to its stdout (e.g. a handler is installed)."""
    log = kvmrkt.data / "pods" / "run" / uuid / "logs" / f"{app}.stdout"
    deadline = time.monotonic() + timeout
    while not (log.exists() and text in log.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"{app} did not print {text!r}"
        time.sleep(0.05)


BASE_CONFIG = """
[stage1]
accel = "auto"
stop_timeout = 3
boot_timeout = 60
"""


@pytest.fixture
def kvmrkt(tmp_path: Path, busybox_layout: Path, swtpm: Swtpm) -> Iterator[Kvmrkt]:
    before = net_snapshot()
    data, config = tmp_path / "data", tmp_path / "etc"
    config.mkdir()
    k = Kvmrkt(data, config, swtpm.tcti)
    k.write_config(BASE_CONFIG)
    # These tests are about running images, not about trusting them (tests/integration/test_trust.py is).
    (config / "policy.json").write_text('{"default": [{"type": "insecureAcceptAnything"}]}')
    k.ok("image", "import", f"oci:{busybox_layout}:latest", "--name", "busybox")
    yield k
    for proc in k.procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    # A killed `kvmrkt run` may leave a libvirt domain behind, which gc (as an operator would run it) removes.
    k("gc", "--grace-period=0s")
    time.sleep(0.2)
    leaked = _our_processes(str(data))
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert not leaked, f"leaked QEMU processes {leaked}"
    assert not net_leaks(before), f"leaked host network state {net_leaks(before)}"
    assert not jail_leaks(data), f"leaked jail state {jail_leaks(data)}"


SCHEMA_DIR = Path("/usr/share/gocode/src/github.com/opencontainers/runtime-spec/schema")


def state_schema() -> dict[str, Any]:
    """runtime-spec's state-schema.json with its references to defs.json inlined."""
    defs = json.loads((SCHEMA_DIR / "defs.json").read_text())["definitions"]
    schema: dict[str, Any] = json.loads((SCHEMA_DIR / "state-schema.json").read_text())

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith(("defs.json#/definitions/", "#/definitions/")):  # within defs.json, refs are local
                return inline(defs[ref.rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    return dict(inline(schema))


@dataclass
class Oci:
    """kvmrkt-oci with the test's config and data dirs, reachable as one executable (for ctr and podman)."""

    kvmrkt: Kvmrkt
    binary: Path
    root: Path
    busybox_layout: Path

    def __call__(
        self, *args: str, stdout: Any = subprocess.PIPE, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.binary), "--root", str(self.root), *args], stdout=stdout, input=input,
                              stderr=subprocess.PIPE, text=True, timeout=timeout, check=False)

    def create(self, cid: str, bundle: Path, *, stdin: Any = subprocess.DEVNULL,
               flags: tuple[str, ...] = ()) -> tuple[int, Path, Path]:
        """``create`` with the container's stdout/stderr in files (the supervisor keeps them open, so pipes
        would not reach EOF); returns the exit code and the two files."""
        out, err = bundle.parent / f"{cid}.out", bundle.parent / f"{cid}.err"
        with out.open("w") as o, err.open("w") as e:
            res = subprocess.run([str(self.binary), "--root", str(self.root), *flags, "create", "--bundle", str(bundle),
                                  "--pid-file", str(bundle.parent / f"{cid}.pid"), cid], stdin=stdin, stdout=o,
                                 stderr=e, timeout=120, check=False)
        return res.returncode, out, err

    def pid(self, cid: str, bundle: Path) -> int:
        return int((bundle.parent / f"{cid}.pid").read_text())

    def state(self, cid: str) -> dict[str, Any]:
        res = self("state", cid)
        assert res.returncode == 0, res.stderr
        doc: dict[str, Any] = json.loads(res.stdout)
        jsonschema.validate(doc, state_schema())
        return doc

    def bundle(self, path: Path, args: list[str], *, terminal: bool = False, **extra: Any) -> Path:
        """An OCI bundle unpacked by umoci from the busybox image, running ``args``."""
        subprocess.run(["umoci", "unpack", "--image", f"{self.busybox_layout}:latest", str(path)], check=True,
                       capture_output=True)
        cfg = json.loads((path / "config.json").read_text())
        cfg["process"].update({"args": args, "terminal": terminal})
        cfg.update(extra)
        (path / "config.json").write_text(json.dumps(cfg))
        return path

    def wait_status(self, cid: str, status: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.state(cid)
            if st["status"] == status or time.monotonic() > deadline:
                return st
            time.sleep(0.05)


@pytest.fixture
def oci(kvmrkt: Kvmrkt, tmp_path: Path, busybox_layout: Path) -> Iterator[Oci]:
    binary = tmp_path / "kvmrkt-oci"
    # podman cleans the environment of the runtime it starts: the tree under test is named in the script.
    pythonpath = f"export PYTHONPATH={shlex.quote(os.environ['PYTHONPATH'])}\n" if os.environ.get("PYTHONPATH") else ""
    binary.write_text(f"#!/bin/sh\n{pythonpath}exec {Path(sys.executable).parent / 'kvmrkt-oci'} "
                      f"--config-dir {kvmrkt.config} --dir {kvmrkt.data} \"$@\"\n")
    binary.chmod(0o755)
    o = Oci(kvmrkt, binary, tmp_path / "oci-root", busybox_layout)
    yield o
    for st in json.loads(o("list", "--format", "json").stdout or "[]"):
        o("delete", "--force", st["id"])


def go_tool(request: pytest.FixtureRequest, name: str) -> Path:
    """The cache directory of a Go test tool built by tests/tools/build_go_tools.py (``make setup``): a skip with
    the reason if it is not built, a failure under --require-capabilities. Tests never build it themselves."""
    path = cached(name)
    if path is None:
        reason = f"{name} is not built (run `make setup`, or tests/tools/build_go_tools.py)"
        if request.config.getoption("--require-capabilities"):
            pytest.fail(f"required capability missing: {reason}")
        pytest.skip(f"missing capability: {reason}")
    return path


@pytest.fixture
def cri(oci: Oci, request: pytest.FixtureRequest) -> Iterator[CriNode]:
    """A private containerd with the CRI plugin in a network namespace of its own (the node), handlers ``runc``
    and ``kvmrkt`` (this test's kvmrkt-oci), and crictl; torn down by pid, and anything left is a failure.
    kvmrkt-oci runs in the node's namespace, where the test's TPM on loopback is out of reach: the test measures
    into a TPM of its own on a unix socket instead (reachable from any network namespace)."""
    crictl = go_tool(request, "cri-tools") / "bin" / "crictl"
    tpm_dir = Path(tempfile.mkdtemp(prefix="kvmrkt-cri-tpm-"))
    sock = tpm_dir / "tpm"
    tpm = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={tpm_dir}", "--server",
                            f"type=unixio,path={sock}", "--ctrl", f"type=unixio,path={sock}.ctrl", "--flags",
                            "not-need-init,startup-clear"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: sock.exists() and Path(f"{sock}.ctrl").exists(), timeout=10, interval=0.02)
        oci.kvmrkt.tcti = f"swtpm:path={sock}"
        oci.kvmrkt.write_config(BASE_CONFIG)
        node = CriNode.start(Path(f"/tmp/kvmrkt-cri-{os.getpid()}"), crictl, oci.binary)
        yield node
        node.stop()
        assert not node.leaks, f"the CRI node had to clean up after the test: {node.leaks}"
    finally:
        tpm.terminate()
        tpm.wait(timeout=10)
        shutil.rmtree(tpm_dir, ignore_errors=True)
