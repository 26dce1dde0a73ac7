"""kvmrkt.demo_tpm, its pure part: which process is the demo's swtpm, and how config.toml is pointed at a TPM
(only in the [measure] table the demo wrote; nothing else changes). tests/integration/test_demo_tpm.py runs it."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from kvmrkt.demo_tpm import MARKER, plan_config, swtpm_port
from kvmrkt.errors import ConfigError

STATE = Path("/var/lib/kvmrkt/swtpm")
ARGV = ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={STATE}", "--server", "type=tcp,port=2323", "--ctrl",
        "type=tcp,port=2324", "--flags", "not-need-init,startup-clear", "--daemon", "--pid", f"file={STATE}/pid"]
T1, T2 = "swtpm:host=127.0.0.1,port=2321", "swtpm:host=127.0.0.1,port=2325"


def test_the_demos_swtpm_is_known_by_its_executable_and_state_directory() -> None:
    assert swtpm_port("/usr/bin/swtpm", ARGV, STATE) == 2323
    assert swtpm_port("/usr/bin/swtpm (deleted)", ["/usr/bin/swtpm", *ARGV[1:]], STATE) == 2323  # upgraded
    assert swtpm_port("/usr/bin/swtpm", ARGV, Path("/tmp/other")) is None  # another swtpm's state
    assert swtpm_port("/usr/bin/python3", ARGV, STATE) is None  # a process that only calls itself swtpm
    assert swtpm_port("/usr/bin/sleep", ["sleep", "100"], STATE) is None  # a pid reused after a reboot
    assert swtpm_port("/usr/bin/swtpm", [], STATE) is None
    unix = [*ARGV[:5], "--server", "type=unixio,path=/run/x", *ARGV[7:]]
    assert swtpm_port("/usr/bin/swtpm", unix, STATE) is None
    exposed = [*ARGV[:6], "type=tcp,port=2323,bindaddr=0.0.0.0", *ARGV[7:]]
    assert swtpm_port("/usr/bin/swtpm", exposed, STATE) is None
    no_ctrl = ARGV[:7]
    assert swtpm_port("/usr/bin/swtpm", no_ctrl, STATE) is None


def test_a_config_without_measure_gets_the_demos_marked_table_and_keeps_the_rest() -> None:
    old = '# managed by hand\n[stage1]\naccel = "auto"  # kept\n'
    plan = plan_config(old, T1, "config.toml")
    assert plan.text is not None and plan.text.startswith(old)
    assert plan.text[len(old):] == f'\n[measure]\n{MARKER}\ntcti = "{T1}"\npcr = 15\n'
    assert tomllib.loads(plan.text) == {"stage1": {"accel": "auto"}, "measure": {"tcti": T1, "pcr": 15}}
    assert plan_config("", T1, "config.toml").text == f'[measure]\n{MARKER}\ntcti = "{T1}"\npcr = 15\n'
    assert plan_config('x = 1', T1, "c").text == f'x = 1\n\n[measure]\n{MARKER}\ntcti = "{T1}"\npcr = 15\n'


def test_the_demos_own_table_follows_the_port_and_nothing_else_changes() -> None:
    old = (f'[stage1]\naccel = "auto"\n\n[measure]\n{MARKER}\ntcti = "{T1}"  # the demo\'s\npcr = 12\n'
           'log_dir = "/srv/measure"\n\n[network]\ndefault = "none"\n')
    plan = plan_config(old, T2, "config.toml")
    assert plan.text == old.replace(f'tcti = "{T1}"  # the demo\'s', f'tcti = "{T2}"')
    assert T1 in plan.message and T2 in plan.message
    same = plan_config(plan.text, T2, "config.toml")
    assert same.text is None and "already" in same.message


def test_what_the_demo_wrote_before_it_marked_its_table_is_its_own() -> None:
    legacy = f'\n[measure]\ntcti = "{T1}"\npcr = 15\n'
    assert plan_config(legacy, T2, "c").text == f'\n[measure]\n{MARKER}\ntcti = "{T2}"\npcr = 15\n'
    assert plan_config(legacy, T1, "c").text == f'\n[measure]\n{MARKER}\ntcti = "{T1}"\npcr = 15\n'


@pytest.mark.parametrize("table", [
    f'[measure]\ntcti = "{T1}"\npcr = 14\n',  # written by a config-management system
    '[measure]\ntcti = "device:/dev/tpmrm0"\n',
    f'[measure]\n# {MARKER}x\ntcti = "{T1}"\n',  # not the demo's line
    'measure.pcr = 15\n',  # no [measure] header: still someone's table
    "[measure]\npcr = 15\n",
])
def test_anyone_elses_measure_table_is_left_alone_and_named(table: str) -> None:
    plan = plan_config(f"{table}[stage1]\naccel = 'auto'\n", T2, "/etc/kvmrkt/config.toml")
    assert plan.text is None
    assert "did not write" in plan.message and "left unchanged" in plan.message
    named = tomllib.loads(table)["measure"].get("tcti")
    assert (f'"{named}"' if named else "no TPM") in plan.message
    assert ("will NOT measure into it" in plan.message) == (named != T2)


def test_a_file_it_cannot_edit_safely_is_refused() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        plan_config("[measure\n", T1, "c")
    # a multi-line tcti the line edit would tear: refused, not written
    with pytest.raises(ConfigError, match="without changing something else"):
        plan_config(f'[measure]\n{MARKER}\ntcti = """\n{T1}"""\n', T2, "c")
