"""One fake libvirt: errors with codes, a connection and domains, for tests that need no libvirtd.

The fakes answer the calls the agent makes (`agent.libvirt_ops`: inventory, host traits, migration)
and nothing else, so a new call shows up as an AttributeError in the test rather than a silent
default. For anything closer to libvirt, use its own test driver (`libvirt.open("test:///default")`).

- `FakeError(msg, code)`: a `libvirt.libvirtError` whose `get_error_code()` / `get_error_message()`
  answer like libvirt's (`agent.libvirt_ops.errors` reads them).
- `FakeDomain`: a source domain whose migration job follows a script of `jobStats()` results
  (see `job_stats`); with `xml=` / `xml_error=` it is also the inventory's domain.
- `FakeConn(*domains)`: lookups by name and UUID, `listAllDomains`, and host versions for
  `host_traits`. It has no event calls: the migration runner then polls only.
- `DestConn` / `DestDomain`: the destination's view of a migrating domain, which appears there once
  the job has ended.

Example::

    dom = FakeDomain([job_stats(300), job_stats(100)], "complete", clock=clock)
    conn = FakeConn(dom)
    assert lookup_domain(conn, DOMAIN_UUID) is dom
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import libvirt

__all__ = [
    "DOMAIN_NAME",
    "DOMAIN_UUID",
    "LIB_VERSION",
    "MiB",
    "QEMU_VERSION",
    "DestConn",
    "DestDomain",
    "FakeConn",
    "FakeDomain",
    "FakeError",
    "job_stats",
    "no_domain",
]

MiB = 1 << 20  # bytes: libvirt's job statistics count bytes
DOMAIN_NAME = "vm1"
DOMAIN_UUID = "6f1f5a62-8d4e-4c55-9a53-2f1c8d7e0a11"
# libvirt 9.0.0 and QEMU 7.2.0 (Debian 12), in libvirt's version encoding major*1e6 + minor*1e3 + micro
LIB_VERSION = 9_000_000
QEMU_VERSION = 7_002_000

Stats = dict[str, Any]


class FakeError(libvirt.libvirtError):
    """A libvirt error with a code, e.g. `FakeError("no domain", libvirt.VIR_ERR_NO_DOMAIN)`."""

    def __init__(self, msg: str, code: int = libvirt.VIR_ERR_INTERNAL_ERROR) -> None:
        Exception.__init__(self, msg)
        self._code, self._msg = code, msg

    def get_error_code(self) -> int:
        return self._code

    def get_error_message(self) -> str:
        return self._msg


def no_domain(key: str, value: str) -> FakeError:
    """libvirt's error for a lookup that found nothing, e.g. no_domain("uuid", "6f1f...")."""
    return FakeError(f"no domain with matching {key} '{value}'", libvirt.VIR_ERR_NO_DOMAIN)


def job_stats(
    remaining_mib: int,
    iteration: int = 1,
    total_mib: int = 512,
    throttle: int = 0,
    dirty: int = 0,
    *,
    elapsed_ms: int | None = None,
    **extra: Any,
) -> Stats:
    """One `jobStats()` result of a running (unbounded) migration job, memory in MiB; `elapsed_ms`
    adds `time_elapsed` (the job's age, which attach() reads), `extra` any other keys."""
    stats: Stats = {
        "type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED,
        "memory_total": total_mib * MiB,
        "memory_processed": (total_mib - remaining_mib) * MiB,
        "memory_remaining": remaining_mib * MiB,
        "memory_iteration": iteration,
        "memory_dirty_rate": dirty,
        "auto_converge_throttle": throttle,
    }
    if elapsed_ms is not None:
        stats["time_elapsed"] = elapsed_ms
    return {**stats, **extra}


_RUNNING = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED)
_SHUT_OFF = (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN)


class FakeDomain:
    """A source domain whose migration job follows a script.

    script: stats dicts returned by successive jobStats() polls; when exhausted, `end` happens:
    "complete", "fail" (migrateToURI3 raises) or "hang" (the last stats forever).
    After migrateStartPostCopy: `postcopy_script`, then `postcopy_end`. After suspend():
    `paused_script`, then `paused_end`. A job completed that no migrateToURI3 call of the test
    started (one followed with attach()) leaves the domain gone, as VIR_MIGRATE_UNDEFINE_SOURCE
    does. `calls` records the calls that matter to the monitor
    (not state(), so that it stays readable); `downtimes` the (clock time, ms) of each
    migrateSetMaxDowntime.

    For the inventory: `xml` is what XMLDesc returns (default: a minimal document naming the
    domain, with "<!--inactive-->" appended for VIR_DOMAIN_XML_INACTIVE), `xml_error` what it
    raises instead, `active=False` a defined but shut-off domain.
    """

    last: Stats  # the latest scripted poll, repeated by "hang" (a hang before any poll is a test bug)

    def __init__(
        self,
        script: Any = (),
        end: str = "complete",
        *,
        postcopy_script: Any = (),
        postcopy_end: str = "complete",
        paused_script: Any = (),
        paused_end: str = "complete",
        memory_mib: int = 512,
        clock: Callable[[], float] | None = None,
        completed_stats: Stats | None = None,
        name: str = DOMAIN_NAME,
        uuid: str = DOMAIN_UUID,
        active: bool = True,
        xml: str | None = None,
        xml_error: BaseException | None = None,
    ) -> None:
        self.uuid, self.dom_name = uuid, name
        self.state_ = _RUNNING if active else _SHUT_OFF
        self.script, self.end = list(script), end
        self.postcopy_script, self.postcopy_end = list(postcopy_script), postcopy_end
        self.paused_script, self.paused_end = list(paused_script), paused_end
        self.memory_kib = memory_mib * 1024
        self.clock = clock
        self.completed_stats = completed_stats
        self.xml, self.xml_error = xml, xml_error
        self.calls: list[tuple[Any, ...]] = []
        self.downtimes: list[tuple[float, int]] = []
        self._release = threading.Event()
        self._error: BaseException | None = None
        self.finished = False
        self.gone = False
        self.mode = "precopy"
        self.migrate_args: tuple[str, dict[str, Any], int] | None = None

    # identity
    def name(self) -> str:
        return self.dom_name

    def UUIDString(self) -> str:
        return self.uuid

    def state(self, flags: int = 0) -> list[int]:
        if self.gone:
            raise FakeError("domain gone", libvirt.VIR_ERR_NO_DOMAIN)
        return list(self.state_)

    def isPersistent(self) -> bool:
        return True

    def isActive(self) -> bool:
        return self.state_[0] in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED)

    def maxMemory(self) -> int:
        return self.memory_kib

    def XMLDesc(self, flags: int = 0) -> str:
        self.calls.append(("XMLDesc", flags))
        if self.xml_error is not None:
            raise self.xml_error
        if self.xml is not None:
            return self.xml
        inactive = "<!--inactive-->" if flags & libvirt.VIR_DOMAIN_XML_INACTIVE else ""
        return f"<domain><name>{self.dom_name}</name></domain>{inactive}"

    # the job
    def migrateToURI3(self, uri: str, params: dict[str, Any], flags: int) -> int:
        self.calls.append(("migrateToURI3", uri, flags))
        self.migrate_args = (uri, params, flags)
        self._release.wait(30)
        if self._error is not None:
            raise self._error
        self.gone = True
        return 0

    def _finish(self, error: BaseException | None = None) -> None:
        self.finished = True
        self._error = error
        if error is None and self.migrate_args is None:
            self.gone = True  # a job not started here (attach): the source is undefined at its end
        self._release.set()

    def jobStats(self, flags: int = 0) -> Stats:
        self.calls.append(("jobStats", flags))
        if flags & libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED:
            if self.completed_stats is None:
                raise FakeError("domain gone", libvirt.VIR_ERR_NO_DOMAIN)
            return dict(self.completed_stats)
        if self.finished:
            return {"type": libvirt.VIR_DOMAIN_JOB_NONE}
        return self._next_stats()

    def _next_stats(self) -> Stats:
        """The next scripted poll of the current phase, or the phase's end once the script is spent."""
        script, end = self._phase()
        if script:
            self.last = script.pop(0)
            return dict(self.last)
        if end == "hang":
            return dict(self.last)
        if end == "fail":
            self._finish(FakeError("qemu unexpectedly closed the migration stream", libvirt.VIR_ERR_OPERATION_FAILED))
        else:
            self._finish()
        return {"type": libvirt.VIR_DOMAIN_JOB_NONE}

    def _phase(self) -> tuple[list[Stats], str]:
        if self.mode == "postcopy":
            return self.postcopy_script, self.postcopy_end
        if self.mode == "paused":
            return self.paused_script, self.paused_end
        return self.script, self.end

    def migrateSetMaxDowntime(self, ms: int, flags: int = 0) -> int:
        self.calls.append(("migrateSetMaxDowntime", ms))
        self.downtimes.append((self.clock() if self.clock else 0.0, ms))
        return 0

    def abortJob(self) -> int:
        self.calls.append(("abortJob",))
        self._finish(
            FakeError("operation aborted: migration out job: canceled by client", libvirt.VIR_ERR_OPERATION_ABORTED)
        )
        return 0

    def migrateStartPostCopy(self, flags: int = 0) -> int:
        self.calls.append(("migrateStartPostCopy",))
        self.mode = "postcopy"
        self.state_ = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_POSTCOPY)
        return 0

    def suspend(self) -> int:
        self.calls.append(("suspend",))
        self.mode = "paused"
        self.state_ = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER)
        return 0

    def resume(self) -> int:
        self.calls.append(("resume",))
        self.state_ = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_UNPAUSED)
        return 0

    def names(self) -> list[str]:
        """The names of the recorded calls, in order."""
        return [c[0] for c in self.calls]


class FakeConn:
    """A connection holding `domains`, e.g. FakeConn(dom, uri="qemu+tcp://src/system").

    `driver`, `lib_version` and `hv_version` answer getType / getLibVersion / getVersion (any
    object, to test nonsense); `host_error` is raised by those three instead (a lost connection).
    """

    def __init__(
        self,
        *domains: Any,
        uri: str = "fake:///source",
        driver: str = "QEMU",
        lib_version: object = LIB_VERSION,
        hv_version: object = QEMU_VERSION,
        host_error: BaseException | None = None,
    ) -> None:
        self.domains = list(domains)
        self.closed = 0
        self.uri = uri
        self.driver, self.lib_version, self.hv_version = driver, lib_version, hv_version
        self.host_error = host_error

    def getURI(self) -> str:
        return self.uri

    def lookupByName(self, name: str) -> Any:
        for d in self.domains:
            if d.name() == name:
                return d
        raise no_domain("name", name)

    def lookupByUUIDString(self, uuid: str) -> Any:
        for d in self.domains:
            if d.UUIDString() == uuid:
                return d
        raise no_domain("uuid", uuid)

    def listAllDomains(self, flags: int = 0) -> list[Any]:
        return list(self.domains)

    def getType(self) -> str:
        self._host_call()
        return self.driver

    def getLibVersion(self) -> object:
        self._host_call()
        return self.lib_version

    def getVersion(self) -> object:
        self._host_call()
        return self.hv_version

    def _host_call(self) -> None:
        if self.host_error is not None:
            raise self.host_error

    def close(self) -> int:
        self.closed += 1
        return 0


class DestConn(FakeConn):
    """Destination connection whose domains appear once `when()` is true (e.g. the job finished)."""

    def __init__(self, when: Callable[[], bool], *domains: Any) -> None:
        super().__init__(*domains)
        self.when = when

    def lookupByUUIDString(self, uuid: str) -> Any:
        if not self.when():
            raise no_domain("uuid", uuid)
        return super().lookupByUUIDString(uuid)


class DestDomain:
    """The migrated domain as the destination sees it: `active` / `persistent` answer isActive,
    isPersistent and state(), `undefined` records an undefine() (cleanup), jobStats() answers the
    completed job's statistics."""

    def __init__(self, active: bool = False, persistent: bool = True, *, uuid: str = DOMAIN_UUID) -> None:
        self.active, self.persistent, self.undefined = active, persistent, False
        self.uuid = uuid
        self.completed: Stats = {"type": libvirt.VIR_DOMAIN_JOB_COMPLETED, "downtime": 42, "memory_total": 512 * MiB}

    def name(self) -> str:
        return DOMAIN_NAME

    def UUIDString(self) -> str:
        return self.uuid

    def isActive(self) -> bool:
        return self.active

    def isPersistent(self) -> bool:
        return self.persistent

    def state(self, flags: int = 0) -> list[int]:
        """[state, reason]: running if active, else shut off; reason 0, libvirt's "unknown"."""
        return [libvirt.VIR_DOMAIN_RUNNING if self.active else libvirt.VIR_DOMAIN_SHUTOFF, 0]

    def undefine(self) -> None:
        self.undefined = True

    def jobStats(self, flags: int = 0) -> Stats:
        return dict(self.completed)
