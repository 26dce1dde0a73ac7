"""Build the third-party Go test tools (crictl; runtime-tools' oci-runtime-tool, runtimetest and validation suite).

Role: test infrastructure only, run by ``make setup``; nothing here is part of kvmrkt. The tools are built offline
from the vendored source tarballs in ``$KVMRKT_VENDOR_DIR`` (else ``tests/vendor``, committed) with Debian's Go and
cached under ``/var/cache/kvmrkt-test/<tarball sha256>/`` (built in a temporary directory and renamed into place,
so a cache directory is either complete or absent; a second run finds it and does nothing).

Trust boundary: the tarballs are trusted test inputs chosen by the developer; their digest names the cache entry,
so a changed tarball is rebuilt rather than confused with an old build.

Usage: ``python tests/tools/build_go_tools.py`` prints one line per tool with its cache directory;
``--print-dir NAME`` prints only the cache directory of ``cri-tools`` or ``runtime-tools`` (building if needed).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("KVMRKT_TEST_CACHE", "/var/cache/kvmrkt-test"))
GO_ENV = {"GOFLAGS": "-mod=vendor", "GOPROXY": "off", "GO111MODULE": "on", "CGO_ENABLED": "0"}


class ToolBuildError(Exception):
    """A tool could not be built: the message says what is missing or which build step failed."""


@dataclass(frozen=True)
class Tool:
    name: str
    tarball: str


TOOLS = (Tool("cri-tools", "cri-tools-1.26.1.tar.xz"), Tool("runtime-tools", "runtime-tools-0105384.tar.xz"))


def vendor_dir() -> Path:
    """``$KVMRKT_VENDOR_DIR``, else the copies committed in ``tests/vendor`` (a clean clone builds them offline)."""
    env = os.environ.get("KVMRKT_VENDOR_DIR")
    return Path(env) if env else REPO / "tests" / "vendor"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"build_go_tools: {msg}", flush=True)


def _go(src: Path, gocache: Path, *args: str) -> None:
    env = {**os.environ, **GO_ENV, "GOCACHE": str(gocache), "GOPATH": str(gocache.parent / "gopath"),
           "HOME": os.environ.get("HOME", "/root")}
    res = subprocess.run(["go", *args], cwd=src, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, check=False)
    if res.returncode != 0:
        raise ToolBuildError(f"`go {' '.join(args)}` failed in {src}:\n{res.stdout[-3000:]}")


def _build_cri_tools(src: Path, out: Path, gocache: Path) -> None:
    (out / "bin").mkdir()
    _log("  go build crictl (about 2 min on 2 cores)")
    _go(src, gocache, "build", "-o", str(out / "bin" / "crictl"), "./cmd/crictl")


def _build_runtime_tools(src: Path, out: Path, gocache: Path) -> None:
    (out / "bin").mkdir()
    (out / "validation").mkdir()
    _log("  go build oci-runtime-tool")
    _go(src, gocache, "build", "-o", str(out / "bin" / "oci-runtime-tool"), "./cmd/oci-runtime-tool")
    _log("  go build runtimetest (static)")
    _go(src, gocache, "build", "-tags", "netgo osusergo", "-ldflags", "-extldflags -static",
        "-o", str(out / "bin" / "runtimetest"), "./cmd/runtimetest")
    sources = sorted(p for p in (src / "validation").glob("*/*.go") if p.parent.name != "util")
    for i, go_file in enumerate(sources, 1):
        name = go_file.stem if len(list(go_file.parent.glob("*.go"))) > 1 else go_file.parent.name
        _log(f"  [{i}/{len(sources)}] validation/{name}.t")
        _go(src, gocache, "build", "-o", str(out / "validation" / f"{name}.t"), str(go_file.relative_to(src)))
    shutil.copy2(src / "rootfs-amd64.tar.gz", out / "rootfs-amd64.tar.gz")


BUILDERS = {"cri-tools": _build_cri_tools, "runtime-tools": _build_runtime_tools}


def _tarball(name: str) -> Path:
    (tool,) = (t for t in TOOLS if t.name == name)
    tarball = vendor_dir() / tool.tarball
    if not tarball.is_file():
        raise ToolBuildError(f"{tarball} is missing: set KVMRKT_VENDOR_DIR to the directory holding {tool.tarball}")
    return tarball


def cached(name: str) -> Path | None:
    """The cache directory of tool ``name`` if it is built, else None (tests use this: they never build)."""
    try:
        final = CACHE / sha256(_tarball(name))
    except ToolBuildError:
        return None
    return final if (final / "DONE").is_file() else None


def ensure(name: str) -> Path:
    """Return the cache directory holding tool ``name``'s binaries, building them first if they are not cached."""
    if done := cached(name):
        return done
    tarball = _tarball(name)
    final = CACHE / sha256(tarball)
    if not shutil.which("go"):
        raise ToolBuildError("go is not installed: install Debian's golang-go (make setup does)")
    CACHE.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _log(f"building {name} from {tarball} into {final}")
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=f".build-{name}-") as tmp:
        work = Path(tmp)
        (work / "src").mkdir()
        subprocess.run(["tar", "-xJf", str(tarball), "-C", str(work / "src"), "--no-same-owner"], check=True)
        (src,) = (work / "src").iterdir()
        out = work / "out"
        out.mkdir()
        BUILDERS[name](src, out, work / "gocache")
        (out / "DONE").write_text(f"{tarball.name}\n")
        if final.exists():  # an incomplete leftover (no DONE) from an older script: replace it
            shutil.rmtree(final)
        out.rename(final)
    _log(f"built {name} in {time.monotonic() - started:.0f} s")
    return final


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--print-dir", choices=[t.name for t in TOOLS], help="print only this tool's cache directory")
    args = ap.parse_args(argv)
    try:
        for tool in TOOLS:
            if args.print_dir and tool.name != args.print_dir:
                continue
            path = ensure(tool.name)
            print(path if args.print_dir else f"{tool.name}: {path}", flush=True)
    except ToolBuildError as exc:
        print(f"build_go_tools: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
