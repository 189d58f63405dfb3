"""Bounded reads of input files (issue 12 item 9): regular files only, size checked before reading,
reads bounded, FIFOs and devices refused at once (never a hang, never a read until the OOM killer)."""

import os
import shutil
from pathlib import Path

import pytest

from agent.bus.errors import KeyFileError
from agent.bus.keys import Keyring
from agent.cli import main
from agent.config import load_config
from agent.errors import ConfigError, DiscoveryError
from agent.numa.discovery import discover_sysfs
from agent.safe_io import InputFileError, read_bounded, read_bounded_text, require_regular_file

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.timeout(20)  # a regression here is a hang: fail instead


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def test_regular_file_is_read_whole(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 100)
    assert read_bounded(tmp_path / "f", limit=100, what="test file") == b"x" * 100
    assert read_bounded_text(tmp_path / "f", limit=100, what="test file") == "x" * 100


def test_device_fifo_directory_and_socket_are_refused_naming_the_path(tmp_path, fifo):
    import socket

    sock_path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        for path, kind in (("/dev/zero", "character device"), (fifo, "FIFO"), (tmp_path, "directory")):
            with pytest.raises(InputFileError, match=kind) as exc:
                read_bounded(path, limit=10, what="test file")
            assert str(path) in str(exc.value) and exc.value.path == str(path)
        with pytest.raises(InputFileError, match=f"{sock_path}.*(socket|cannot read)"):
            read_bounded(sock_path, limit=10, what="test file")


def test_size_is_checked_before_reading(tmp_path, monkeypatch):
    big = tmp_path / "big"
    with open(big, "wb") as fh:
        fh.truncate(1 << 40)  # a sparse TiB: reading it would take forever
    reads = []
    monkeypatch.setattr(os, "read", lambda *a: reads.append(a) or b"")
    with pytest.raises(InputFileError, match=f"{big}: 1099511627776 bytes, larger than 1000"):
        read_bounded(big, limit=1000, what="test file")
    assert reads == []


def test_untrusted_size_still_bounds_the_read(tmp_path):
    (tmp_path / "f").write_bytes(b"y" * 5000)
    with pytest.raises(InputFileError, match="larger than 4096 bytes"):
        read_bounded(tmp_path / "f", limit=4096, what="sysfs file", trust_size=False)


def test_symlinks_refused_only_when_asked(tmp_path):
    (tmp_path / "f").write_text("ok")
    (tmp_path / "link").symlink_to(tmp_path / "f")
    assert read_bounded(tmp_path / "link", limit=10, what="f") == b"ok"
    with pytest.raises(InputFileError, match="symbolic link"):
        read_bounded(tmp_path / "link", limit=10, what="f", follow_symlinks=False)


def test_missing_and_undecodable(tmp_path):
    with pytest.raises(InputFileError, match="cannot read"):
        read_bounded(tmp_path / "nope", limit=10, what="f")
    (tmp_path / "bin").write_bytes(b"\xff\xfe")
    with pytest.raises(InputFileError, match="not utf-8 text"):
        read_bounded_text(tmp_path / "bin", limit=10, what="f")


# --- every input file of the agent -----------------------------------------------------------------


def test_fit_host_dev_zero_and_fifos_are_refused(capsys, tmp_path, fifo):
    good = tmp_path / "good.json"
    shutil.copy(FIXTURES / "sysfs" / "eight_nodes.expected.json", good)  # a valid host (state) document
    for host, inst in (("/dev/zero", good), (fifo, good), (good, fifo), (good, "/dev/zero")):
        rc = main(["fit", "--host", str(host), "--instance", str(inst)])
        _, err = capsys.readouterr()
        assert rc == 2 and "not a regular file" in err and "Traceback" not in err


def test_discover_capabilities_fifo_and_sysfs_fifo_are_refused(capsys, tmp_path, fifo):
    root = FIXTURES / "sysfs" / "eight_nodes"
    rc = main(["discover", "--sysfs-root", str(root), "--capabilities", str(fifo)])
    _, err = capsys.readouterr()
    assert rc == 2 and "capabilities file" in err and "FIFO" in err
    tree = tmp_path / "tree"
    shutil.copytree(root, tree)
    meminfo = tree / "devices/system/node/node0/meminfo"
    meminfo.unlink()
    os.mkfifo(meminfo)
    with pytest.raises(DiscoveryError, match=f"{meminfo}.*FIFO"):
        discover_sysfs(tree)
    rc = main(["discover", "--sysfs-root", str(tree)])
    _, err = capsys.readouterr()
    assert rc == 2 and "FIFO" in err


def test_config_fifo_and_device_are_config_errors(fifo):
    for path in (fifo, "/dev/zero"):
        with pytest.raises(ConfigError, match="not a regular file"):
            load_config(path)


def test_config_too_large(tmp_path):
    path = tmp_path / "big.conf"
    path.write_text("#" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        load_config(path)


def test_bus_key_file_fifo_is_refused(fifo):
    with pytest.raises(KeyFileError, match=f"{fifo}.*FIFO"):
        Keyring.from_file(fifo)


def test_require_regular_file_for_files_a_library_opens(tmp_path, fifo):
    """For the ledger: SQLite opens ledger.db itself; a FIFO of that name must be refused, not hang."""
    assert require_regular_file(tmp_path / "ledger.db", what="ledger") is None
    (tmp_path / "ledger.db").write_bytes(b"x" * 10)
    assert require_regular_file(tmp_path / "ledger.db", what="ledger").st_size == 10
    for path in (fifo, "/dev/zero", tmp_path):
        with pytest.raises(InputFileError, match="not a regular file"):
            require_regular_file(path, what="ledger")
