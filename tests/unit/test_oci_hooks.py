"""OCI hooks: strict parsing, refusals naming the field, and running (state on stdin, only the hook's env,
failures raised or warned, timeouts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvmrkt.errors import ConfigError, ManifestError
from kvmrkt.ocirt import hooks


def test_hooks_are_parsed_by_kind() -> None:
    parsed = hooks.parse({"hooks": {"prestart": [{"path": "/bin/true"}], "poststop": [
        {"path": "/bin/sh", "args": ["sh", "-c", "x"], "env": ["A=1"], "timeout": 5}], "createContainer": []}})
    assert parsed == {"prestart": (hooks.Hook("/bin/true", ("/bin/true",)),),
                      "poststop": (hooks.Hook("/bin/sh", ("sh", "-c", "x"), ("A=1",), 5),)}
    assert hooks.parse({}) == {} and hooks.parse({"hooks": None}) == {}


@pytest.mark.parametrize(("doc", "words"), [
    ({"hooks": []}, "hooks must be an object"),
    ({"hooks": {"prestart": {}}}, "hooks.prestart must be a list"),
    ({"hooks": {"prestart": [{"path": "true"}]}}, r"hooks.prestart\[0\].path must be an absolute path"),
    ({"hooks": {"poststart": [{"path": "/bin/true", "args": "x"}]}}, "args must be a list of strings"),
    ({"hooks": {"poststop": [{"path": "/bin/true", "env": ["NOEQUALS"]}]}}, "KEY=VALUE"),
    ({"hooks": {"prestart": [{"path": "/bin/true", "timeout": 0}]}}, "timeout must be a positive"),
    ({"hooks": {"createContainer": [{"path": "/bin/true"}]}}, "inside the VM"),
    ({"hooks": {"startContainer": [{"path": "/bin/true"}]}}, "inside the VM"),
    ({"hooks": {"preStart": [{"path": "/bin/true"}]}}, "unknown hook kind"),
])
def test_bad_hooks_are_refused(doc: dict[str, Any], words: str) -> None:
    with pytest.raises(ManifestError, match=words):
        hooks.parse(doc)


def test_a_hook_gets_the_state_on_stdin_and_only_its_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMRKT_NOT_FOR_HOOKS", "leaked")
    out = tmp_path / "out"
    h = hooks.parse({"hooks": {"prestart": [
        {"path": "/bin/sh", "args": ["sh", "-c", f'cat > {out}; echo "$A/${{KVMRKT_NOT_FOR_HOOKS:-none}}" >> {out}'],
         "env": ["A=1"]}]}})
    hooks.run(h, "prestart", {"id": "c1", "status": "created"})
    state, env = out.read_text().split("}", 1)
    assert json.loads(state + "}") == {"id": "c1", "status": "created"} and env.strip() == "1/none"


def test_a_failing_hook_raises_or_warns_and_the_next_runs(tmp_path: Path) -> None:
    h = hooks.parse({"hooks": {"poststop": [{"path": "/bin/sh", "args": ["sh", "-c", "echo bad >&2; exit 3"]},
                                            {"path": "/bin/sh", "args": ["sh", "-c", f"touch {tmp_path}/ran"]}]}})
    with pytest.raises(ConfigError, match=r"poststop hook 0 .*exited with status 3: bad"):
        hooks.run(h, "poststop", {})
    assert not (tmp_path / "ran").exists()
    warnings: list[str] = []
    hooks.run(h, "poststop", {}, warn=warnings.append)
    assert len(warnings) == 1 and "status 3" in warnings[0] and (tmp_path / "ran").exists()


def test_a_hook_past_its_timeout_is_killed() -> None:
    h = hooks.parse({"hooks": {"prestart": [{"path": "/bin/sleep", "args": ["sleep", "30"], "timeout": 1}]}})
    with pytest.raises(ConfigError, match="timeout of 1s"):
        hooks.run(h, "prestart", {})
    h = hooks.parse({"hooks": {"prestart": [{"path": "/nonexistent/hook"}]}})
    with pytest.raises(ConfigError, match="cannot run it"):
        hooks.run(h, "prestart", {})
