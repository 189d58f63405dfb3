"""Per-instance live-migration policy: auto-converge, post-copy or neither, and the libvirt flags,
typed parameters and host traits that go with it.

Pure: importable and usable without the libvirt module (the constants table below holds libvirt's
values; when the module is importable its own values are used, and a test checks they agree).
`agent.libvirt_ops.host.host_traits` applies the version table below to a connection.

Rules (metadata = flavor extra spec `compute:live_migration_{auto_converge,post_copy}` or image
property `compute_live_migration_{auto_converge,post_copy}`, already merged by parse_request into
MigrationWishes; host config = `[libvirt] live_migration_permit_{auto_converge,post_copy}`):

1. Both features explicitly true in the metadata -> PolicyConflict (parse_request rejects this
   first; re-checked here defensively).
2. A value in the metadata overrides the host config both ways: `false` disables a feature the
   host permits, `true` enables one the host does not permit.
3. When the metadata explicitly turns one feature on, the other one is not used unless the
   metadata turned it on too (i.e. a host-config-only permission for the other is ignored).
4. Without metadata the host config decides; when it permits both, post-copy is armed and
   auto-converge is not used.
5. A paused VM never gets post-copy. If post-copy would have been chosen for it, auto-converge is
   used only if auto-converge's own sources ask for it: the metadata says true, or the metadata is
   silent and the host config permits it (the "post-copy wins" tie-break of rules 3/4 no longer
   applies because post-copy is out of the picture).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from agent.config import LibvirtConfig
from agent.errors import InvalidRequest
from agent.numa.request import MigrationWishes

# --- libvirt constants ----------------------------------------------------------------------------

# virDomainMigrateFlags values from libvirt-domain.h (stable ABI). tests check them against the
# libvirt module when it is installed.
_FLAG_VALUES: dict[str, int] = {
    "VIR_MIGRATE_LIVE": 1 << 0,
    "VIR_MIGRATE_PEER2PEER": 1 << 1,
    "VIR_MIGRATE_PERSIST_DEST": 1 << 3,
    "VIR_MIGRATE_UNDEFINE_SOURCE": 1 << 4,
    "VIR_MIGRATE_AUTO_CONVERGE": 1 << 13,
    "VIR_MIGRATE_POSTCOPY": 1 << 15,
}
# virDomainMigrate3 typed-parameter names.
_PARAM_NAMES: dict[str, str] = {
    "VIR_MIGRATE_PARAM_URI": "migrate_uri",  # string
    "VIR_MIGRATE_PARAM_DEST_XML": "destination_xml",  # string
    "VIR_MIGRATE_PARAM_PERSIST_XML": "persistent_xml",  # string
    "VIR_MIGRATE_PARAM_BANDWIDTH": "bandwidth",  # ullong MiB/s
    "VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY": "bandwidth.postcopy",  # ullong MiB/s
    "VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL": "auto_converge.initial",  # int %
    "VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT": "auto_converge.increment",  # int %
}
# libvirt version each flag and parameter above appeared in ("Since:" in libvirt-domain.h), encoded
# as libvirt does: major * 1_000_000 + minor * 1_000 + micro. The four base flags predate migrate3.
LIBVIRT_SINCE: dict[str, int] = {
    "VIR_MIGRATE_AUTO_CONVERGE": 1_002_003,
    "VIR_MIGRATE_POSTCOPY": 1_003_003,
    "VIR_MIGRATE_PARAM_URI": 1_001_000,
    "VIR_MIGRATE_PARAM_DEST_XML": 1_001_000,
    "VIR_MIGRATE_PARAM_PERSIST_XML": 1_003_004,
    "VIR_MIGRATE_PARAM_BANDWIDTH": 1_001_000,
    "VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY": 5_001_000,
    "VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL": 2_000_000,
    "VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT": 2_000_000,
}


def _from_libvirt(table: dict[str, Any]) -> dict[str, Any]:
    try:
        import libvirt
    except ImportError:  # pragma: no cover - libvirt-python is a hard dependency in production
        return dict(table)
    return {name: getattr(libvirt, name, value) for name, value in table.items()}


FLAGS = _from_libvirt(_FLAG_VALUES)
PARAMS = _from_libvirt(_PARAM_NAMES)

VIR_MIGRATE_LIVE: int = FLAGS["VIR_MIGRATE_LIVE"]
VIR_MIGRATE_PEER2PEER: int = FLAGS["VIR_MIGRATE_PEER2PEER"]
VIR_MIGRATE_PERSIST_DEST: int = FLAGS["VIR_MIGRATE_PERSIST_DEST"]
VIR_MIGRATE_UNDEFINE_SOURCE: int = FLAGS["VIR_MIGRATE_UNDEFINE_SOURCE"]
VIR_MIGRATE_AUTO_CONVERGE: int = FLAGS["VIR_MIGRATE_AUTO_CONVERGE"]
VIR_MIGRATE_POSTCOPY: int = FLAGS["VIR_MIGRATE_POSTCOPY"]

# the parameter names in _PARAM_NAMES' order (test_constants_match_libvirt_module pins the values)
(
    PARAM_URI,
    PARAM_DEST_XML,
    PARAM_PERSIST_XML,
    PARAM_BANDWIDTH,
    PARAM_BANDWIDTH_POSTCOPY,
    PARAM_AUTO_CONVERGE_INITIAL,
    PARAM_AUTO_CONVERGE_INCREMENT,
) = (str(PARAMS[name]) for name in _PARAM_NAMES)

BASE_FLAGS = VIR_MIGRATE_LIVE | VIR_MIGRATE_PEER2PEER | VIR_MIGRATE_PERSIST_DEST | VIR_MIGRATE_UNDEFINE_SOURCE

# --- features, traits and minimum versions: one table ---------------------------------------------

TRAIT_AUTO_CONVERGE = "COMPUTE_MIGRATE_AUTO_CONVERGE"
TRAIT_POST_COPY = "COMPUTE_MIGRATE_POST_COPY"


@dataclass(frozen=True, slots=True)
class MigrationFeature:
    """An optional migration feature: the flag that arms it, every typed parameter the runner may
    pass with it, and the versions a host needs for all of them."""

    name: str  # the MigrationPolicy field that turns it on
    trait: str
    flag: str  # a _FLAG_VALUES name
    params: tuple[str, ...]  # _PARAM_NAMES names
    min_qemu: int  # same encoding as libvirt versions

    @property
    def min_libvirt(self) -> int:
        """The newest "Since" of the flag and the parameters: each is passed when the feature is on."""
        return max(LIBVIRT_SINCE[name] for name in (self.flag, *self.params))

    @property
    def flag_value(self) -> int:
        return int(FLAGS[self.flag])


# QEMU: the auto-converge capability came in 1.6 (Nova's commit adding
# live_migration_permit_auto_converge: "Since QEMU 1.6 and Libvirt 1.2.3"); post-copy in 2.5
# (Nova's MIN_QEMU_POSTCOPY_VERSION). libvirt: the newest of the flag and the parameters, i.e. 2.0.0
# for auto_converge.initial/increment and 5.1.0 for bandwidth.postcopy.
MIGRATION_FEATURES: tuple[MigrationFeature, ...] = (
    MigrationFeature(
        "auto_converge",
        TRAIT_AUTO_CONVERGE,
        "VIR_MIGRATE_AUTO_CONVERGE",
        ("VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL", "VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT"),
        min_qemu=1_006_000,
    ),
    MigrationFeature(
        "post_copy",
        TRAIT_POST_COPY,
        "VIR_MIGRATE_POSTCOPY",
        ("VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY",),
        min_qemu=2_005_000,
    ),
)


def version_tuple(version: int) -> tuple[int, int, int]:
    return version // 1_000_000, version // 1_000 % 1_000, version % 1_000


def traits_for_versions(libvirt_version: int, qemu_version: int) -> frozenset[str]:
    """Migration traits this host can honour, whatever the config permits (the metadata may ask
    for a feature the host config does not permit, so the capability is what matters)."""
    return frozenset(
        f.trait for f in MIGRATION_FEATURES if libvirt_version >= f.min_libvirt and qemu_version >= f.min_qemu
    )


def _features(policy: "MigrationPolicy") -> tuple[MigrationFeature, ...]:
    return tuple(f for f in MIGRATION_FEATURES if getattr(policy, f.name))


# --- the decision ---------------------------------------------------------------------------------


class PolicyConflict(InvalidRequest):
    """The instance's metadata asks for both auto-converge and post-copy."""

    code = "migration_policy_conflict"


@dataclass(frozen=True, slots=True)
class MigrationPolicy:
    auto_converge: bool
    post_copy: bool
    reason: str  # which metadata key or config option decided, for logs

    def __post_init__(self) -> None:
        if self.auto_converge and self.post_copy:
            raise ValueError("auto-converge and post-copy are mutually exclusive")


_CFG_AC = "[libvirt] live_migration_permit_auto_converge"
_CFG_PC = "[libvirt] live_migration_permit_post_copy"


def _said(value: bool, key: str | None, default_key: str) -> str:
    return f"{key or default_key}={'true' if value else 'false'}"


def decide_policy(wishes: MigrationWishes, cfg: LibvirtConfig, *, domain_paused: bool) -> MigrationPolicy:
    """Choose auto-converge / post-copy / neither (see the module docstring for the rules)."""
    ac_key = wishes.auto_converge_key or "compute:live_migration_auto_converge"
    pc_key = wishes.post_copy_key or "compute:live_migration_post_copy"
    if wishes.auto_converge is True and wishes.post_copy is True:
        raise PolicyConflict(
            "auto-converge and post-copy cannot both be requested for one instance", keys=(ac_key, pc_key)
        )

    # each feature from its own sources: metadata first, else host config
    if wishes.auto_converge is not None:
        ac, ac_why = wishes.auto_converge, _said(wishes.auto_converge, wishes.auto_converge_key, ac_key)
    else:
        ac, ac_why = (
            cfg.live_migration_permit_auto_converge,
            _said(cfg.live_migration_permit_auto_converge, None, _CFG_AC),
        )
    if wishes.post_copy is not None:
        pc, pc_why = wishes.post_copy, _said(wishes.post_copy, wishes.post_copy_key, pc_key)
    else:
        pc, pc_why = cfg.live_migration_permit_post_copy, _said(cfg.live_migration_permit_post_copy, None, _CFG_PC)

    # both wanted: at least one comes from host config only (rule 1 rejected two explicit trues)
    ac_own = (ac, ac_why)  # what auto-converge's own sources say, before the tie-break
    if ac and pc:
        if wishes.auto_converge is True:  # metadata turned AC on; PC only from config
            pc, pc_why = False, f"not used: {ac_why} chose auto-converge, {pc_why} ignored"
        elif wishes.post_copy is True:  # metadata turned PC on; AC only from config
            ac, ac_why = False, f"not used: {pc_why} chose post-copy, {ac_why} ignored"
        else:  # both from config: post-copy wins
            ac, ac_why = False, f"not used: host permits both and post-copy is preferred, {ac_why}"

    if pc and domain_paused:
        pc, pc_why = False, f"not used: the domain is paused, {pc_why}"
        if ac_own[0] and not ac:
            ac, ac_why = True, f"{ac_own[1]}, post-copy ruled out for the paused domain"

    reason = f"auto-converge {'on' if ac else 'off'} ({ac_why}); post-copy {'on' if pc else 'off'} ({pc_why})"
    return MigrationPolicy(auto_converge=ac, post_copy=pc, reason=reason)


# what each feature parameter is set to (None: not passed; 0 MiB/s means unlimited, libvirt's default)
_FEATURE_PARAM_VALUES: dict[str, Callable[[LibvirtConfig], int | None]] = {
    "VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL": lambda cfg: cfg.live_migration_auto_converge_initial,
    "VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT": lambda cfg: cfg.live_migration_auto_converge_increment,
    "VIR_MIGRATE_PARAM_BANDWIDTH_POSTCOPY": lambda cfg: cfg.live_migration_post_copy_bandwidth_mib or None,
}


def migration_flags(policy: MigrationPolicy) -> int:
    """virDomainMigrateToURI3 / migrate3 flags for the policy."""
    flags = BASE_FLAGS
    for feature in _features(policy):
        flags |= feature.flag_value
    return flags


def migration_params(
    policy: MigrationPolicy, *, dest_xml: str, persistent_xml: str, migrate_uri: str, cfg: LibvirtConfig
) -> dict[str, Any]:
    """Typed parameters for virDomainMigrate3 / migrateToURI3, keyed by libvirt's names.

    `bandwidth` (MiB/s) only when limited; `auto_converge.initial/increment` (percent, INT) only
    with auto-converge; `bandwidth.postcopy` (MiB/s) only with post-copy and when limited.
    """
    params: dict[str, Any] = {
        PARAM_DEST_XML: dest_xml,
        PARAM_PERSIST_XML: persistent_xml,
        PARAM_URI: migrate_uri,
    }
    if cfg.live_migration_bandwidth_mib > 0:
        params[PARAM_BANDWIDTH] = cfg.live_migration_bandwidth_mib
    for feature in _features(policy):
        for name in feature.params:
            value = _FEATURE_PARAM_VALUES[name](cfg)
            if value is not None:
                params[PARAMS[name]] = value
    return params
