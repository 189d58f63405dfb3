"""Regression tests for hostile inputs outside the numa package (issue 12 item 13, and what the fuzz
targets in fuzz/ found): each case was a traceback or reached the operator's terminal raw."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from agent.cli import main
from agent.cli_output import console, print_error, print_warning, shown, table
from agent.config import load_config
from agent.errors import ConfigError

FIXTURES = Path(__file__).parent / "fixtures"
ESC = "\x1b"


@pytest.mark.parametrize("value", ["/var/lib/agent\x00x", "/var/lib/\x1b[2Jagent", "/var/lib/a\x7fb"])
def test_control_characters_in_state_dir_are_refused(value):
    with pytest.raises(ConfigError, match="state_dir.*control characters"):
        load_config(text=f"[claims]\nstate_dir = {value}\n")


def test_shown_escapes_controls_and_bidi_overrides():
    assert shown("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert shown("x\x9by\u202ez\n") == "x\\x9by\\u202ez\\x0a"
    assert shown("line 1\nline 2", multiline=True) == "line 1\nline 2"
    assert shown("plain é ü 中") == "plain é ü 中"


def test_tables_warnings_and_errors_never_print_raw_escapes():
    out, err = io.StringIO(), io.StringIO()
    screen = console(out, width=200)
    screen.print(table(f"host {ESC}]0;pwned\x07", [f"c{ESC}[31m"], [[f"reason {ESC}[2J"]]))
    print_warning(screen, "warning:", f"from {ESC}[1;1H")
    print_error("compute-agent", f"error: {ESC}[?1049h", err)
    for text in (out.getvalue(), err.getvalue()):
        assert ESC not in text and "\\x1b" in text


def test_discover_with_an_escape_in_the_hostname(capsys):
    root = FIXTURES / "sysfs" / "single_no_smt"
    rc = main(["discover", "--sysfs-root", str(root), "--hostname", f"hv{ESC}[2J"])
    out, _ = capsys.readouterr()
    assert rc == 0 and ESC not in out and "hv\\x1b[2J" in out
    rc = main(["discover", "--sysfs-root", str(root), "--hostname", f"hv{ESC}[2J", "--json"])
    out, _ = capsys.readouterr()
    assert rc == 0 and ESC not in out and json.loads(out)["hostname"] == f"hv{ESC}[2J"


def test_error_naming_a_path_with_an_escape(capsys, tmp_path):
    rc = main(["fit", "--host", str(tmp_path / f"no{ESC}[2Jsuch"), "--instance", "x"])
    _, err = capsys.readouterr()
    assert rc == 2 and ESC not in err and "\\x1b[2J" in err
