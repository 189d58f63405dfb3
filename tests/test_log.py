import io
import logging

from agent.log import setup_logging


def test_journald_lines_carry_priority(monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    out = io.StringIO()
    setup_logging("INFO", stream=out)
    logging.getLogger("compute_agent.test").warning("claim %s expired\nsecond line", "m-1")
    logging.getLogger("compute_agent.test").debug("hidden")
    assert out.getvalue().splitlines() == [
        "<4>compute_agent.test: claim m-1 expired",
        "<4>second line",
    ]


def test_terminal_format(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup_logging("DEBUG", stream=out)
    logging.getLogger("compute_agent.x").error("boom")
    assert "ERROR compute_agent.x: boom" in out.getvalue()
