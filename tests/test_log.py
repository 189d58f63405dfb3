import io
import logging
import os
import socket
import sys
import uuid

import pytest

from agent.log import (
    JournaldHandler,
    get_logger,
    journal_fields,
    journald_listening,
    log_context,
    set_log_level,
    setup_logging,
)
from tests.daemon.logging_support import compute_agent_logger_restored, journal_entries, journald_session


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


# --- structlog: bound fields on every record ------------------------------------------------------

compute_agent_logger = pytest.fixture(autouse=True)(compute_agent_logger_restored)
journald = pytest.fixture(scope="session")(journald_session)


def terminal(monkeypatch, level="DEBUG") -> io.StringIO:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup_logging(level, stream=out)
    return out


def test_bound_fields_follow_the_message_on_a_terminal(monkeypatch):
    out = terminal(monkeypatch)
    log = get_logger("compute_agent.migration", instance_uuid="u-1", migration_id="m-1")
    log.info("copying %s", "memory", phase="precopy", percent=42)
    assert (
        "INFO compute_agent.migration: copying memory migration_id=m-1 instance_uuid=u-1 phase=precopy percent=42"
        in (out.getvalue())
    )


def test_stdlib_callers_pass_fields_with_extra(monkeypatch):
    out = terminal(monkeypatch)
    logging.getLogger("compute_agent.claims").warning("claim %s expired", "c-1", extra={"claim_id": "c-1"})
    assert "WARNING compute_agent.claims: claim c-1 expired claim_id=c-1\n" in out.getvalue()


def test_log_context_tags_plain_stdlib_records_too(monkeypatch):
    out = terminal(monkeypatch)
    with log_context(migration_id="m-7"):
        logging.getLogger("compute_agent.libvirt").info("job started")
    logging.getLogger("compute_agent.libvirt").info("after")
    assert "job started migration_id=m-7" in out.getvalue()
    assert "after migration_id" not in out.getvalue()


def test_a_traceback_follows_its_record(monkeypatch):
    out = terminal(monkeypatch)
    try:
        raise ValueError("bad value")
    except ValueError:
        get_logger("compute_agent.x").exception("failed", code="bug")
    text = out.getvalue()
    assert "ERROR compute_agent.x: failed code=bug\nTraceback" in text and "ValueError: bad value" in text


def test_the_level_filters_structlog_loggers_too(monkeypatch):
    out = terminal(monkeypatch, level="INFO")
    get_logger("compute_agent.x").debug("hidden")
    set_log_level("DEBUG")
    get_logger("compute_agent.x").debug("shown")
    assert "hidden" not in out.getvalue() and "shown" in out.getvalue()


def test_two_agents_bind_their_own_fields(monkeypatch):
    out = terminal(monkeypatch)
    a = get_logger("compute_agent.daemon", host="hv-a")
    b = get_logger("compute_agent.daemon", host="hv-b")
    a.bind(migration_id="m-a").info("one")
    b.info("two")
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("one migration_id=m-a host=hv-a") and lines[1].endswith("two host=hv-b")


def test_journal_fields_are_upper_cased_and_sanitised():
    event = {"event": "m", "level": "warning", "logger": "compute_agent.x", "migration_id": "m-1", "a-b": 1, "_x": 2}
    fields = dict(journal_fields(event, "compute-agent"))
    assert fields["MESSAGE"] == "m" and fields["PRIORITY"] == 4 and fields["MIGRATION_ID"] == "m-1"
    assert fields["A_B"] == 1 and "_X" not in fields and "X" not in fields


# --- journald, for real -----------------------------------------------------------------------------


def test_records_reach_journald_natively_with_their_fields(journald):
    mid = f"m-{uuid.uuid4()}"
    assert isinstance(setup_logging("DEBUG", journal=True), JournaldHandler)
    log = get_logger("compute_agent.migration", migration_id=mid, instance_uuid="u-1", claim_id="c-1")
    log.bind(source_host="hv-a", dest_host="hv-b").info("progress", phase="precopy", percent=42)
    logging.getLogger("compute_agent.claims").warning("claim held\nfor %s", mid, extra={"migration_id": mid})
    with log_context(migration_id=mid, code="migration_failed"):
        try:
            raise RuntimeError("libvirt said no")
        except RuntimeError:
            logging.getLogger("compute_agent.libvirt").exception("migration failed")
    entries = journal_entries(f"MIGRATION_ID={mid}", expect=3)
    assert [e["MESSAGE"] for e in entries][:2] == ["progress", f"claim held\nfor {mid}"]
    progress, held, failed = entries
    assert progress["PRIORITY"] == "6" and progress["SYSLOG_IDENTIFIER"] == "compute-agent"
    assert {k: progress[k] for k in ("INSTANCE_UUID", "CLAIM_ID", "SOURCE_HOST", "DEST_HOST", "PHASE", "PERCENT")} == {
        "INSTANCE_UUID": "u-1",
        "CLAIM_ID": "c-1",
        "SOURCE_HOST": "hv-a",
        "DEST_HOST": "hv-b",
        "PHASE": "precopy",
        "PERCENT": "42",
    }
    assert progress["CODE_FUNC"] == "test_records_reach_journald_natively_with_their_fields"
    assert progress["_TRANSPORT"] == "journal" and progress["LOGGER"] == "compute_agent.migration"
    assert held["PRIORITY"] == "4" and held["CODE_FILE"].endswith("test_log.py")
    assert failed["PRIORITY"] == "3" and failed["CODE"] == "migration_failed"
    assert "RuntimeError: libvirt said no" in failed["MESSAGE"]


def test_our_stderr_being_the_journal_stream_means_native(journald, monkeypatch):
    st = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert isinstance(setup_logging("INFO"), JournaldHandler)
    mid = f"m-{uuid.uuid4()}"
    get_logger("compute_agent.x", migration_id=mid).info("auto")
    assert [e["MESSAGE"] for e in journal_entries(f"MIGRATION_ID={mid}", expect=1)] == ["auto"]


def test_a_socket_nobody_listens_on_is_not_journald(tmp_path):
    assert not journald_listening(tmp_path / "absent")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(tmp_path / "stale"))
    stale.close()  # the file stays, as after journald stopped
    assert not journald_listening(tmp_path / "stale")
    handler = setup_logging("INFO", journal=True, journal_socket=tmp_path / "stale", stream=io.StringIO())
    assert not isinstance(handler, JournaldHandler)


def test_records_journald_refuses_go_to_the_fallback_stream(tmp_path, monkeypatch):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "journal"))
    out = io.StringIO()
    handler = setup_logging("INFO", journal=True, journal_socket=tmp_path / "journal", stream=out)
    assert isinstance(handler, JournaldHandler)
    logging.getLogger("compute_agent.x").info("first")
    assert listener.recv(65536).startswith(b"MESSAGE=first\n")
    listener.close()  # journald went away
    logging.getLogger("compute_agent.x").info("second", extra={"claim_id": "c-2"})
    assert "INFO compute_agent.x: second claim_id=c-2" in out.getvalue()
