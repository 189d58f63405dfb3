"""Typed errors of the libvirt edge (connections, domains, migration).

A raw ``libvirt.libvirtError`` never leaves this package: it is wrapped in one of the errors below,
which keep libvirt's numeric error code (``libvirt_code``, a ``VIR_ERR_*`` value) and its message
(``libvirt_message``) so callers can still tell "no such domain" from "connection refused".
"""

from __future__ import annotations

from typing import Any

from agent.errors import AgentError


def libvirt_error_details(exc: BaseException) -> tuple[int | None, str]:
    """(VIR_ERR_* code, message) of a libvirt.libvirtError (or (None, str(exc)) for anything else)."""
    code: int | None = None
    message = ""
    get_code = getattr(exc, "get_error_code", None)
    if callable(get_code):
        try:
            code = get_code()
        except Exception:  # noqa: BLE001 - a broken error object must not hide the original one
            code = None
    get_msg = getattr(exc, "get_error_message", None)
    if callable(get_msg):
        try:
            message = get_msg() or ""
        except Exception:  # noqa: BLE001
            message = ""
    if not message:
        message = str(exc) or type(exc).__name__
    return code, message


class LibvirtOpError(AgentError):
    """A libvirt operation failed; base of the errors below."""

    code = "libvirt_error"

    def __init__(self, message: str, *, libvirt_code: int | None = None, libvirt_message: str | None = None) -> None:
        super().__init__(message)
        self.libvirt_code = libvirt_code
        self.libvirt_message = libvirt_message

    @classmethod
    def from_libvirt(cls, what: str, exc: BaseException, **kwargs: Any) -> "LibvirtOpError":
        """Wrap a libvirtError: the message reads "<what>: <libvirt message> (libvirt error N)"."""
        code, message = libvirt_error_details(exc)
        suffix = f" (libvirt error {code})" if code is not None else ""
        return cls(f"{what}: {message}{suffix}", libvirt_code=code, libvirt_message=message, **kwargs)


class LibvirtConnectionError(LibvirtOpError):
    """Opening (or keeping) a connection to a libvirt daemon failed."""

    code = "libvirt_connection_error"

    def __init__(self, message: str, *, uri: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.uri = uri


class DomainNotFound(LibvirtOpError):
    """No domain with that name or UUID on the host."""

    code = "domain_not_found"

    def __init__(self, message: str, *, domain: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.domain = domain


class MigrationError(LibvirtOpError):
    """A live migration could not be started or controlled."""

    code = "migration_error"


class MigrationAbortRefused(MigrationError):
    """Abort asked for while the migration is in post-copy: the guest already runs on the
    destination and its memory is split between both hosts, so the job cannot be cancelled."""

    code = "migration_abort_refused"


class NoMigrationInProgress(MigrationError):
    """abort()/force_complete() called while no migration job is running."""

    code = "no_migration_in_progress"
