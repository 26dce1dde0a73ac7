"""The test tools' pure parts: TAP judging for the runtime-tools suite, the expected-pass list format, and the Go
tool cache (a missing tarball is a clear error; a cached build is reused without building)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tools import build_go_tools
from tests.tools.oci_conformance import classify, load_expected

PASSING = "TAP version 13\nok 1 - create MUST work\nok 2 - state\n1..2\n"


def test_a_tap_stream_passes_only_with_its_plan_met_no_failure_and_exit_0() -> None:
    assert classify(PASSING, 0) == ("pass", ())
    assert classify("ok 1 - a\nnot ok 2 - kill MUST signal\n1..2\n", 1) == ("fail", ("not ok 2 - kill MUST signal",))
    assert classify(PASSING, 1) == ("fail", ("exited 1",))
    assert classify("ok 1 - a\n1..2\n", 0) == ("fail", ("plan 2 but 1 results",))
    assert classify("TAP version 13\n", 0) == ("fail", ("plan None but 0 results",))
    assert classify("ok 1 - a\n", None) == ("timeout", ("timed out",))


def test_skips_and_todos() -> None:
    assert classify("1..1\nok 1 # skip cgroup v2 only\n", 0) == ("skip", ())
    assert classify("1..2\nok 1 # SKIP x\nok 2 - y\n", 0) == ("pass", ())
    assert classify("1..1\nnot ok 1 - z # TODO later\n", 0) == ("pass", ())


def test_expected_list_ignores_comments_and_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "e.txt"
    f.write_text("# a comment\ncreate\n\nstate  # passes since x\n")
    assert load_expected(f) == {"create", "state"}


def test_a_missing_tarball_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMRKT_VENDOR_DIR", str(tmp_path))
    with pytest.raises(build_go_tools.ToolBuildError, match="is missing: set KVMRKT_VENDOR_DIR"):
        build_go_tools.ensure("cri-tools")
    assert build_go_tools.cached("cri-tools") is None
    assert build_go_tools.main(["--print-dir", "cri-tools"]) == 1


def test_a_cached_build_is_reused_and_keyed_by_the_tarball(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMRKT_VENDOR_DIR", str(tmp_path))
    monkeypatch.setattr(build_go_tools, "CACHE", tmp_path / "cache")
    monkeypatch.setenv("PATH", "/nonexistent")  # no go: a cache hit must not need it
    tarball = tmp_path / "runtime-tools-0105384.tar.xz"
    tarball.write_bytes(b"v1")
    done = tmp_path / "cache" / build_go_tools.sha256(tarball)
    done.mkdir(parents=True)
    (done / "DONE").write_text("")
    assert build_go_tools.ensure("runtime-tools") == done == build_go_tools.cached("runtime-tools")
    tarball.write_bytes(b"v2")  # another tarball is another build
    assert build_go_tools.cached("runtime-tools") is None
    with pytest.raises(build_go_tools.ToolBuildError, match="go is not installed"):
        build_go_tools.ensure("runtime-tools")


def test_a_lifecycle_test_fails_by_its_error_diagnostic_or_warning_without_results() -> None:
    error = 'TAP version 13\n  ---\n  {\n    "error": "The prestart hooks MUST be invoked"\n  }\n  ...\n1..0\n'
    assert classify(error, 0) == ("fail", ('"error": "The prestart hooks MUST be invoked"',))
    assert classify("TAP version 13\nWARNING: The poststop hook invoke fails\n1..0\n", 0)[0] == "fail"
    assert classify("TAP version 13\n1..0\n", 0) == ("pass", ())  # the lifecycle ran as the spec says
    detail = 'ok 1 - state MUST error\n  ---\n  {\n    "error": "container does not exist"\n  }\n  ...\n1..1\n'
    assert classify(detail, 0) == ("pass", ())  # an expected error, detailed under its result
