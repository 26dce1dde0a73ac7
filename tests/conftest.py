"""Test options shared by all tests: capability probing with skip-or-fail (``--require-capabilities``)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-capabilities",
        action="store_true",
        help="Fail (instead of skip) tests whose host capabilities (root, QEMU, umoci, guest assets) are missing. "
        "CI uses this so it can never go green by skipping.",
    )
