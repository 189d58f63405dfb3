"""The notify protocol against real AF_UNIX datagram sockets the test owns (path and abstract)."""

import os
import socket
import time
import uuid

import pytest

from agent.daemon.errors import NotifySocketError
from agent.daemon.notify import Notifier


@pytest.fixture(params=["path", "abstract"])
def systemd_socket(request, tmp_path):
    """A bound datagram socket standing in for systemd: yields (NOTIFY_SOCKET value, socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        value = str(tmp_path / "notify")
        sock.bind(value)
    else:
        name = f"compute-agent-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        value = "@" + name
    sock.settimeout(2)
    yield value, sock
    sock.close()


def received(sock) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_states_reach_the_socket(systemd_socket):
    value, sock = systemd_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert notifier.ready("serving; 0 migrations out")
    assert received(sock) == ["READY=1", "STATUS=serving; 0 migrations out"]
    assert notifier.status("serving;\n2 migrations out")
    assert received(sock) == ["STATUS=serving; 2 migrations out"]
    assert notifier.watchdog()
    assert received(sock) == ["WATCHDOG=1"]
    assert notifier.stopping()
    assert received(sock) == ["STOPPING=1"]


def test_reloading_carries_the_monotonic_clock(systemd_socket):
    value, sock = systemd_socket
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    Notifier.from_env({"NOTIFY_SOCKET": value}).reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, monotonic = received(sock)
    assert reloading == "RELOADING=1"
    key, _, usec = monotonic.partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after


def test_no_socket_means_no_op():
    notifier = Notifier.from_env({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.ready() is False and notifier.watchdog() is False


def test_watchdog_interval_is_half_the_timeout():
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env(env).watchdog_interval_s() == 15.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s() == 15.0
    assert Notifier.from_env({"NOTIFY_SOCKET": "/run/x"}).watchdog_interval_s() is None


def test_watchdog_meant_for_another_process_is_not_ours():
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}
    assert Notifier.from_env(env, pid=4242).watchdog_interval_s() is None


@pytest.mark.parametrize(
    "env, name",
    [
        ({"NOTIFY_SOCKET": "relative/path"}, "NOTIFY_SOCKET"),
        ({"NOTIFY_SOCKET": "@"}, "NOTIFY_SOCKET"),
        ({"NOTIFY_SOCKET": "vsock:2:1234"}, "NOTIFY_SOCKET"),
        ({"WATCHDOG_USEC": "soon"}, "WATCHDOG_USEC"),
        ({"WATCHDOG_USEC": "10"}, "WATCHDOG_USEC"),
    ],
)
def test_bad_environment_is_a_typed_error_naming_the_variable(env, name):
    with pytest.raises(NotifySocketError, match=name):
        Notifier.from_env(env)


def test_a_vanished_socket_is_reported_not_raised(tmp_path, caplog):
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.ready() is False
    assert "cannot notify systemd" in caplog.text


def test_two_notifiers_talk_to_their_own_sockets(tmp_path):
    socks = []
    for name in ("a", "b"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(tmp_path / name))
        sock.settimeout(2)
        socks.append(sock)
    Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "a")}).status("agent a")
    Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "b")}).status("agent b")
    assert [received(s) for s in socks] == [["STATUS=agent a"], ["STATUS=agent b"]]
    for sock in socks:
        sock.close()
