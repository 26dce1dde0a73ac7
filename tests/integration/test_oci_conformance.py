"""The independent OCI conformance suite (opencontainers/runtime-tools `validation/`, 58 TAP programs, built by
tests/tools/build_go_tools.py) against kvmrkt-oci with its own rootfs. Every test named in
oci_conformance_expected.txt must pass (a failed one runs once more: some programs race any runtime); a test that
passes but is not named there is reported (a warning) so the list can grow. runc's count on the same machine:
`python tests/tools/oci_conformance.py --runtime runc`."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from tests.tools.oci_conformance import load_expected, print_result, run_suite, validation_names

from .conftest import Oci, go_tool

EXPECTED = Path(__file__).with_name("oci_conformance_expected.txt")
TIMEOUT = 60  # seconds per validation program (some hang on a broken runtime)


@pytest.mark.timeout(1200)  # the whole suite, one VM or more per program
def test_runtime_tools_validation_suite(oci: Oci, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    suite = go_tool(request, "runtime-tools")
    expected = load_expected(EXPECTED)
    assert not expected - set(validation_names(suite)), f"unknown names in {EXPECTED.name}"
    runtime = tmp_path / "kvmrkt-oci-rooted"  # the suite passes no --root: give it the test's state root
    runtime.write_text(f'#!/bin/sh\nexec {oci.binary} --root {oci.root} "$@"\n')
    runtime.chmod(0o755)

    results = run_suite(suite, runtime, tmp_path / "suite", timeout=TIMEOUT, report=print_result)

    passed = {r.name for r in results if r.status == "pass"}
    print(f"kvmrkt-oci passes {len(passed)} of {len(results)} runtime-tools validation tests")
    if passed - expected:
        warnings.warn(f"runtime-tools tests now passing, add them to {EXPECTED.name}: {sorted(passed - expected)}",
                      stacklevel=1)
    lost = [r for r in results if r.name in expected and r.status != "pass"]
    if lost:  # some programs race the runtime (killsig signals at once after start, before the shell set its
        # trap, which a TCG guest on a loaded host can lose): a listed test gets one more run, and is reported
        retried = run_suite(suite, runtime, tmp_path / "retry", timeout=TIMEOUT, names=[r.name for r in lost],
                            report=print_result)
        recovered = sorted(r.name for r in retried if r.status == "pass")
        if recovered:
            warnings.warn(f"runtime-tools tests that passed only when run again: {recovered}", stacklevel=1)
        lost = [r for r in retried if r.status != "pass"]
    assert not lost, "expected to pass but did not, twice:\n" + "\n\n".join(
        f"{r.name}: {r.status} {list(r.failed)}\n{r.output[-1500:]}" for r in lost)
