import io
import logging
import os

from agent.log import setup_logging


def test_journald_lines_carry_priority(monkeypatch, tmp_path):
    out = open(tmp_path / "journal", "w+")
    st = os.fstat(out.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    setup_logging("INFO", stream=out)
    logging.getLogger("compute_agent.test").warning("claim %s expired\nsecond line", "m-1")
    logging.getLogger("compute_agent.test").debug("hidden")
    out.flush()
    out.seek(0)
    assert out.read().splitlines() == [
        "<4>compute_agent.test: claim m-1 expired",
        "<4>second line",
    ]


def test_terminal_format(monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup_logging("DEBUG", stream=out)
    logging.getLogger("compute_agent.x").error("boom")
    assert "ERROR compute_agent.x: boom" in out.getvalue()


def test_journal_stream_of_another_file_is_ignored(monkeypatch, tmp_path):
    """A child whose stderr was redirected keeps JOURNAL_STREAM but must not write <N> prefixes."""
    other = open(tmp_path / "other", "w")
    st = os.fstat(other.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    out = open(tmp_path / "redirected", "w+")
    setup_logging("INFO", stream=out)
    logging.getLogger("compute_agent.test").warning("plain")
    out.flush()
    out.seek(0)
    assert "<4>" not in out.read()
