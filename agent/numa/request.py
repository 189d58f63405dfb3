"""Instance requests: what an instance asks of a host, parsed from flavor extra specs and image
properties (see shared/formats.md, Instance request).

The types below are the contract the fitter, the claim ledger and the migration policy use.
`parse_request` turns metadata into an `InstanceRequest`, applying Nova's precedence and conflict
rules; anything contradictory raises `InvalidRequest` naming the keys.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Mapping, TypeVar

import msgspec

from agent.cpuset import format_id_list, parse_cpu_set
from agent.errors import InvalidRequest
from agent.json_input import check_json_depth
from agent.limits import MAX_MEMORY_MB as MAX_MEMORY_MB  # re-exported: claims and tests name it here
from agent.limits import MAX_NUMA_NODES, MAX_PAGE_SIZE_KB
from agent.limits import MAX_VCPUS as MAX_VCPUS  # re-exported: claims and tests name it here
from agent.numbers import uint_or_none
from agent.units import is_page_size


class CpuPolicy(enum.Enum):
    SHARED = "shared"
    DEDICATED = "dedicated"
    MIXED = "mixed"


class ThreadPolicy(enum.Enum):
    PREFER = "prefer"
    ISOLATE = "isolate"
    REQUIRE = "require"


class EmulatorThreadsPolicy(enum.Enum):
    SHARE = "share"
    ISOLATE = "isolate"


class PageSizeKind(enum.Enum):
    SMALL = "small"  # 4 KiB
    LARGE = "large"  # the largest hugepage size that fits
    ANY = "any"  # the largest size that fits, small pages included
    EXPLICIT = "explicit"  # `size_kb`


@dataclass(frozen=True, slots=True)
class PageSizeWish:
    kind: PageSizeKind
    size_kb: int | None = None  # only for EXPLICIT

    def __post_init__(self) -> None:
        if (self.kind is PageSizeKind.EXPLICIT) != (self.size_kb is not None):
            raise ValueError("size_kb is set exactly when kind is EXPLICIT")


SMALL_PAGES = PageSizeWish(PageSizeKind.SMALL)


@dataclass(frozen=True, slots=True)
class GuestCell:
    """One guest NUMA cell: its vCPU ids, memory, and which of its vCPUs are dedicated."""

    id: int
    vcpus: frozenset[int]
    memory_mb: int
    dedicated_vcpus: frozenset[int]  # subset of vcpus; the rest float

    @property
    def floating_vcpus(self) -> frozenset[int]:
        return self.vcpus - self.dedicated_vcpus


@dataclass(frozen=True, slots=True)
class MigrationWishes:
    """Per-instance live-migration features from metadata; None = not said (host config decides)."""

    auto_converge: bool | None = None
    post_copy: bool | None = None
    # which metadata keys said so, for error messages and logs
    auto_converge_key: str | None = None
    post_copy_key: str | None = None


@dataclass(frozen=True, slots=True)
class InstanceRequest:
    uuid: str
    vcpus: int
    memory_mb: int
    cells: tuple[GuestCell, ...]  # at least one; ids 0..n-1 in order
    cpu_policy: CpuPolicy
    thread_policy: ThreadPolicy  # meaningful for dedicated vCPUs; PREFER by default
    emulator_threads: EmulatorThreadsPolicy
    page_size: PageSizeWish | None  # None = not asked: small pages, overcommit allowed if floating
    migration: MigrationWishes = MigrationWishes()
    # no hw:numa_nodes: the agent made one cell itself. Still fitted into one host cell like any
    # cell (known limitation, see parse_request); informational only.
    numa_implicit: bool = False

    @property
    def is_pinned(self) -> bool:
        return self.cpu_policy is not CpuPolicy.SHARED


# =================================================================================================
# Parsing: flavor extra specs + image properties -> InstanceRequest
# =================================================================================================
#
# The rules mirror Nova's ``nova/virt/hardware.py`` (numa_get_constraints and its helpers): same
# keys, same precedence between flavor and image, same conflicts. Where we differ it is on purpose
# and marked "DIFFERS FROM NOVA" below; in short we are stricter about malformed values (Nova
# often lets a ValueError escape or silently ignores a key), we accept a flavor/image pair that
# repeats the *same* NUMA layout (Nova refuses any overlap), and we honour the image property
# ``hw_emulator_threads_policy`` (Nova reads the flavor only).


_FLAVOR = "hw:"
_IMAGE = "hw_"

# Flavor-only / image-only spellings of the migration features (not Nova keys: ours).
_MIGRATION_KEYS = {
    "auto_converge": ("compute:live_migration_auto_converge", "compute_live_migration_auto_converge"),
    "post_copy": ("compute:live_migration_post_copy", "compute_live_migration_post_copy"),
}
_MIGRATION_PREFIXES = ("compute:live_migration", "compute_live_migration")

# oslo_utils.strutils TRUE_STRINGS / FALSE_STRINGS (compared after strip().lower()).
_TRUE_STRINGS = frozenset({"1", "t", "true", "on", "y", "yes"})
_FALSE_STRINGS = frozenset({"0", "f", "false", "off", "n", "no"})

_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_CELL_KEY_RE = re.compile(r"(?:hw:|hw_)numa_(?:cpus|mem)\.(0|[1-9][0-9]{0,5})")
_INT_RE = re.compile(r"[1-9][0-9]{0,11}")  # Nova: strutils.is_int_like (no sign, no padding)
# oslo_utils.strutils.string_to_bytes, unit_system="IEC" (what Nova uses for hw:mem_page_size)
_IEC_SIZE_RE = re.compile(r"\+?((?:[0-9]{0,20}\.)?[0-9]{1,20})([KMGTPEZY]i?)?(b|bit|B)", re.ASCII)
_IEC_EXPONENT = {"K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6, "Z": 7, "Y": 8}


class _RequestDoc(msgspec.Struct, frozen=True):
    """Wire shape of an instance request (shared/formats.md). Extra keys are ignored."""

    uuid: str
    vcpus: int
    memory_mb: int
    extra_specs: dict[str, Any] = {}
    image_properties: dict[str, Any] = {}


def _decode_doc(doc: Any) -> _RequestDoc:
    try:
        if isinstance(doc, (bytes, bytearray, memoryview, str)):
            data = bytes(doc) if not isinstance(doc, str) else doc
            check_json_depth(data, what="instance request", error=InvalidRequest)
            return msgspec.json.decode(data, type=_RequestDoc)
        return msgspec.convert(doc, type=_RequestDoc)
    except msgspec.ValidationError as exc:
        match = re.search(r"at `\$\.([A-Za-z_]+)|missing required field `([A-Za-z_]+)`", str(exc))
        keys = [match.group(1) or match.group(2)] if match else []
        raise InvalidRequest(f"invalid instance request document: {exc}", keys) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"instance request is not valid JSON: {exc}") from None


class _Meta:
    """Flavor extra specs and image properties, normalised to strings, with the key spellings."""

    def __init__(self, extra_specs: Mapping[str, Any], image_props: Mapping[str, Any]) -> None:
        self.flavor = {k: v for k, v in extra_specs.items()}
        self.image = {k: v for k, v in image_props.items()}

    @staticmethod
    def _text(key: str, value: Any) -> str:
        # Flavor extra specs are always strings in Nova; image properties may arrive typed
        # (Glance / our own JSON). Accept ints and bools by their text, refuse anything else.
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int):
            if abs(value) > 10**18:  # str() of a huge int is slow or refused outright
                raise InvalidRequest(f"{key}: number out of range", [key])
            return str(value)
        if isinstance(value, str):
            return value
        raise InvalidRequest(f"{key} must be a string, got {type(value).__name__}", [key])

    def flavor_value(self, name: str) -> tuple[str, str | None]:
        key = _FLAVOR + name
        value = self.flavor.get(key)
        return key, None if value is None else self._text(key, value)

    def image_value(self, name: str) -> tuple[str, str | None]:
        key = _IMAGE + name
        value = self.image.get(key)
        return key, None if value is None else self._text(key, value)

    def pair(self, name: str) -> tuple[str, str | None, str, str | None]:
        fkey, fval = self.flavor_value(name)
        ikey, ival = self.image_value(name)
        return fkey, fval, ikey, ival


# --- value parsers --------------------------------------------------------------------------------


def _show(value: Any, limit: int = 60) -> str:
    """repr() of a metadata value for an error message, cut short: values come from outside."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def parse_cpu_spec(spec: str, key: str, max_id: int) -> frozenset[int]:
    """Parse a Nova CPU list ("0-3,^2,5"): ranges, single ids, and ^exclusions of either.

    Ids above `max_id` are refused when included (Nova: ImageNUMATopologyCPUOutOfRange / mask not a
    subset) and ignored when excluded; ranges are never materialised beyond `max_id`.
    """
    try:
        return parse_cpu_set(spec, max_id=max_id, clip_excluded=True)
    except ValueError as exc:
        raise InvalidRequest(
            f"{key}: invalid CPU list {_show(spec)}: {exc} (the instance has vCPUs 0-{max_id})", [key]
        ) from None


def parse_bool(value: str, key: str) -> bool:
    """oslo_utils.strutils.bool_from_string(strict=True): anything else is an error."""
    word = value.strip().lower()
    if word in _TRUE_STRINGS:
        return True
    if word in _FALSE_STRINGS:
        return False
    raise InvalidRequest(f"{key}={_show(value)} is not a boolean (true/false, yes/no, on/off, 1/0)", [key])


def _loose_bool(value: str | None) -> bool:
    """oslo bool_from_string(strict=False): unknown words are False (Nova's is_realtime_enabled)."""
    return value is not None and value.strip().lower() in _TRUE_STRINGS


def parse_page_size(value: str, key: str) -> PageSizeWish:
    """Nova's check_and_return_pages_size: small|large|any, a KiB integer, or an IEC size string."""
    if value == "small":
        return SMALL_PAGES
    if value == "large":
        return PageSizeWish(PageSizeKind.LARGE)
    if value == "any":
        return PageSizeWish(PageSizeKind.ANY)
    size_kb = uint_or_none(value, max_digits=12)
    if size_kb is None:
        match = _IEC_SIZE_RE.fullmatch(value)
        if match is None:
            raise InvalidRequest(
                f"{key}={_show(value)} is not a page size (small, large, any, a size in KiB, or e.g. 2MB, 1GB)",
                [key],
            )
        # oslo string_to_bytes: magnitude * 1024**exponent, bits divided by 8. Work in exact
        # fractions (no float rounding), then to KiB; DIFFERS FROM NOVA: a size that is not a whole
        # number of KiB is refused instead of becoming a fractional page size.
        magnitude = Fraction(match.group(1))
        prefix = match.group(2)
        if match.group(3) in ("b", "bit"):
            magnitude /= 8
        size_bytes = magnitude * (1024 ** _IEC_EXPONENT[prefix[0]] if prefix else 1)
        size_kib = size_bytes / 1024
        if size_kib.denominator != 1:
            raise InvalidRequest(f"{key}={_show(value)} is not a whole number of KiB", [key])
        size_kb = int(size_kib)
    # DIFFERS FROM NOVA: 0 and absurd sizes are refused here (Nova would carry them to scheduling).
    if not 4 <= size_kb <= MAX_PAGE_SIZE_KB:
        raise InvalidRequest(f"{key}={_show(value)}: page size must be between 4 KiB and 16 GiB", [key])
    if not is_page_size(size_kb):  # DIFFERS FROM NOVA: 3 or 6 KiB can be no MMU's page size
        raise InvalidRequest(f"{key}={_show(value)}: a page size is a power of two (4K, 2M, 1G, ...)", [key])
    return PageSizeWish(PageSizeKind.EXPLICIT, size_kb)


def _enum(cls: type[enum.Enum], value: str, key: str) -> Any:
    # Nova compares policy words exactly (case-sensitive); so do we.
    for member in cls:
        if member.value == value:
            return member
    allowed = ", ".join(m.value for m in cls)
    raise InvalidRequest(f"{key}={_show(value)} is not one of: {allowed}", [key])


# --- the individual constraints (one per Nova helper) --------------------------------------------


def _cpu_policy(meta: _Meta) -> tuple[CpuPolicy | None, list[str]]:
    """get_cpu_policy_constraint. Returns the policy and the keys that set it."""
    fkey, fval, ikey, ival = meta.pair("cpu_policy")
    flavor = _enum(CpuPolicy, fval, fkey) if fval is not None else None
    image = _enum(CpuPolicy, ival, ikey) if ival is not None else None
    if flavor is CpuPolicy.DEDICATED:
        # Nova: a dedicated flavor wins over anything the image says (no error for image shared).
        return flavor, [fkey]
    if flavor is CpuPolicy.MIXED:
        if image is CpuPolicy.DEDICATED:
            raise InvalidRequest(
                f"image asks {ikey}=dedicated but the flavor says {fkey}=mixed (ImageCPUPinningForbidden)",
                [fkey, ikey],
            )
        return flavor, [fkey]
    if flavor is CpuPolicy.SHARED:
        if image in (CpuPolicy.DEDICATED, CpuPolicy.MIXED):
            raise InvalidRequest(
                f"image asks {ikey}={ival} but the flavor says {fkey}=shared (ImageCPUPinningForbidden)",
                [fkey, ikey],
            )
        return flavor, [fkey]
    if image is not None:
        return image, [ikey]
    return None, []


def _thread_policy(meta: _Meta) -> tuple[ThreadPolicy | None, list[str]]:
    """get_cpu_thread_policy_constraint: a flavor 'prefer' (or nothing) lets the image decide."""
    fkey, fval, ikey, ival = meta.pair("cpu_thread_policy")
    flavor = _enum(ThreadPolicy, fval, fkey) if fval is not None else None
    image = _enum(ThreadPolicy, ival, ikey) if ival is not None else None
    if flavor in (None, ThreadPolicy.PREFER):
        if image is not None:
            return image, [ikey]
        return flavor, [fkey] if flavor is not None else []
    if image is not None and image is not flavor:
        raise InvalidRequest(
            f"flavor {fkey}={fval} and image {ikey}={ival} disagree (ImageCPUThreadPolicyForbidden)",
            [fkey, ikey],
        )
    return flavor, [fkey]


def _emulator_policy(meta: _Meta) -> tuple[EmulatorThreadsPolicy | None, list[str]]:
    """get_emulator_thread_policy_constraint.

    DIFFERS FROM NOVA: Nova reads the flavor only; we also honour the image property
    ``hw_emulator_threads_policy`` (shared/formats.md uses it) when the flavor does not set the
    policy, and refuse a flavor/image disagreement. Honouring it can only ask for more isolation.
    """
    fkey, fval, ikey, ival = meta.pair("emulator_threads_policy")
    flavor = _enum(EmulatorThreadsPolicy, fval, fkey) if fval is not None else None
    image = _enum(EmulatorThreadsPolicy, ival, ikey) if ival is not None else None
    if flavor is not None and image is not None and flavor is not image:
        raise InvalidRequest(f"flavor {fkey}={fval} and image {ikey}={ival} disagree", [fkey, ikey])
    if flavor is not None:
        return flavor, [fkey]
    if image is not None:
        return image, [ikey]
    return None, []


def _cpu_mask(spec: str, key: str, vcpus: int) -> frozenset[int]:
    """A '^'-form mask means "all vCPUs except"; otherwise it lists vCPUs (Nova)."""
    if spec.strip().startswith("^"):
        spec = f"0-{vcpus - 1},{spec}"
    # Included ids beyond the flavor's vCPUs are refused by the parser ("not a subset").
    return parse_cpu_spec(spec, key, max_id=vcpus - 1)


def _dedicated_mask(meta: _Meta, vcpus: int) -> tuple[frozenset[int] | None, str]:
    """get_dedicated_cpu_constraint (flavor only): at least one dedicated and one shared vCPU."""
    key, value = meta.flavor_value("cpu_dedicated_mask")
    if value is None:
        return None, key
    pcpus = _cpu_mask(value, key, vcpus)
    if not pcpus or len(pcpus) == vcpus:
        raise InvalidRequest(
            f"{key}={_show(value)} must leave at least one dedicated and one shared vCPU "
            "(InvalidMixedInstanceDedicatedMask)",
            [key],
        )
    return pcpus, key


def _realtime_mask(meta: _Meta, vcpus: int, emulator_set: bool) -> tuple[frozenset[int] | None, list[str]]:
    """get_realtime_cpu_constraint. Only consulted for the rules that touch placement: realtime
    needs a pinned policy, and a mixed instance may name its dedicated vCPUs with the realtime mask.
    """
    rt_key, rt_val = meta.flavor_value("cpu_realtime")
    if not _loose_bool(rt_val):  # Nova: non-strict bool, anything not truthy is "off"
        return None, []
    fkey, fval, ikey, ival = meta.pair("cpu_realtime_mask")
    # Nova: the image mask is used ahead of the flavor mask.
    if ival:
        mask, keys = _cpu_mask(ival, ikey, vcpus), [rt_key, ikey]
    elif fval:
        mask, keys = _cpu_mask(fval, fkey, vcpus), [rt_key, fkey]
    else:
        mask, keys = frozenset(range(vcpus)), [rt_key]
    if not mask or (len(mask) == vcpus and not emulator_set):
        raise InvalidRequest(
            "realtime needs a mask that leaves at least one non-realtime vCPU, or an emulator "
            "threads policy (RealtimeMaskNotFoundOrInvalid)",
            keys,
        )
    return mask, keys


def _page_size(meta: _Meta) -> tuple[PageSizeWish | None, list[str]]:
    """_get_numa_pagesize_constraint: the image may only refine a flavor 'large' or 'any'."""
    fkey, fval, ikey, ival = meta.pair("mem_page_size")
    if fval is None:
        if ival is not None:
            raise InvalidRequest(
                f"image asks {ikey}={_show(ival)} but the flavor does not set {fkey} (MemoryPageSizeForbidden)",
                [ikey, fkey],
            )
        return None, []
    flavor = parse_page_size(fval, fkey)
    if ival is None:
        return flavor, [fkey]
    if flavor.kind in (PageSizeKind.LARGE, PageSizeKind.ANY):
        # Nova returns the image's request as is, even 'small' under a flavor 'large'.
        return parse_page_size(ival, ikey), [ikey]
    raise InvalidRequest(
        f"image asks {ikey}={_show(ival)} but the flavor fixes {fkey}={_show(fval)}; the image may only "
        "refine 'large' or 'any' (MemoryPageSizeForbidden)",
        [ikey, fkey],
    )


def _numa_nodes(meta: _Meta) -> tuple[int | None, list[str]]:
    """_get_numa_node_count_constraint.

    DIFFERS FROM NOVA: Nova refuses any flavor+image overlap; we accept an image that repeats the
    flavor's value and refuse only a different one.
    """
    fkey, fval, ikey, ival = meta.pair("numa_nodes")

    def parse(key: str, value: str) -> int:
        if not _INT_RE.fullmatch(value) or not 1 <= int(value) <= MAX_NUMA_NODES:
            raise InvalidRequest(
                f"{key}={_show(value)}: the NUMA node count must be an integer 1-{MAX_NUMA_NODES} "
                "(InvalidNUMANodesNumber)",
                [key],
            )
        return int(value)

    flavor = parse(fkey, fval) if fval is not None else None
    image = parse(ikey, ival) if ival is not None else None
    if flavor is not None and image is not None and flavor != image:
        raise InvalidRequest(
            f"flavor {fkey}={fval} and image {ikey}={ival} disagree (ImageNUMATopologyForbidden)",
            [fkey, ikey],
        )
    if flavor is not None:
        return flavor, [fkey] + ([ikey] if image is not None else [])
    if image is not None:
        return image, [ikey]
    return None, []


def _cell_map(source: Mapping[str, Any], prefix: str, what: str) -> dict[int, tuple[str, str]]:
    """Collect `<prefix>numa_<what>.N` keys of one source: {N: (key, text)}."""
    family = f"{prefix}numa_{what}"
    found: dict[int, tuple[str, str]] = {}
    for key, value in source.items():
        if not isinstance(key, str) or not key.startswith(family):
            continue
        rest = key[len(family) :]
        if rest and rest[0] not in ".":  # e.g. hw:numa_cpus_foo: not ours
            continue
        match = _CELL_KEY_RE.fullmatch(key)
        if match is None:
            raise InvalidRequest(f"{key}: expected {family}.N with N a guest cell number", [key])
        found[int(match.group(1))] = (key, _Meta._text(key, value))
    return found


def _cell_lists(
    meta: _Meta, vcpus: int
) -> tuple[dict[int, tuple[str, frozenset[int]]] | None, dict[int, tuple[str, int]] | None]:
    """_get_numa_cpu_constraint / _get_numa_mem_constraint for flavor and image.

    DIFFERS FROM NOVA: as for hw:numa_nodes, an image repeating the flavor's layout is accepted.
    """

    def cpus(entries: dict[int, tuple[str, str]]) -> dict[int, tuple[str, frozenset[int]]]:
        return {n: (k, parse_cpu_spec(v, k, vcpus - 1)) for n, (k, v) in entries.items()}

    def mems(entries: dict[int, tuple[str, str]]) -> dict[int, tuple[str, int]]:
        out = {}
        for n, (k, v) in entries.items():
            mb = uint_or_none(v, max_digits=12)
            if mb is None or mb < 1:
                raise InvalidRequest(f"{k}={_show(v)}: cell memory must be a positive integer (MiB)", [k])
            out[n] = (k, mb)
        return out

    return _one_cell_map(meta, "cpus", cpus), _one_cell_map(meta, "mem", mems)


_V = TypeVar("_V")


def _one_cell_map(
    meta: _Meta, what: str, conv: Callable[[dict[int, tuple[str, str]]], dict[int, tuple[str, _V]]]
) -> dict[int, tuple[str, _V]] | None:
    """hw:numa_<what>.N from the flavor or the image; both may give it only if they agree."""
    flavor = conv(_cell_map(meta.flavor, _FLAVOR, what))
    image = conv(_cell_map(meta.image, _IMAGE, what))
    if flavor and image:
        same = flavor.keys() == image.keys() and all(flavor[n][1] == image[n][1] for n in flavor)
        if not same:
            keys = [k for k, _ in flavor.values()] + [k for k, _ in image.values()]
            raise InvalidRequest(
                f"flavor hw:numa_{what}.N and image hw_numa_{what}.N disagree (ImageNUMATopologyForbidden)",
                sorted(keys),
            )
    return flavor or image or None


def _migration(meta: _Meta) -> MigrationWishes:
    _check_migration_keys(meta)
    values = {feature: _migration_value(meta, fkey, ikey) for feature, (fkey, ikey) in _MIGRATION_KEYS.items()}
    if values["auto_converge"][0] and values["post_copy"][0]:
        true_keys = [k for _, _, keys in values.values() for k in keys]
        raise InvalidRequest("auto-converge and post-copy cannot both be enabled for one live migration", true_keys)
    return MigrationWishes(
        auto_converge=values["auto_converge"][0],
        post_copy=values["post_copy"][0],
        auto_converge_key=values["auto_converge"][1],
        post_copy_key=values["post_copy"][1],
    )


def _check_migration_keys(meta: _Meta) -> None:
    """Typos in our own namespace are errors (a silently ignored migration wish is dangerous), and
    the flavor spelling is only read from extra specs, the image spelling from image properties."""
    known = {k for pair in _MIGRATION_KEYS.values() for k in pair}
    for source in (meta.flavor, meta.image):
        for key in source:
            if isinstance(key, str) and key.startswith(_MIGRATION_PREFIXES) and key not in known:
                raise InvalidRequest(f"unknown live-migration key {key}", [key])
    for source, other in ((meta.flavor, 1), (meta.image, 0)):
        for key in source:
            if any(key == pair[other] for pair in _MIGRATION_KEYS.values()):
                where = "image property" if other == 1 else "flavor extra spec"
                raise InvalidRequest(f"{key} is an {where} key, not valid here", [key])


def _migration_value(meta: _Meta, fkey: str, ikey: str) -> tuple[bool | None, str | None, list[str]]:
    """(value, the key that decided it, the keys that said true) of one feature; the flavor wins,
    and flavor and image must agree when both say something."""
    fraw, iraw = meta.flavor.get(fkey), meta.image.get(ikey)
    fval = parse_bool(_Meta._text(fkey, fraw), fkey) if fraw is not None else None
    ival = parse_bool(_Meta._text(ikey, iraw), ikey) if iraw is not None else None
    if fval is not None and ival is not None and fval != ival:
        raise InvalidRequest(f"flavor {fkey}={_show(fraw)} and image {ikey}={_show(iraw)} disagree", [fkey, ikey])
    true_keys = [k for k, v in ((fkey, fval), (ikey, ival)) if v]
    if fval is not None:
        return fval, fkey, true_keys
    if ival is not None:
        return ival, ikey, true_keys
    return None, None, true_keys


# --- putting it together ---------------------------------------------------------------------------


def parse_request(doc: Any) -> InstanceRequest:
    """Parse an instance request document (dict, or JSON bytes/str) into an `InstanceRequest`.

    Raises `InvalidRequest` (naming the offending keys) for anything malformed or contradictory;
    nothing else escapes for bad input.
    """
    raw = _decode_doc(doc)
    _check_sizes(raw)
    vcpus, memory_mb = raw.vcpus, raw.memory_mb
    meta = _Meta(raw.extra_specs, raw.image_properties)
    p = _read_policies(meta, vcpus)
    pinned = _pinned_vcpus(p, vcpus)
    nodes, nodes_keys = _numa_nodes(meta)
    page_size, _page_keys = _page_size(meta)
    # Nova builds a NUMA topology only for hw:numa_nodes, pinning, a page size (or vPMEM); a plain
    # shared instance gets none and may float over the whole host. KNOWN LIMITATION (not fixed): we
    # always make at least one cell, so such an instance is modelled as one implicit cell
    # (numa_implicit=True) and the fitter treats it like any other guest cell: the instance is
    # placed in ONE host cell (its vCPUs float over that cell's shared CPUs only and all its memory
    # must fit that cell), never spread over the whole host. So it can be refused on a host whose
    # cells are each too small although the host as a whole has room. numa_implicit only records
    # that the cell was not asked for; the fitter does not look at it.
    cells = _guest_cells(meta, nodes or 1, vcpus, memory_mb, pinned, nodes_keys)
    return InstanceRequest(
        uuid=raw.uuid.lower(),
        vcpus=vcpus,
        memory_mb=memory_mb,
        cells=cells,
        cpu_policy=p.cpu_policy or CpuPolicy.SHARED,
        thread_policy=p.thread_policy or ThreadPolicy.PREFER,
        emulator_threads=p.emulator or EmulatorThreadsPolicy.SHARE,
        page_size=page_size,
        migration=_migration(meta),
        numa_implicit=nodes is None,
    )


def _check_sizes(raw: Any) -> None:
    if not _UUID_RE.fullmatch(raw.uuid):
        raise InvalidRequest(f"uuid {raw.uuid[:64]!r} is not a UUID", ["uuid"])
    if not 1 <= raw.vcpus <= MAX_VCPUS:
        raise InvalidRequest(f"vcpus={raw.vcpus} is out of range 1-{MAX_VCPUS}", ["vcpus"])
    if not 1 <= raw.memory_mb <= MAX_MEMORY_MB:
        raise InvalidRequest(f"memory_mb={raw.memory_mb} is out of range 1-{MAX_MEMORY_MB}", ["memory_mb"])


@dataclass(frozen=True, slots=True)
class _Policies:
    """The CPU-related policies of a request, each with the keys that said it (for errors)."""

    cpu_policy: CpuPolicy | None
    policy_keys: list[str]
    thread_policy: ThreadPolicy | None
    thread_keys: list[str]
    emulator: EmulatorThreadsPolicy | None
    emulator_keys: list[str]
    realtime: frozenset[int] | None
    realtime_keys: list[str]
    dedicated: frozenset[int] | None
    mask_key: str


def _read_policies(meta: _Meta, vcpus: int) -> _Policies:
    cpu_policy, policy_keys = _cpu_policy(meta)
    thread_policy, thread_keys = _thread_policy(meta)
    emulator, emulator_keys = _emulator_policy(meta)
    realtime, realtime_keys = _realtime_mask(meta, vcpus, emulator is not None)
    dedicated, mask_key = _dedicated_mask(meta, vcpus)
    return _Policies(
        cpu_policy,
        policy_keys,
        thread_policy,
        thread_keys,
        emulator,
        emulator_keys,
        realtime,
        realtime_keys,
        dedicated,
        mask_key,
    )


def _pinned_vcpus(p: _Policies, vcpus: int) -> frozenset[int]:
    """The dedicated vCPUs, after the sanity checks between policies (numa_get_constraints)."""
    if p.cpu_policy in (None, CpuPolicy.SHARED):
        _check_shared_policy(p)
        return frozenset()
    if p.cpu_policy is CpuPolicy.DEDICATED:
        if p.dedicated is not None:
            raise InvalidRequest(
                f"{p.mask_key} needs hw:cpu_policy=mixed, not dedicated (RequiredMixedInstancePolicy)",
                [p.mask_key] + p.policy_keys,
            )
        return frozenset(range(vcpus))
    return _mixed_dedicated(p, vcpus)


def _check_shared_policy(p: _Policies) -> None:
    """A shared instance asks for nothing that needs dedicated CPUs."""
    policy_word = "shared" if p.cpu_policy is None else p.cpu_policy.value
    if p.thread_policy is not None:
        raise InvalidRequest(
            f"a CPU thread policy needs hw:cpu_policy=dedicated or mixed, not {policy_word} "
            "(CPUThreadPolicyConfigurationInvalid)",
            p.thread_keys + p.policy_keys,
        )
    if p.emulator is EmulatorThreadsPolicy.ISOLATE:
        raise InvalidRequest(
            f"isolated emulator threads need hw:cpu_policy=dedicated or mixed, not {policy_word} "
            "(BadRequirementEmulatorThreadsPolicy)",
            p.emulator_keys + p.policy_keys,
        )
    if p.dedicated is not None:
        raise InvalidRequest(
            f"{p.mask_key} needs hw:cpu_policy=mixed, not {policy_word} (RequiredMixedInstancePolicy)",
            [p.mask_key] + p.policy_keys,
        )
    if p.realtime is not None:
        raise InvalidRequest(
            f"realtime needs hw:cpu_policy=dedicated or mixed, not {policy_word} (RealtimeConfigurationInvalid)",
            p.realtime_keys + p.policy_keys,
        )


def _mixed_dedicated(p: _Policies, vcpus: int) -> frozenset[int]:
    """A mixed instance's dedicated vCPUs: from exactly one of the masks, leaving a shared vCPU."""
    if p.dedicated is not None and p.realtime is not None:
        raise InvalidRequest(
            "a mixed instance names its dedicated vCPUs with either hw:cpu_dedicated_mask or the "
            "realtime mask, not both (RequiredMixedOrRealtimeCPUMask)",
            [p.mask_key] + p.realtime_keys + p.policy_keys,
        )
    dedicated = p.dedicated if p.dedicated is not None else p.realtime
    if dedicated is None:
        raise InvalidRequest(
            "hw:cpu_policy=mixed needs hw:cpu_dedicated_mask (or a realtime mask) naming the "
            "dedicated vCPUs (RequiredMixedOrRealtimeCPUMask)",
            p.policy_keys + [p.mask_key],
        )
    if len(dedicated) == vcpus:
        # DIFFERS FROM NOVA: a realtime mask covering every vCPU would leave a "mixed" instance
        # with no shared vCPU; Nova lets that through, we ask for hw:cpu_policy=dedicated.
        raise InvalidRequest(
            "hw:cpu_policy=mixed needs at least one shared vCPU; the realtime mask covers them "
            "all (use hw:cpu_policy=dedicated)",
            p.realtime_keys + p.policy_keys,
        )
    return dedicated


def _guest_cells(
    meta: _Meta, count: int, vcpus: int, memory_mb: int, pinned: frozenset[int], nodes_keys: list[str]
) -> tuple[GuestCell, ...]:
    """Guest cells: split evenly, or as hw:numa_cpus.N / hw:numa_mem.N say (both or neither)."""
    cpu_list, mem_list = _cell_lists(meta, vcpus)
    if cpu_list is None and mem_list is None:
        return _auto_cells(count, vcpus, memory_mb, pinned, nodes_keys)
    if cpu_list is not None and mem_list is not None:
        return _manual_cells(count, vcpus, memory_mb, pinned, cpu_list, mem_list, nodes_keys)
    given_keys = [k for k, _ in cpu_list.values()] if cpu_list else [k for k, _ in (mem_list or {}).values()]
    missing = "hw:numa_mem.N" if mem_list is None else "hw:numa_cpus.N"
    raise InvalidRequest(
        f"guest cell vCPUs and memory must be given together; {missing} is missing (ImageNUMATopologyIncomplete)",
        sorted(given_keys),
    )


def _auto_cells(
    nodes: int, vcpus: int, memory_mb: int, pinned: frozenset[int], nodes_keys: list[str]
) -> tuple[GuestCell, ...]:
    """_get_numa_topology_auto: vCPUs and memory split evenly, consecutive vCPU ids per cell."""
    if vcpus % nodes or memory_mb % nodes:
        raise InvalidRequest(
            f"{vcpus} vCPUs and {memory_mb} MiB cannot be split evenly over {nodes} NUMA nodes; "
            "give hw:numa_cpus.N and hw:numa_mem.N (ImageNUMATopologyAsymmetric)",
            nodes_keys + ["vcpus", "memory_mb"],
        )
    per_cpu, per_mem = vcpus // nodes, memory_mb // nodes
    cells = []
    for n in range(nodes):
        ids = frozenset(range(n * per_cpu, (n + 1) * per_cpu))
        cells.append(GuestCell(id=n, vcpus=ids, memory_mb=per_mem, dedicated_vcpus=ids & pinned))
    return tuple(cells)


def _check_cell_numbers(
    nodes: int,
    cpu_list: dict[int, tuple[str, frozenset[int]]],
    mem_list: dict[int, tuple[str, int]],
    nodes_keys: list[str],
) -> None:
    """hw:numa_cpus.N and hw:numa_mem.N each for exactly the cells 0..nodes-1."""
    detail: list[str] = []
    bad_keys: list[str] = []
    for what, given in (("cpus", cpu_list), ("mem", mem_list)):
        wrong = sorted(set(given) ^ set(range(nodes)))
        if not wrong:
            continue
        # spell missing keys like the given ones (flavor "hw:" or image "hw_")
        prefix = next(iter(given.values()))[0][:3]
        extra = [given[n][0] for n in wrong if n in given]
        missing = [n for n in wrong if n not in given]
        if missing:
            detail.append(f"no {prefix}numa_{what}.N for cell(s) {format_id_list(missing)}")
            bad_keys += [f"{prefix}numa_{what}.{n}" for n in missing[:16]]
        if extra:
            detail.append(f"{', '.join(extra[:16])} beyond the {nodes} cell(s)")
            bad_keys += extra[:16]
    if detail:
        raise InvalidRequest(
            f"the instance has {nodes} NUMA node(s) but {'; '.join(detail)} (ImageNUMATopologyIncomplete)",
            nodes_keys + bad_keys,
        )


def _manual_cells(
    nodes: int,
    vcpus: int,
    memory_mb: int,
    pinned: frozenset[int],
    cpu_list: dict[int, tuple[str, frozenset[int]]],
    mem_list: dict[int, tuple[str, int]],
    nodes_keys: list[str],
) -> tuple[GuestCell, ...]:
    """_get_numa_topology_manual: every cell 0..N-1 given, every vCPU exactly once, memory sums."""
    _check_cell_numbers(nodes, cpu_list, mem_list, nodes_keys)
    seen: dict[int, str] = {}
    cells = []
    for n in range(nodes):
        cpu_key, ids = cpu_list[n]
        mem_key, mem = mem_list[n]
        if not ids:
            raise InvalidRequest(f"{cpu_key} gives guest cell {n} no vCPUs", [cpu_key])
        for vcpu in sorted(ids):
            if vcpu in seen:
                raise InvalidRequest(
                    f"vCPU {vcpu} is in two guest cells (ImageNUMATopologyCPUDuplicates)",
                    [seen[vcpu], cpu_key],
                )
            seen[vcpu] = cpu_key
        cells.append(GuestCell(id=n, vcpus=ids, memory_mb=mem, dedicated_vcpus=ids & pinned))
    unassigned = sorted(set(range(vcpus)) - set(seen))
    if unassigned:
        raise InvalidRequest(
            f"vCPU(s) {format_id_list(unassigned)} are in no guest cell (ImageNUMATopologyCPUsUnassigned)",
            sorted(k for k, _ in cpu_list.values()) + ["vcpus"],
        )
    total = sum(c.memory_mb for c in cells)
    if total != memory_mb:
        raise InvalidRequest(
            f"guest cell memory sums to {total} MiB but the instance has {memory_mb} MiB "
            "(ImageNUMATopologyMemoryOutOfRange)",
            sorted(k for k, _ in mem_list.values()) + ["memory_mb"],
        )
    return tuple(cells)


# --- canonical form (claim ledger) ------------------------------------------------------------------


def request_to_json(req: InstanceRequest) -> dict[str, Any]:
    """A canonical, normalised form of a request: equal for two requests exactly when they ask the
    same of a host. Which metadata key said something (MigrationWishes.*_key) is left out on
    purpose: moving a setting from the flavor to the image does not change the request.
    """
    page: dict[str, Any] | None = None
    if req.page_size is not None:
        page = {"kind": req.page_size.kind.value, "size_kb": req.page_size.size_kb}
    return {
        "uuid": req.uuid,
        "vcpus": req.vcpus,
        "memory_mb": req.memory_mb,
        "cells": [
            {
                "id": c.id,
                "vcpus": sorted(c.vcpus),
                "memory_mb": c.memory_mb,
                "dedicated_vcpus": sorted(c.dedicated_vcpus),
            }
            for c in req.cells
        ],
        "cpu_policy": req.cpu_policy.value,
        "thread_policy": req.thread_policy.value,
        "emulator_threads": req.emulator_threads.value,
        "page_size": page,
        "numa_implicit": req.numa_implicit,
        "migration": {"auto_converge": req.migration.auto_converge, "post_copy": req.migration.post_copy},
    }


def request_fingerprint(req: InstanceRequest) -> str:
    """A stable digest of `request_to_json` (sorted keys, compact), for cheap equality checks."""
    text = json.dumps(request_to_json(req), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
