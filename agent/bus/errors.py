"""Every error the bus raises, drawn once:

    AgentError (agent.errors)
    ├── BusError                       something went wrong on this side of the wire
    │   ├── BusUnavailable             no broker reachable within the time allowed
    │   ├── CallTimeout                no reply before the call's timeout
    │   │   └── ReplyLost              no reply can come: its reply queue died in a reconnection
    │   ├── PublishNotConfirmed        the broker nacked a message or did not confirm it in time
    │   ├── VersionCapError            a call asks a version above the client's cap
    │   ├── VersionTooLow              a body field needs a newer version than the call is sent at
    │   └── KeyFileError               [bus] key_file missing, unreadable or malformed (names the line)
    └── RemoteError                    the other side answered {"ok": false, "error": {...}}
        ├── RemoteUnsupportedVersion   "UnsupportedVersion": major differs or minor too new (details: min, max)
        ├── RemoteNoSuchMethod         "NoSuchMethod": the agent has no such method
        ├── RemoteInvalidRequest       "InvalidRequest": the body is malformed (the message names the field)
        ├── RemoteNoFit                "NoFit": the instance does not fit (details: per-cell reasons)
        ├── RemoteBusy                 "Busy": try again after `retry_after` seconds
        ├── RemoteNotFound             "NotFound": no such instance, migration or claim
        ├── RemoteConflict             "Conflict": the request contradicts what the agent holds
        ├── RemoteRefused              "Refused": not allowed now (e.g. abort during post-copy)
        └── RemoteInternal             "Internal": the handler failed unexpectedly (logged on the agent)

The same `Remote*` classes serve both sides: a handler raises `RemoteBusy("inbound limit",
retry_after=5)`, the server turns it into the reply's error body, and the caller's `call()` raises
`RemoteBusy` again from `REMOTE_ERRORS` (an error type outside that fixed map arrives as a plain
`RemoteError` whose `type` says what it was). A traceback never crosses the wire.
"""

from __future__ import annotations

from typing import Any, Mapping

from agent.errors import AgentError


class BusError(AgentError):
    """A local failure of the bus (connection, timeout, confirm, keys)."""

    code = "bus_error"


class BusUnavailable(BusError):
    code = "bus_unavailable"


class CallTimeout(BusError):
    code = "call_timeout"


class ReplyLost(CallTimeout):
    """The call went out, but the reply queue it named was lost when the bus reconnected (an
    exclusive queue dies with its connection): no reply can come, so the caller learns it now
    instead of at its timeout. Unlike a timeout, the call may still be waiting to run (in the
    publisher or in the agent's queue): retry it (same operation id) to learn its outcome; never
    act as if it had not run."""

    code = "reply_lost"


class PublishNotConfirmed(BusError):
    code = "publish_not_confirmed"


class VersionCapError(BusError):
    code = "version_cap"


class VersionTooLow(BusError):
    """The body has a field the method gains only in a newer version than the call goes out at: the
    agent would ignore it (e.g. live_migrate's placement at 1.0), so the call is refused here."""

    code = "version_too_low"


class KeyFileError(BusError):
    code = "key_file_error"


class RemoteError(AgentError):
    """An error reply. `type` is the wire name; `details` is JSON the receiver may inspect."""

    code = "remote_error"
    wire_type = "RemoteError"  # the wire name of the class; a generic one keeps what it received

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        details: Mapping[str, Any] | None = None,
        type: str | None = None,  # noqa: A002 - the wire's own field name
    ) -> None:
        super().__init__(message)
        self.type = type or self.wire_type
        self.retry_after = retry_after
        self.details: dict[str, Any] = dict(details or {})

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message, "retry_after": self.retry_after, "details": self.details}


class RemoteUnsupportedVersion(RemoteError):
    wire_type = "UnsupportedVersion"


class RemoteNoSuchMethod(RemoteError):
    wire_type = "NoSuchMethod"


class RemoteInvalidRequest(RemoteError):
    wire_type = "InvalidRequest"


class RemoteNoFit(RemoteError):
    wire_type = "NoFit"


class RemoteBusy(RemoteError):
    wire_type = "Busy"


class RemoteNotFound(RemoteError):
    wire_type = "NotFound"


class RemoteConflict(RemoteError):
    wire_type = "Conflict"


class RemoteRefused(RemoteError):
    wire_type = "Refused"


class RemoteInternal(RemoteError):
    wire_type = "Internal"


#: The fixed map a client raises from: wire name -> class. Anything else is a plain RemoteError.
REMOTE_ERRORS: Mapping[str, type[RemoteError]] = {
    cls.wire_type: cls
    for cls in (
        RemoteUnsupportedVersion,
        RemoteNoSuchMethod,
        RemoteInvalidRequest,
        RemoteNoFit,
        RemoteBusy,
        RemoteNotFound,
        RemoteConflict,
        RemoteRefused,
        RemoteInternal,
    )
}


def remote_error_from_wire(error: Mapping[str, Any]) -> RemoteError:
    """The typed exception for a reply's `error` object (already schema-checked by the caller)."""
    wire_type = str(error.get("type") or "RemoteError")
    cls = REMOTE_ERRORS.get(wire_type, RemoteError)
    retry = error.get("retry_after")
    return cls(
        str(error.get("message") or ""),
        retry_after=float(retry) if isinstance(retry, (int, float)) else None,
        details=error.get("details") if isinstance(error.get("details"), dict) else None,
        type=wire_type,
    )
