"""Errors of the daemon's edges, under agent.errors' tree."""

from __future__ import annotations

from agent.errors import AgentError, InvalidInput


class NotifySocketError(InvalidInput):
    """NOTIFY_SOCKET or WATCHDOG_USEC holds something this agent cannot use (names the variable)."""

    code = "notify_socket_error"


class MetricsServerError(AgentError):
    """The metrics endpoint could not be served on the configured address."""

    code = "metrics_server_error"


class HotplugWatchError(AgentError):
    """The udev watcher could not start (netlink socket refused, thread already running)."""

    code = "hotplug_watch_error"
