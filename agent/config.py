"""Agent configuration: an INI file (`/etc/compute-agent/compute-agent.conf`) read into frozen,
validated dataclasses. Every bad value raises ConfigError naming `[section] option`, so the daemon
refuses to start with a clear message instead of failing later.

Option names follow Nova's where the meaning is the same, so operators can carry values over.
"""

from __future__ import annotations

import configparser
import ipaddress
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal

from agent.cpuset import format_cpu_set, parse_cpu_set
from agent.errors import ConfigError
from agent.limits import MAX_CONFIG_FILE_BYTES
from agent.safe_io import read_bounded_text

DEFAULT_CONFIG_PATH = Path("/etc/compute-agent/compute-agent.conf")


@dataclass(frozen=True, slots=True)
class ComputeConfig:
    """[compute]: what the operator sets aside and how much may be overcommitted."""

    cpu_dedicated_set: frozenset[int] | None = None
    cpu_shared_set: frozenset[int] | None = None
    reserved_host_memory_mb: int = 512
    # "NODE:SIZE_KB:COUNT" entries, Nova's reserved_huge_pages in a compact form
    reserved_huge_pages: tuple[tuple[int, int, int], ...] = ()
    cpu_allocation_ratio: float = 4.0
    ram_allocation_ratio: float = 1.0
    placement_preference: Literal["spread", "pack"] = "spread"


@dataclass(frozen=True, slots=True)
class LibvirtConfig:
    """[libvirt]: the connection and every live-migration tunable."""

    connection_uri: str = "qemu:///system"
    live_migration_permit_auto_converge: bool = False
    live_migration_permit_post_copy: bool = False
    live_migration_bandwidth_mib: int = 0  # 0 = unlimited
    live_migration_downtime_ms: int = 500  # target max downtime
    live_migration_downtime_steps: int = 10
    live_migration_downtime_delay_s: int = 75  # per GiB of RAM, between steps
    live_migration_completion_timeout_s: int = 800  # per GiB of RAM; 0 = none
    live_migration_timeout_action: Literal["abort", "force_complete"] = "abort"
    live_migration_auto_converge_initial: int = 20  # percent throttle
    live_migration_auto_converge_increment: int = 10
    live_migration_post_copy_bandwidth_mib: int = 0  # 0 = unlimited
    live_migration_poll_interval_s: float = 0.5
    # when an armed post-copy switch happens: on a stalled pre-copy, at the completion timeout, or
    # only by force_complete() / timeout action force_complete
    live_migration_postcopy_switch: Literal["on_stall", "on_timeout", "never"] = "on_timeout"
    live_migration_postcopy_recovery_s: int = 300  # resume a broken post-copy for this long; 0 = no resume
    live_migration_preflight_dirty_rate_s: int = 1  # measure the dirty rate before starting; 0 = skip


@dataclass(frozen=True, slots=True)
class ClaimsConfig:
    """[claims]: the durable destination ledger."""

    state_dir: Path = Path("/var/lib/compute-agent")
    claim_ttl_s: int = 300  # held claim never started -> expired
    # the longest TTL a caller may ask for; after damage, new claims wait this long (or
    # migrating_timeout_s, if longer) for every claim the damage may have hidden to end
    claim_ttl_max_s: int = 7200
    migrating_timeout_s: int = 1800  # migrating with no progress report -> expired
    retention_s: int = 7 * 24 * 3600  # terminal claims kept for audit
    reconcile_interval_s: int = 60


@dataclass(frozen=True, slots=True)
class BusConfig:
    """[bus]: the AMQP connection, signing keys and the limits of every message (docs/protocol.md)."""

    # several URLs separated by ";" = failover, tried in order (kombu's own syntax)
    transport_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    exchange_prefix: str = "compute-agent"
    key_file: Path = Path("/etc/compute-agent/bus.keys")
    heartbeat_s: int = 30  # kombu's default 0 silently turns heartbeats off
    call_timeout_s: float = 30.0
    max_clock_skew_s: float = 30.0
    max_message_bytes: int = 1 << 20
    prefetch_count: int = 64
    quorum_queues: bool = False  # true: x-queue-type quorum for the per-host queues (clusters)
    ssl: bool = False
    ssl_ca_file: Path | None = None
    ssl_cert_file: Path | None = None
    ssl_key_file: Path | None = None
    progress_interval_s: float = 1.0
    capabilities_interval_s: float = 60.0

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(u.strip() for u in self.transport_url.split(";") if u.strip())


@dataclass(frozen=True, slots=True)
class UpgradeLevelsConfig:
    """[upgrade_levels]: the highest RPC version sent to agents (Nova's section and option name)."""

    # "auto" = the lowest version the live agents advertise; or a pinned "major.minor"
    agent: str = "auto"


@dataclass(frozen=True, slots=True)
class WorkaroundsConfig:
    """[workarounds]: escape hatches for a rolling upgrade (Nova's option name)."""

    # below RPC 1.1 allow the legacy move of a NUMA instance (pinning copied as is, no claim);
    # ignored (and logged as deprecated) once every agent and the cap are at 1.1
    enable_numa_live_migration: bool = False


@dataclass(frozen=True, slots=True)
class OrchestratorConfig:
    """[orchestrator]: how `compute-agent migrate|drain|hosts` choose and wait."""

    migrate_max_retries: int = -1  # Nova's: alternates tried after the first refusal; -1 = all candidates
    discovery_timeout_s: float = 2.0  # how long a broadcast describe_host collects replies
    host_max_age_s: float = 180.0  # older host information is not live (3 capabilities intervals)
    claim_ttl_s: int = 300  # a destination claim lapses after this unless the migration starts


@dataclass(frozen=True, slots=True)
class AgentConfig:
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    claims: ClaimsConfig = field(default_factory=ClaimsConfig)
    bus: BusConfig = field(default_factory=BusConfig)
    upgrade_levels: UpgradeLevelsConfig = field(default_factory=UpgradeLevelsConfig)
    workarounds: WorkaroundsConfig = field(default_factory=WorkaroundsConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    host: str | None = None  # [DEFAULT] host: name published on the bus; default = hostname
    log_level: str = "INFO"
    metrics_listen: tuple[str, int] | None = None  # [DEFAULT] metrics_listen = host:port; None = no endpoint
    # the address peers reach this host at (Nova's my_ip): the published migration_uri tcp://<my_ip>
    # and, when connection_uri is local, libvirt_uri qemu+tcp://<my_ip>/system; None = resolve the host name
    my_ip: str | None = None
    max_concurrent_live_migrations: int = 1  # outbound (Nova's name); the rest wait in a queue
    max_concurrent_incoming_migrations: int = 2  # inbound claims held at once; beyond: Busy + retry_after


# --- reading ------------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


_UINT_RE = re.compile(r"[0-9]{1,19}")


def _uint(text: str) -> int:
    """A plain ASCII non-negative integer: int() would also take "1_0", "+3" and Unicode digits."""
    t = text.strip()
    if not _UINT_RE.fullmatch(t):
        raise ValueError(f"{t[:40]!r} is not a non-negative integer")
    return int(t)


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def conv(text: str) -> int:
        value = _uint(text)
        if not lo <= value <= hi:
            raise ValueError(f"{value} not in [{lo}, {hi}]")
        return value

    return conv


def _float_range(lo: float, hi: float, *, lo_inclusive: bool = False) -> Callable[[str], float]:
    def conv(text: str) -> float:
        value = float(text.strip())
        above_lo = lo <= value if lo_inclusive else lo < value
        if not math.isfinite(value) or not above_lo or not value <= hi:
            raise ValueError(f"{value} not in {'[' if lo_inclusive else '('}{lo}, {hi}]")
        return value

    return conv


def _choice(*allowed: str) -> Callable[[str], str]:
    def conv(text: str) -> str:
        value = text.strip().lower()
        if value not in allowed:
            raise ValueError(f"{text!r} is not one of {', '.join(allowed)}")
        return value

    return conv


def _reserved_pages(text: str) -> tuple[tuple[int, int, int], ...]:
    out: list[tuple[int, int, int]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 3:
            raise ValueError(f"bad entry {item[:40]!r} (want NODE:SIZE_KB:COUNT)")
        node, size, count = (_uint(x) for x in parts)
        if size <= 0:
            raise ValueError(f"bad entry {item!r} (want NODE:SIZE_KB:COUNT)")
        if any((node, size) == (n, s) for n, s, _ in out):
            raise ValueError(f"node {node} page size {size} KiB is listed twice")
        out.append((node, size, count))
    return tuple(out)


def _cpu_set_option(text: str) -> frozenset[int]:
    """A CPU set option: when given, it must select at least one CPU ("" or "0-3,^0-3" is a typo)."""
    cpus = parse_cpu_set(text)
    if not cpus:
        raise ValueError("selects no CPU")
    return cpus


def _abs_path(text: str) -> Path:
    path = Path(text.strip())
    if not text.strip() or not path.is_absolute():
        raise ValueError("must be an absolute path")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in str(path)):  # NUL: every open() fails later
        raise ValueError("must not contain control characters (NUL, newline, escapes)")
    return path


_TRANSPORT_URL_RE = re.compile(r"(?:amqps?|pyamqp)://[^\s;]+")
_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def _transport_url(text: str) -> str:
    """One or more AMQP URLs separated by ";" (failover); the value is kept as written."""
    urls = [u.strip() for u in text.split(";") if u.strip()]
    if not urls or len(urls) > 16:
        raise ValueError("want 1 to 16 amqp:// URLs separated by ';'")
    for i, url in enumerate(urls):
        if not _TRANSPORT_URL_RE.fullmatch(url):
            raise ValueError(f"URL {i + 1} is not amqp://user:password@host:port/vhost")
    return ";".join(urls)


def _exchange_prefix(text: str) -> str:
    value = text.strip()
    if not _PREFIX_RE.fullmatch(value):
        raise ValueError("want 1-100 characters of letters, digits, '_', '.', '-'")
    return value


_VERSION_RE = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}")


def _version_cap(text: str) -> str:
    """`auto` or a pinned RPC version `major.minor`."""
    value = text.strip().lower()
    if value != "auto" and not _VERSION_RE.fullmatch(value):
        raise ValueError("want auto or a version major.minor such as 1.0")
    return value


def _retries(text: str) -> int:
    """Nova's migrate_max_retries: -1 (every candidate) or 0..1000 (a fleet has fewer hosts to try)."""
    value = text.strip()
    return -1 if value == "-1" else _int_range(0, 1000)(value)


_BIG = 1 << 31
_CONVERTERS: dict[str, dict[str, Callable[[str], Any]]] = {
    "compute": {
        "cpu_dedicated_set": _cpu_set_option,
        "cpu_shared_set": _cpu_set_option,
        "reserved_host_memory_mb": _int_range(0, _BIG),
        "reserved_huge_pages": _reserved_pages,
        "cpu_allocation_ratio": _float_range(0.0, 1000.0),
        "ram_allocation_ratio": _float_range(0.0, 1000.0),
        "placement_preference": _choice("spread", "pack"),
    },
    "libvirt": {
        "connection_uri": str.strip,
        "live_migration_permit_auto_converge": parse_bool,
        "live_migration_permit_post_copy": parse_bool,
        "live_migration_bandwidth_mib": _int_range(0, 1 << 20),
        "live_migration_downtime_ms": _int_range(100, 1 << 20),
        "live_migration_downtime_steps": _int_range(1, 1000),
        "live_migration_downtime_delay_s": _int_range(1, 1 << 20),
        "live_migration_completion_timeout_s": _int_range(0, 1 << 20),
        "live_migration_timeout_action": _choice("abort", "force_complete"),
        "live_migration_auto_converge_initial": _int_range(1, 99),
        "live_migration_auto_converge_increment": _int_range(1, 99),
        "live_migration_post_copy_bandwidth_mib": _int_range(0, 1 << 20),
        "live_migration_poll_interval_s": _float_range(0.05, 60.0, lo_inclusive=True),
        "live_migration_postcopy_switch": _choice("on_stall", "on_timeout", "never"),
        "live_migration_postcopy_recovery_s": _int_range(0, 1 << 20),
        # libvirt's dirty-rate calculation takes whole seconds, 1..60
        "live_migration_preflight_dirty_rate_s": _int_range(0, 60),
    },
    "claims": {
        "state_dir": _abs_path,
        "claim_ttl_s": _int_range(1, _BIG),
        "claim_ttl_max_s": _int_range(1, 30 * 24 * 3600),  # a claim older than a month is forgotten, not held
        "migrating_timeout_s": _int_range(1, _BIG),
        "retention_s": _int_range(0, _BIG),
        "reconcile_interval_s": _int_range(1, _BIG),
    },
    "bus": {
        "transport_url": _transport_url,
        "exchange_prefix": _exchange_prefix,
        "key_file": _abs_path,
        "heartbeat_s": _int_range(1, 3600),
        "call_timeout_s": _float_range(0.0, 86400.0),
        "max_clock_skew_s": _float_range(0.0, 3600.0, lo_inclusive=True),
        "max_message_bytes": _int_range(4096, 64 << 20),  # our largest body (a host state) is tens of KiB
        "prefetch_count": _int_range(1, 65535),  # AMQP's basic.qos field is 16 bits
        "quorum_queues": parse_bool,
        "ssl": parse_bool,
        "ssl_ca_file": _abs_path,
        "ssl_cert_file": _abs_path,
        "ssl_key_file": _abs_path,
        "progress_interval_s": _float_range(0.05, 3600.0, lo_inclusive=True),
        "capabilities_interval_s": _float_range(1.0, 86400.0, lo_inclusive=True),
    },
    "upgrade_levels": {"agent": _version_cap},
    "workarounds": {"enable_numa_live_migration": parse_bool},
    "orchestrator": {
        "migrate_max_retries": _retries,
        "discovery_timeout_s": _float_range(0.05, 60.0, lo_inclusive=True),
        "host_max_age_s": _float_range(1.0, 86400.0, lo_inclusive=True),
        "claim_ttl_s": _int_range(1, 7 * 24 * 3600),  # the ledger's MAX_TTL_S
    },
}
# values never echoed in an error (a broker URL carries its password)
_SECRET_OPTIONS = frozenset({("bus", "transport_url")})
_SECTION_TYPES = {
    "compute": ComputeConfig,
    "libvirt": LibvirtConfig,
    "claims": ClaimsConfig,
    "bus": BusConfig,
    "upgrade_levels": UpgradeLevelsConfig,
    "workarounds": WorkaroundsConfig,
    "orchestrator": OrchestratorConfig,
}
_DEFAULT_OPTIONS = frozenset(
    {
        "host",
        "log_level",
        "metrics_listen",
        "my_ip",
        "max_concurrent_live_migrations",
        "max_concurrent_incoming_migrations",
    }
)
# concurrent migrations: each one is a full RAM copy over the migration link; 64 saturates any link
# (Nova's 0 = unlimited is not offered for that reason)
_MIGRATION_LIMIT = _int_range(1, 64)
# configparser copies [DEFAULT] into every section (and hides a section's own value of an option
# that [DEFAULT] also has from a naive "skip defaults" filter). We want none of that: [DEFAULT] is
# read as a plain section holding only _DEFAULT_OPTIONS, so name the parser's default section
# something no file can contain.
_NO_DEFAULT_SECTION = "\x00compute-agent: no default section"


def parse_listen_address(text: str) -> tuple[str, int] | None:
    """'127.0.0.1:9180' or '[::1]:9180' -> (host, port); '' -> None (off)."""
    value = text.strip()
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or (":" in host and not value.startswith("[")):
        raise ValueError("want host:port ([v6-address]:port for IPv6)")
    return host, _int_range(1, 65535)(port)


def load_config(path: str | Path | None = None, *, text: str | None = None) -> AgentConfig:
    """Read the config file (or `text`); a missing default file means all defaults."""
    read = _read_ini(path, text)
    if read is None:
        return AgentConfig()
    parser, source = read
    sections = {name: _read_section(parser, source, name, kind) for name, kind in _SECTION_TYPES.items()}
    extra = set(parser.sections()) - set(_SECTION_TYPES) - {"DEFAULT"}
    if extra:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(sorted(extra))}")
    defaults = _read_defaults(parser, source)
    _check_compute(sections["compute"], source)
    _check_claims(sections["claims"], source)
    _check_bus(sections["bus"], source)
    return AgentConfig(
        compute=sections["compute"],
        libvirt=sections["libvirt"],
        claims=sections["claims"],
        bus=sections["bus"],
        upgrade_levels=sections["upgrade_levels"],
        workarounds=sections["workarounds"],
        orchestrator=sections["orchestrator"],
        **defaults,
    )


def _check_compute(compute: ComputeConfig, source: str) -> None:
    """Rules between [compute] options (each option alone was checked by its converter)."""
    if compute.cpu_dedicated_set and compute.cpu_shared_set:
        both = compute.cpu_dedicated_set & compute.cpu_shared_set
        if both:
            raise ConfigError(
                f"{source}: [compute] cpu_dedicated_set and cpu_shared_set overlap on {format_cpu_set(both)}"
            )


def _check_claims(claims: ClaimsConfig, source: str) -> None:
    if claims.claim_ttl_s > claims.claim_ttl_max_s:
        raise ConfigError(
            f"{source}: [claims] claim_ttl_s = {claims.claim_ttl_s}: over claim_ttl_max_s ({claims.claim_ttl_max_s})"
        )


def _check_bus(bus: BusConfig, source: str) -> None:
    """Rules between [bus] options (each option alone was checked by its converter)."""
    if bus.ssl and bus.ssl_ca_file is None:
        raise ConfigError(f"{source}: [bus] ssl_ca_file: required when ssl = true (the broker's CA)")
    if (bus.ssl_cert_file is None) != (bus.ssl_key_file is None):
        raise ConfigError(f"{source}: [bus] ssl_cert_file and ssl_key_file: give both or neither")


def _config_error(message: str, path: str) -> ConfigError:
    return ConfigError(message)  # the message names the path already


def _read_ini(path: str | Path | None, text: str | None) -> tuple[configparser.ConfigParser, str] | None:
    """(the parsed file, its name for messages); None when the default file does not exist."""
    parser = configparser.ConfigParser(interpolation=None, default_section=_NO_DEFAULT_SECTION)
    source = "<text>" if text is not None else str(Path(path) if path is not None else DEFAULT_CONFIG_PATH)
    try:
        if text is not None:
            parser.read_string(text, source=source)
            return parser, source
        if not Path(source).exists():
            if path is not None:
                raise ConfigError(f"{source}: config file not found")
            return None
        content = read_bounded_text(source, limit=MAX_CONFIG_FILE_BYTES, what="config file", error=_config_error)
        parser.read_string(content, source=source)
    except configparser.Error as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    return parser, source


def _read_section(parser: configparser.ConfigParser, source: str, name: str, kind: type) -> Any:
    """One section as its dataclass; every option known and converted, else ConfigError naming it."""
    values: dict[str, Any] = {}
    if not parser.has_section(name):
        return kind()
    known = {f.name for f in fields(kind)}
    for option, raw in parser.items(name, raw=True):
        if option not in known:
            raise ConfigError(f"{source}: [{name}] {option}: unknown option")
        try:
            values[option] = _CONVERTERS[name][option](raw)
        except (ValueError, TypeError) as exc:
            shown = "<hidden>" if (name, option) in _SECRET_OPTIONS else repr(raw)
            raise ConfigError(f"{source}: [{name}] {option} = {shown}: {exc}") from None
    return kind(**values)


def _read_defaults(parser: configparser.ConfigParser, source: str) -> dict[str, Any]:
    """[DEFAULT]'s options as AgentConfig keywords; any option not in _DEFAULT_OPTIONS is refused."""
    defaults = dict(parser.items("DEFAULT", raw=True)) if parser.has_section("DEFAULT") else {}
    for option in sorted(set(defaults) - _DEFAULT_OPTIONS):
        raise ConfigError(
            f"{source}: [DEFAULT] {option}: unknown option (only {', '.join(sorted(_DEFAULT_OPTIONS))} "
            "belong in [DEFAULT]; put the others in their own section)"
        )
    log_level = defaults.get("log_level", "INFO").strip().upper()
    if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"{source}: [DEFAULT] log_level = {log_level!r}: not a log level")
    return {
        "host": (defaults.get("host") or "").strip() or None,
        "log_level": log_level,
        "metrics_listen": _default_option(source, defaults, "metrics_listen", parse_listen_address),
        "my_ip": _default_option(source, defaults, "my_ip", _ip_address),
        **{
            option: _default_option(source, defaults, option, _MIGRATION_LIMIT, _field_default(option))
            for option in ("max_concurrent_live_migrations", "max_concurrent_incoming_migrations")
        },
    }


def _field_default(option: str) -> Any:
    return next(f.default for f in fields(AgentConfig) if f.name == option)


def _ip_address(text: str) -> str | None:
    """An IPv4 or IPv6 address ('' = None: resolve the host name)."""
    value = text.strip()
    if not value:
        return None
    return str(ipaddress.ip_address(value))


def _default_option(
    source: str, defaults: dict[str, str], option: str, conv: Callable[[str], Any], default: Any = None
) -> Any:
    if default is not None and option not in defaults:
        return default
    try:
        return conv(defaults.get(option, ""))
    except ValueError as exc:
        raise ConfigError(f"{source}: [DEFAULT] {option} = {defaults[option]!r}: {exc}") from None
