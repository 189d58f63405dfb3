"""Instance request parsing: Nova's flavor/image rules (nova/virt/hardware.py) plus our own keys."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import InvalidRequest
from agent.numa.request import (
    MAX_MEMORY_MB,
    MAX_VCPUS,
    CpuPolicy,
    EmulatorThreadsPolicy,
    InstanceRequest,
    PageSizeKind,
    PageSizeWish,
    ThreadPolicy,
    parse_cpu_spec,
    parse_request,
    request_fingerprint,
    request_to_json,
)
from agent.testing.builders import FIT_SCENARIOS, fit_scenarios

UUID = "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10"


def doc(extra_specs=None, image=None, *, vcpus=8, memory_mb=8192, uuid=UUID) -> dict:
    return {
        "uuid": uuid,
        "vcpus": vcpus,
        "memory_mb": memory_mb,
        "extra_specs": dict(extra_specs or {}),
        "image_properties": dict(image or {}),
    }


def parse(extra_specs=None, image=None, **kw) -> InstanceRequest:
    return parse_request(doc(extra_specs, image, **kw))


def rejects(extra_specs=None, image=None, *, keys=(), match=None, **kw) -> InvalidRequest:
    """Assert the request is refused and that the error names every key in `keys`."""
    with pytest.raises(InvalidRequest, match=match) as info:
        parse(extra_specs, image, **kw)
    for key in keys:
        assert key in info.value.keys, (key, info.value.keys, str(info.value))
        assert key in str(info.value)
    return info.value


def cells(req: InstanceRequest) -> list[tuple[list[int], int, list[int]]]:
    return [(sorted(c.vcpus), c.memory_mb, sorted(c.dedicated_vcpus)) for c in req.cells]


# --- document shape --------------------------------------------------------------------------------


class TestDocument:
    def test_formats_md_example(self):
        req = parse(
            {
                "hw:cpu_policy": "dedicated",
                "hw:numa_nodes": "2",
                "hw:cpu_thread_policy": "prefer",
                "hw:mem_page_size": "2048",
                "compute:live_migration_post_copy": "true",
            },
            {"hw_emulator_threads_policy": "isolate"},
        )
        assert req.uuid == UUID and req.vcpus == 8 and req.memory_mb == 8192
        assert req.cpu_policy is CpuPolicy.DEDICATED and req.is_pinned
        assert req.thread_policy is ThreadPolicy.PREFER
        assert req.emulator_threads is EmulatorThreadsPolicy.ISOLATE
        assert req.page_size == PageSizeWish(PageSizeKind.EXPLICIT, 2048)
        assert cells(req) == [([0, 1, 2, 3], 4096, [0, 1, 2, 3]), ([4, 5, 6, 7], 4096, [4, 5, 6, 7])]
        assert [c.id for c in req.cells] == [0, 1]
        assert not req.numa_implicit
        assert req.migration.post_copy is True and req.migration.auto_converge is None
        assert req.migration.post_copy_key == "compute:live_migration_post_copy"

    def test_accepts_bytes_and_str_json(self):
        d = doc({"hw:cpu_policy": "dedicated"})
        expected = parse_request(d)
        assert parse_request(json.dumps(d)) == expected
        assert parse_request(json.dumps(d).encode()) == expected
        assert parse_request(bytearray(json.dumps(d).encode())) == expected

    def test_extra_top_level_keys_and_missing_metadata_are_fine(self):
        req = parse_request({"uuid": UUID, "vcpus": 2, "memory_mb": 512, "name": "x", "flavor": {}})
        assert req.cpu_policy is CpuPolicy.SHARED
        assert cells(req) == [([0, 1], 512, [])]

    @pytest.mark.parametrize(
        "raw",
        [b"{", b"\xff\xfe", "null", "[]", "42", '"str"', None, [], 3, "{}"],
    )
    def test_malformed_documents(self, raw):
        with pytest.raises(InvalidRequest):
            parse_request(raw)

    @pytest.mark.parametrize(
        "field,value",
        [
            ("vcpus", "8"),
            ("vcpus", 8.0),
            ("vcpus", True),
            ("memory_mb", None),
            ("uuid", 12),
            ("extra_specs", []),
            ("image_properties", "x"),
        ],
    )
    def test_wrong_types_name_the_field(self, field, value):
        d = doc()
        d[field] = value
        with pytest.raises(InvalidRequest) as info:
            parse_request(d)
        assert info.value.keys == (field,)

    @pytest.mark.parametrize("field", ["uuid", "vcpus", "memory_mb"])
    def test_missing_required_field_is_named(self, field):
        d = doc()
        del d[field]
        with pytest.raises(InvalidRequest) as info:
            parse_request(d)
        assert info.value.keys == (field,)

    @pytest.mark.parametrize(
        "uuid",
        [
            "",
            "x",
            "8d5b0c1e5f2a4c4e9f517f2d1c0e9a10",
            "{8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10}",
            "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a1g",
            "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10\n",
        ],
    )
    def test_bad_uuid(self, uuid):
        rejects(uuid=uuid, keys=["uuid"])

    def test_uuid_is_normalised_to_lower_case(self):
        assert parse(uuid=UUID.upper()).uuid == UUID

    @pytest.mark.parametrize(
        "vcpus,memory_mb,key",
        [
            (0, 1024, "vcpus"),
            (-1, 1024, "vcpus"),
            (MAX_VCPUS + 1, 1024, "vcpus"),
            (10**30, 1024, "vcpus"),
            (1, 0, "memory_mb"),
            (1, -5, "memory_mb"),
            (1, MAX_MEMORY_MB + 1, "memory_mb"),
        ],
    )
    def test_absurd_sizes(self, vcpus, memory_mb, key):
        rejects(vcpus=vcpus, memory_mb=memory_mb, keys=[key])

    def test_limits_are_inclusive(self):
        req = parse(vcpus=MAX_VCPUS, memory_mb=MAX_MEMORY_MB)
        assert req.vcpus == MAX_VCPUS and req.memory_mb == MAX_MEMORY_MB

    def test_unknown_keys_are_ignored(self):
        req = parse(
            {
                "hw:cpu_sockets": "2",
                "hw:watchdog_action": "reset",
                "quota:cpu_shares": "10",
                "aggregate_instance_extra_specs:ssd": "true",
                "hw:numa_cpus_foo": "x",
                "resources:CUSTOM_X": "1",
            },
            {"os_distro": "ubuntu", "hw_disk_bus": "virtio", "hw_cpu_dedicated_mask": "^0"},
        )
        assert req.cpu_policy is CpuPolicy.SHARED

    def test_non_string_values(self):
        # typed image properties are accepted by their text ...
        req = parse({"hw:cpu_policy": "dedicated"}, {"hw_numa_nodes": 2, "compute_live_migration_post_copy": True})
        assert len(req.cells) == 2 and req.migration.post_copy is True
        # ... but not floats, lists or null-ish containers on known keys
        rejects({"hw:numa_nodes": 2.0}, keys=["hw:numa_nodes"])
        rejects({"hw:cpu_policy": ["dedicated"]}, keys=["hw:cpu_policy"])
        rejects({"hw:cpu_policy": "dedicated"}, {"hw_numa_nodes": True}, keys=["hw_numa_nodes"])

    def test_error_messages_cut_long_values(self):
        err = rejects({"hw:cpu_policy": "x" * 10000}, keys=["hw:cpu_policy"])
        assert len(str(err)) < 300


# --- CPU policy (get_cpu_policy_constraint) ------------------------------------------------------


class TestCpuPolicy:
    def test_default_is_shared(self):
        req = parse()
        assert req.cpu_policy is CpuPolicy.SHARED and not req.is_pinned
        assert req.thread_policy is ThreadPolicy.PREFER
        assert req.emulator_threads is EmulatorThreadsPolicy.SHARE
        assert req.page_size is None

    @pytest.mark.parametrize("word", ["shared", "dedicated"])
    def test_flavor_alone(self, word):
        assert parse({"hw:cpu_policy": word}).cpu_policy is CpuPolicy(word)

    @pytest.mark.parametrize("word", ["shared", "dedicated"])
    def test_image_alone(self, word):
        assert parse(image={"hw_cpu_policy": word}).cpu_policy is CpuPolicy(word)

    def test_image_mixed_with_flavor_mask(self):
        req = parse({"hw:cpu_dedicated_mask": "0-1"}, {"hw_cpu_policy": "mixed"})
        assert req.cpu_policy is CpuPolicy.MIXED

    @pytest.mark.parametrize("image", ["dedicated", "mixed"])
    def test_flavor_shared_image_pinned_is_refused(self, image):
        rejects({"hw:cpu_policy": "shared"}, {"hw_cpu_policy": image}, keys=["hw:cpu_policy", "hw_cpu_policy"])

    def test_flavor_mixed_image_dedicated_is_refused(self):
        rejects(
            {"hw:cpu_policy": "mixed", "hw:cpu_dedicated_mask": "0"},
            {"hw_cpu_policy": "dedicated"},
            keys=["hw:cpu_policy", "hw_cpu_policy"],
        )

    @pytest.mark.parametrize("image", ["shared", "dedicated", "mixed"])
    def test_flavor_dedicated_wins_over_any_image(self, image):
        # Nova: a dedicated flavor takes precedence; the image cannot weaken or change it.
        req = parse({"hw:cpu_policy": "dedicated"}, {"hw_cpu_policy": image})
        assert req.cpu_policy is CpuPolicy.DEDICATED

    @pytest.mark.parametrize("image", ["shared", "mixed"])
    def test_flavor_mixed_keeps_mixed(self, image):
        req = parse({"hw:cpu_policy": "mixed", "hw:cpu_dedicated_mask": "0"}, {"hw_cpu_policy": image})
        assert req.cpu_policy is CpuPolicy.MIXED

    def test_same_policy_in_both(self):
        assert parse({"hw:cpu_policy": "shared"}, {"hw_cpu_policy": "shared"}).cpu_policy is CpuPolicy.SHARED

    @pytest.mark.parametrize("word", ["Dedicated", "pinned", "", " dedicated", "isolate"])
    def test_unknown_policy_word(self, word):
        rejects({"hw:cpu_policy": word}, keys=["hw:cpu_policy"])
        rejects(image={"hw_cpu_policy": word}, keys=["hw_cpu_policy"])

    def test_dedicated_pins_every_vcpu(self):
        req = parse({"hw:cpu_policy": "dedicated"}, vcpus=4)
        assert cells(req) == [([0, 1, 2, 3], 8192, [0, 1, 2, 3])]


# --- thread policy (get_cpu_thread_policy_constraint) --------------------------------------------


class TestThreadPolicy:
    @pytest.mark.parametrize("word", ["prefer", "isolate", "require"])
    def test_flavor(self, word):
        req = parse({"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": word})
        assert req.thread_policy is ThreadPolicy(word)

    @pytest.mark.parametrize("word", ["prefer", "isolate", "require"])
    def test_image_when_flavor_silent(self, word):
        req = parse({"hw:cpu_policy": "dedicated"}, {"hw_cpu_thread_policy": word})
        assert req.thread_policy is ThreadPolicy(word)

    @pytest.mark.parametrize("word", ["isolate", "require"])
    def test_flavor_prefer_lets_image_refine(self, word):
        req = parse({"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": "prefer"}, {"hw_cpu_thread_policy": word})
        assert req.thread_policy is ThreadPolicy(word)

    @pytest.mark.parametrize(
        "flavor,image", [("isolate", "require"), ("require", "isolate"), ("isolate", "prefer"), ("require", "prefer")]
    )
    def test_flavor_strict_image_different_is_refused(self, flavor, image):
        rejects(
            {"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": flavor},
            {"hw_cpu_thread_policy": image},
            keys=["hw:cpu_thread_policy", "hw_cpu_thread_policy"],
        )

    @pytest.mark.parametrize("word", ["isolate", "require"])
    def test_flavor_and_image_agree(self, word):
        req = parse({"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": word}, {"hw_cpu_thread_policy": word})
        assert req.thread_policy is ThreadPolicy(word)

    @pytest.mark.parametrize("policy", [None, "shared"])
    @pytest.mark.parametrize("where", ["flavor", "image"])
    def test_thread_policy_needs_pinning(self, policy, where):
        specs = {} if policy is None else {"hw:cpu_policy": policy}
        image = {}
        if where == "flavor":
            specs["hw:cpu_thread_policy"] = "prefer"
            key = "hw:cpu_thread_policy"
        else:
            image["hw_cpu_thread_policy"] = "isolate"
            key = "hw_cpu_thread_policy"
        rejects(specs, image, keys=[key], match="CPUThreadPolicyConfigurationInvalid")

    def test_thread_policy_with_mixed(self):
        req = parse({"hw:cpu_policy": "mixed", "hw:cpu_dedicated_mask": "0-3", "hw:cpu_thread_policy": "require"})
        assert req.thread_policy is ThreadPolicy.REQUIRE

    @pytest.mark.parametrize("word", ["Prefer", "avoid", ""])
    def test_unknown_word(self, word):
        rejects({"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": word}, keys=["hw:cpu_thread_policy"])


# --- emulator threads (get_emulator_thread_policy_constraint) ------------------------------------


class TestEmulatorThreads:
    @pytest.mark.parametrize("policy", ["dedicated", "mixed"])
    def test_isolate_with_pinning(self, policy):
        specs = {"hw:cpu_policy": policy, "hw:emulator_threads_policy": "isolate"}
        if policy == "mixed":
            specs["hw:cpu_dedicated_mask"] = "^0"
        assert parse(specs).emulator_threads is EmulatorThreadsPolicy.ISOLATE

    @pytest.mark.parametrize("specs", [{}, {"hw:cpu_policy": "shared"}])
    def test_isolate_without_pinning_is_refused(self, specs):
        rejects(
            dict(specs, **{"hw:emulator_threads_policy": "isolate"}),
            keys=["hw:emulator_threads_policy"],
            match="BadRequirementEmulatorThreadsPolicy",
        )

    def test_share_is_fine_with_shared(self):
        assert parse({"hw:emulator_threads_policy": "share"}).emulator_threads is EmulatorThreadsPolicy.SHARE

    def test_image_property_is_honoured(self):
        req = parse({"hw:cpu_policy": "dedicated"}, {"hw_emulator_threads_policy": "isolate"})
        assert req.emulator_threads is EmulatorThreadsPolicy.ISOLATE

    def test_flavor_and_image_disagree(self):
        rejects(
            {"hw:cpu_policy": "dedicated", "hw:emulator_threads_policy": "share"},
            {"hw_emulator_threads_policy": "isolate"},
            keys=["hw:emulator_threads_policy", "hw_emulator_threads_policy"],
        )

    def test_unknown_word(self):
        rejects(
            {"hw:cpu_policy": "dedicated", "hw:emulator_threads_policy": "shared"}, keys=["hw:emulator_threads_policy"]
        )


# --- dedicated mask / mixed (get_dedicated_cpu_constraint) ---------------------------------------


class TestMixed:
    def test_exclusion_form(self):
        req = parse({"hw:cpu_policy": "mixed", "hw:cpu_dedicated_mask": "^0-1"}, vcpus=4)
        assert req.cpu_policy is CpuPolicy.MIXED
        assert cells(req) == [([0, 1, 2, 3], 8192, [2, 3])]
        assert req.cells[0].floating_vcpus == frozenset({0, 1})

    def test_explicit_form(self):
        req = parse({"hw:cpu_policy": "mixed", "hw:cpu_dedicated_mask": "1,3-4"}, vcpus=6)
        assert cells(req)[0][2] == [1, 3, 4]

    def test_mixed_form_with_inner_exclusion(self):
        req = parse({"hw:cpu_policy": "mixed", "hw:cpu_dedicated_mask": "0-5,^2"}, vcpus=8)
        assert cells(req)[0][2] == [0, 1, 3, 4, 5]

    def test_mask_split_over_cells(self):
        req = parse({"hw:cpu_policy": "mixed", "hw:cpu_dedicated_mask": "^0,^4", "hw:numa_nodes": "2"})
        assert cells(req) == [([0, 1, 2, 3], 4096, [1, 2, 3]), ([4, 5, 6, 7], 4096, [5, 6, 7])]

    def test_mixed_without_mask(self):
        rejects(
            {"hw:cpu_policy": "mixed"},
            keys=["hw:cpu_policy", "hw:cpu_dedicated_mask"],
            match="RequiredMixedOrRealtimeCPUMask",
        )

    @pytest.mark.parametrize("policy", [None, "shared", "dedicated"])
    def test_mask_without_mixed(self, policy):
        specs = {"hw:cpu_dedicated_mask": "0"}
        if policy:
            specs["hw:cpu_policy"] = policy
        rejects(specs, keys=["hw:cpu_dedicated_mask"], match="RequiredMixedInstancePolicy")

    @pytest.mark.parametrize("mask", ["0-7", "^0-7", "^0-100", "", ",", "^0-3,^4-7", "0-7,^8"])
    def test_mask_must_leave_shared_and_dedicated(self, mask):
        rejects({"hw:cpu_policy": "mixed", "hw:cpu_dedicated_mask": mask}, keys=["hw:cpu_dedicated_mask"])

    @pytest.mark.parametrize("mask", ["8", "0,9", "6-9"])
    def test_mask_outside_flavor(self, mask):
        rejects({"hw:cpu_policy": "mixed", "hw:cpu_dedicated_mask": mask}, keys=["hw:cpu_dedicated_mask"])

    @pytest.mark.parametrize("mask", ["a", "1-", "-1", "3-1", "1--2", "^", "1^2", "0x1", "1.0"])
    def test_mask_syntax(self, mask):
        rejects({"hw:cpu_policy": "mixed", "hw:cpu_dedicated_mask": mask}, keys=["hw:cpu_dedicated_mask"])

    def test_realtime_mask_names_dedicated_vcpus(self):
        req = parse({"hw:cpu_policy": "mixed", "hw:cpu_realtime": "yes", "hw:cpu_realtime_mask": "^0-1"}, vcpus=4)
        assert cells(req)[0][2] == [2, 3]

    def test_image_realtime_mask_goes_first(self):
        req = parse(
            {"hw:cpu_policy": "mixed", "hw:cpu_realtime": "true", "hw:cpu_realtime_mask": "^0"},
            {"hw_cpu_realtime_mask": "^0-2"},
            vcpus=4,
        )
        assert cells(req)[0][2] == [3]

    def test_realtime_and_dedicated_mask_together(self):
        rejects(
            {
                "hw:cpu_policy": "mixed",
                "hw:cpu_realtime": "yes",
                "hw:cpu_realtime_mask": "^0",
                "hw:cpu_dedicated_mask": "^0",
            },
            keys=["hw:cpu_dedicated_mask", "hw:cpu_realtime_mask"],
            match="RequiredMixedOrRealtimeCPUMask",
        )

    def test_realtime_needs_pinning(self):
        rejects(
            {"hw:cpu_realtime": "yes", "hw:cpu_realtime_mask": "^0"},
            keys=["hw:cpu_realtime"],
            match="RealtimeConfigurationInvalid",
        )

    def test_realtime_off_is_ignored(self):
        # Nova reads hw:cpu_realtime with a non-strict bool: anything not truthy means "off"
        req = parse({"hw:cpu_realtime": "maybe", "hw:cpu_realtime_mask": "garbage"})
        assert req.cpu_policy is CpuPolicy.SHARED

    def test_realtime_all_vcpus_needs_emulator_policy(self):
        rejects(
            {"hw:cpu_policy": "dedicated", "hw:cpu_realtime": "yes"},
            keys=["hw:cpu_realtime"],
            match="RealtimeMaskNotFoundOrInvalid",
        )
        req = parse({"hw:cpu_policy": "dedicated", "hw:cpu_realtime": "yes", "hw:emulator_threads_policy": "isolate"})
        assert req.emulator_threads is EmulatorThreadsPolicy.ISOLATE


# --- page size (_get_numa_pagesize_constraint) ---------------------------------------------------


LARGE = PageSizeWish(PageSizeKind.LARGE)
ANY = PageSizeWish(PageSizeKind.ANY)
SMALL = PageSizeWish(PageSizeKind.SMALL)


def kb(n: int) -> PageSizeWish:
    return PageSizeWish(PageSizeKind.EXPLICIT, n)


class TestPageSize:
    @pytest.mark.parametrize(
        "value,expected",
        [
            ("small", SMALL),
            ("large", LARGE),
            ("any", ANY),
            ("4", kb(4)),
            ("2048", kb(2048)),
            ("1048576", kb(1048576)),
            ("2MB", kb(2048)),
            ("2MiB", kb(2048)),
            ("1GB", kb(1048576)),
            ("1GiB", kb(1048576)),
            ("2048KB", kb(2048)),
            ("2048KiB", kb(2048)),
            ("16Mb", kb(2048)),
            ("16Mbit", kb(2048)),
            ("0.5GB", kb(524288)),
            ("+2MB", kb(2048)),
            ("64KB", kb(64)),
        ],
    )
    def test_flavor_values(self, value, expected):
        req = parse({"hw:mem_page_size": value})
        assert req.page_size == expected
        assert req.numa_implicit and len(req.cells) == 1

    @pytest.mark.parametrize(
        "value",
        [
            "",
            "Large",
            "SMALL",
            "huge",
            "2M",
            "2mb",
            "2kB",
            "-2MB",
            "0",
            "2",
            "1B",
            "3b",
            "2 MB",
            "1TB",
            "99999999999999GB",
            "0x800",
            "2048.5",
            "1e3",
            "²",
        ],
    )
    def test_invalid_values(self, value):
        rejects({"hw:mem_page_size": value}, keys=["hw:mem_page_size"])

    def test_image_without_flavor_is_forbidden(self):
        rejects(
            image={"hw_mem_page_size": "large"},
            keys=["hw_mem_page_size", "hw:mem_page_size"],
            match="MemoryPageSizeForbidden",
        )

    @pytest.mark.parametrize("flavor", ["large", "any"])
    @pytest.mark.parametrize(
        "image,expected", [("small", SMALL), ("large", LARGE), ("any", ANY), ("2048", kb(2048)), ("1GB", kb(1048576))]
    )
    def test_image_refines_large_or_any(self, flavor, image, expected):
        # Nova returns the image's request whatever it is, 'small' included.
        req = parse({"hw:mem_page_size": flavor}, {"hw_mem_page_size": image})
        assert req.page_size == expected

    @pytest.mark.parametrize("flavor", ["small", "2048", "2MB", "1GB"])
    @pytest.mark.parametrize("image", ["small", "large", "any", "2048", "1GB"])
    def test_image_cannot_override_small_or_explicit(self, flavor, image):
        # even an image repeating the flavor's exact size is refused (Nova)
        rejects(
            {"hw:mem_page_size": flavor},
            {"hw_mem_page_size": image},
            keys=["hw:mem_page_size", "hw_mem_page_size"],
            match="MemoryPageSizeForbidden",
        )

    def test_invalid_image_value_under_large(self):
        rejects({"hw:mem_page_size": "large"}, {"hw_mem_page_size": "huge"}, keys=["hw_mem_page_size"])

    def test_invalid_flavor_value_with_image(self):
        rejects({"hw:mem_page_size": "huge"}, {"hw_mem_page_size": "large"}, keys=["hw:mem_page_size"])


# --- guest NUMA cells -----------------------------------------------------------------------------


class TestCells:
    def test_plain_shared_gets_one_implicit_cell(self):
        req = parse(vcpus=3, memory_mb=1000)
        assert req.numa_implicit
        assert cells(req) == [([0, 1, 2], 1000, [])]

    @pytest.mark.parametrize(
        "specs",
        [
            {"hw:cpu_policy": "dedicated"},
            {"hw:mem_page_size": "large"},
            {"hw:cpu_policy": "dedicated", "hw:emulator_threads_policy": "isolate"},
        ],
    )
    def test_no_numa_nodes_means_one_implicit_cell(self, specs):
        req = parse(specs, vcpus=5, memory_mb=1001)
        assert req.numa_implicit and len(req.cells) == 1
        assert sorted(req.cells[0].vcpus) == [0, 1, 2, 3, 4] and req.cells[0].memory_mb == 1001

    @pytest.mark.parametrize("nodes", [1, 2, 4, 8])
    def test_even_split(self, nodes):
        req = parse({"hw:numa_nodes": str(nodes)}, vcpus=8, memory_mb=16384)
        assert not req.numa_implicit
        per = 8 // nodes
        assert cells(req) == [(list(range(n * per, (n + 1) * per)), 16384 // nodes, []) for n in range(nodes)]

    def test_even_split_from_image(self):
        req = parse(image={"hw_numa_nodes": "2"})
        assert len(req.cells) == 2 and not req.numa_implicit

    @pytest.mark.parametrize("vcpus,memory_mb", [(6, 8192), (8, 8191), (2, 8192)])
    def test_uneven_split_is_refused(self, vcpus, memory_mb):
        rejects(
            {"hw:numa_nodes": "4"},
            vcpus=vcpus,
            memory_mb=memory_mb,
            keys=["hw:numa_nodes"],
            match="ImageNUMATopologyAsymmetric",
        )

    @pytest.mark.parametrize("value", ["0", "-1", "02", "2.0", "two", "", " 2", "65", "99999999999999"])
    def test_bad_node_count(self, value):
        rejects({"hw:numa_nodes": value}, keys=["hw:numa_nodes"])

    def test_64_nodes(self):
        req = parse({"hw:numa_nodes": "64"}, vcpus=64, memory_mb=64 * 1024)
        assert len(req.cells) == 64

    def test_node_count_conflict(self):
        rejects(
            {"hw:numa_nodes": "2"},
            {"hw_numa_nodes": "4"},
            keys=["hw:numa_nodes", "hw_numa_nodes"],
            match="ImageNUMATopologyForbidden",
        )

    def test_same_node_count_in_both_is_accepted(self):
        assert len(parse({"hw:numa_nodes": "2"}, {"hw_numa_nodes": "2"}).cells) == 2

    def test_explicit_cells(self):
        req = parse(
            {
                "hw:numa_nodes": "2",
                "hw:cpu_policy": "dedicated",
                "hw:numa_cpus.0": "0-2",
                "hw:numa_cpus.1": "3-7",
                "hw:numa_mem.0": "2048",
                "hw:numa_mem.1": "6144",
            }
        )
        assert cells(req) == [([0, 1, 2], 2048, [0, 1, 2]), ([3, 4, 5, 6, 7], 6144, [3, 4, 5, 6, 7])]

    def test_explicit_cells_interleaved_with_exclusions(self):
        req = parse(
            {
                "hw:numa_nodes": "2",
                "hw:numa_cpus.0": "0-7,^1,^3,^5,^7",
                "hw:numa_cpus.1": "1,3,5,7",
                "hw:numa_mem.0": "4096",
                "hw:numa_mem.1": "4096",
            }
        )
        assert cells(req) == [([0, 2, 4, 6], 4096, []), ([1, 3, 5, 7], 4096, [])]

    def test_explicit_cells_from_image(self):
        req = parse(
            {"hw:cpu_policy": "dedicated"},
            {
                "hw_numa_nodes": "2",
                "hw_numa_cpus.0": "0-3",
                "hw_numa_cpus.1": "4-7",
                "hw_numa_mem.0": 1024,
                "hw_numa_mem.1": "7168",
            },
        )
        assert cells(req)[1] == ([4, 5, 6, 7], 7168, [4, 5, 6, 7])

    def test_explicit_cells_mixed(self):
        req = parse(
            {
                "hw:numa_nodes": "2",
                "hw:cpu_policy": "mixed",
                "hw:cpu_dedicated_mask": "2-5",
                "hw:numa_cpus.0": "0-3",
                "hw:numa_cpus.1": "4-7",
                "hw:numa_mem.0": "4096",
                "hw:numa_mem.1": "4096",
            }
        )
        assert [c[2] for c in cells(req)] == [[2, 3], [4, 5]]

    def test_explicit_single_cell_without_numa_nodes(self):
        req = parse({"hw:numa_cpus.0": "0-7", "hw:numa_mem.0": "8192", "hw:cpu_policy": "dedicated"})
        assert req.numa_implicit and len(req.cells) == 1

    def test_vcpu_in_two_cells(self):
        rejects(
            {
                "hw:numa_nodes": "2",
                "hw:numa_cpus.0": "0-4",
                "hw:numa_cpus.1": "4-7",
                "hw:numa_mem.0": "4096",
                "hw:numa_mem.1": "4096",
            },
            keys=["hw:numa_cpus.0", "hw:numa_cpus.1"],
            match="ImageNUMATopologyCPUDuplicates",
        )

    def test_vcpu_in_no_cell(self):
        rejects(
            {
                "hw:numa_nodes": "2",
                "hw:numa_cpus.0": "0-2",
                "hw:numa_cpus.1": "4-7",
                "hw:numa_mem.0": "4096",
                "hw:numa_mem.1": "4096",
            },
            keys=["hw:numa_cpus.0", "hw:numa_cpus.1"],
            match="ImageNUMATopologyCPUsUnassigned",
        )

    def test_vcpu_out_of_range(self):
        rejects(
            {
                "hw:numa_nodes": "2",
                "hw:numa_cpus.0": "0-3",
                "hw:numa_cpus.1": "4-8",
                "hw:numa_mem.0": "4096",
                "hw:numa_mem.1": "4096",
            },
            keys=["hw:numa_cpus.1"],
        )

    def test_huge_range_is_refused_cheaply(self):
        rejects(
            {"hw:numa_nodes": "1", "hw:numa_cpus.0": "0-999999999", "hw:numa_mem.0": "8192"}, keys=["hw:numa_cpus.0"]
        )

    @pytest.mark.parametrize("spec", ["", "^0", "0-3,^0-3", ","])
    def test_cell_without_vcpus(self, spec):
        rejects(
            {
                "hw:numa_nodes": "2",
                "hw:numa_cpus.0": "0-7",
                "hw:numa_cpus.1": spec,
                "hw:numa_mem.0": "4096",
                "hw:numa_mem.1": "4096",
            },
            keys=["hw:numa_cpus.1"],
        )

    def test_memory_must_sum(self):
        rejects(
            {
                "hw:numa_nodes": "2",
                "hw:numa_cpus.0": "0-3",
                "hw:numa_cpus.1": "4-7",
                "hw:numa_mem.0": "4096",
                "hw:numa_mem.1": "4095",
            },
            keys=["hw:numa_mem.0", "hw:numa_mem.1", "memory_mb"],
            match="ImageNUMATopologyMemoryOutOfRange",
        )

    @pytest.mark.parametrize("mem", ["0", "-1", "1.5", "4GB", "", "x"])
    def test_bad_cell_memory(self, mem):
        rejects(
            {
                "hw:numa_nodes": "2",
                "hw:numa_cpus.0": "0-3",
                "hw:numa_cpus.1": "4-7",
                "hw:numa_mem.0": "8192",
                "hw:numa_mem.1": mem,
            },
            keys=["hw:numa_mem.1"],
        )

    def test_missing_cell(self):
        rejects(
            {
                "hw:numa_nodes": "3",
                "hw:numa_cpus.0": "0-3",
                "hw:numa_cpus.2": "4-7",
                "hw:numa_mem.0": "4096",
                "hw:numa_mem.2": "4096",
            },
            keys=["hw:numa_nodes", "hw:numa_cpus.1", "hw:numa_mem.1"],
            match="Incomplete",
        )

    def test_cell_beyond_node_count(self):
        rejects(
            {
                "hw:numa_nodes": "1",
                "hw:numa_cpus.0": "0-3",
                "hw:numa_cpus.1": "4-7",
                "hw:numa_mem.0": "4096",
                "hw:numa_mem.1": "4096",
            },
            keys=["hw:numa_cpus.1", "hw:numa_mem.1"],
            match="Incomplete",
        )

    def test_cpus_without_mem(self):
        rejects(
            {"hw:numa_nodes": "2", "hw:numa_cpus.0": "0-3", "hw:numa_cpus.1": "4-7"},
            keys=["hw:numa_cpus.0", "hw:numa_cpus.1"],
            match="Incomplete",
        )

    def test_mem_without_cpus(self):
        rejects(
            {"hw:numa_nodes": "2", "hw:numa_mem.0": "4096", "hw:numa_mem.1": "4096"},
            keys=["hw:numa_mem.0", "hw:numa_mem.1"],
            match="Incomplete",
        )

    @pytest.mark.parametrize(
        "key",
        ["hw:numa_cpus.", "hw:numa_cpus.a", "hw:numa_cpus.01", "hw:numa_cpus", "hw:numa_mem.-1", "hw:numa_mem.1.0"],
    )
    def test_malformed_cell_keys(self, key):
        rejects({"hw:numa_nodes": "1", key: "0"}, keys=[key])

    def test_flavor_and_image_cells_disagree(self):
        rejects(
            {
                "hw:numa_nodes": "2",
                "hw:numa_cpus.0": "0-3",
                "hw:numa_cpus.1": "4-7",
                "hw:numa_mem.0": "4096",
                "hw:numa_mem.1": "4096",
            },
            {"hw_numa_cpus.0": "0-2", "hw_numa_cpus.1": "3-7"},
            keys=["hw:numa_cpus.0", "hw_numa_cpus.0"],
            match="ImageNUMATopologyForbidden",
        )
        rejects(
            {
                "hw:numa_nodes": "2",
                "hw:numa_cpus.0": "0-3",
                "hw:numa_cpus.1": "4-7",
                "hw:numa_mem.0": "4096",
                "hw:numa_mem.1": "4096",
            },
            {"hw_numa_mem.0": "2048", "hw_numa_mem.1": "6144"},
            keys=["hw:numa_mem.1", "hw_numa_mem.1"],
            match="ImageNUMATopologyForbidden",
        )

    def test_flavor_and_image_cells_agree(self):
        req = parse(
            {
                "hw:numa_nodes": "2",
                "hw:numa_cpus.0": "0-3",
                "hw:numa_cpus.1": "4-7",
                "hw:numa_mem.0": "4096",
                "hw:numa_mem.1": "4096",
            },
            {
                "hw_numa_nodes": "2",
                "hw_numa_cpus.0": "0,1,2,3",
                "hw_numa_cpus.1": "4-7",
                "hw_numa_mem.0": "4096",
                "hw_numa_mem.1": "4096",
            },
        )
        assert len(req.cells) == 2

    def test_cells_are_split_across_sources(self):
        # flavor gives the CPUs, image the memory: allowed (each list comes from one source)
        req = parse(
            {"hw:numa_nodes": "2", "hw:numa_cpus.0": "0-3", "hw:numa_cpus.1": "4-7"},
            {"hw_numa_mem.0": "4096", "hw_numa_mem.1": "4096"},
        )
        assert [c.memory_mb for c in req.cells] == [4096, 4096]


class TestCpuSpec:
    @pytest.mark.parametrize(
        "spec,expected",
        [
            ("0-3,^2,5", {0, 1, 3, 5}),
            ("1", {1}),
            (" 1 , 2 ", {1, 2}),
            ("0-3,^1-2", {0, 3}),
            ("1,,2", {1, 2}),
            ("^1,0-2", {0, 2}),
            ("", set()),
            ("0 - 2", {0, 1, 2}),
            ("^50", set()),
        ],
    )
    def test_syntax(self, spec, expected):
        assert parse_cpu_spec(spec, "k", max_id=10) == frozenset(expected)

    @pytest.mark.parametrize("spec", ["x", "1-", "2-1", "^-1", "1,2-a", "١", "1 2", "11"])
    def test_errors(self, spec):
        with pytest.raises(InvalidRequest) as info:
            parse_cpu_spec(spec, "k", max_id=10)
        assert info.value.keys == ("k",)


# --- live-migration keys -------------------------------------------------------------------------


class TestMigration:
    def test_default_is_unsaid(self):
        m = parse().migration
        assert m.auto_converge is None and m.post_copy is None
        assert m.auto_converge_key is None and m.post_copy_key is None

    @pytest.mark.parametrize(
        "word,value",
        [
            ("true", True),
            ("True", True),
            ("YES", True),
            ("1", True),
            ("on", True),
            ("t", True),
            ("y", True),
            (" true ", True),
            ("false", False),
            ("No", False),
            ("0", False),
            ("OFF", False),
            ("f", False),
            ("n", False),
        ],
    )
    def test_bool_words(self, word, value):
        m = parse({"compute:live_migration_auto_converge": word}).migration
        assert m.auto_converge is value and m.auto_converge_key == "compute:live_migration_auto_converge"

    @pytest.mark.parametrize("word", ["", "maybe", "2", "enabled", "tru", "yes please"])
    def test_bad_bool_words(self, word):
        rejects({"compute:live_migration_post_copy": word}, keys=["compute:live_migration_post_copy"])
        rejects(image={"compute_live_migration_post_copy": word}, keys=["compute_live_migration_post_copy"])

    def test_image_alone(self):
        m = parse(image={"compute_live_migration_post_copy": "true"}).migration
        assert m.post_copy is True and m.post_copy_key == "compute_live_migration_post_copy"

    def test_flavor_key_recorded_when_both_agree(self):
        m = parse(
            {"compute:live_migration_auto_converge": "true"}, {"compute_live_migration_auto_converge": "yes"}
        ).migration
        assert m.auto_converge is True and m.auto_converge_key == "compute:live_migration_auto_converge"

    @pytest.mark.parametrize("feature", ["auto_converge", "post_copy"])
    @pytest.mark.parametrize("flavor,image", [("true", "false"), ("false", "true")])
    def test_flavor_and_image_disagree(self, feature, flavor, image):
        fkey, ikey = f"compute:live_migration_{feature}", f"compute_live_migration_{feature}"
        rejects({fkey: flavor}, {ikey: image}, keys=[fkey, ikey])

    @pytest.mark.parametrize(
        "specs,image,keys",
        [
            (
                {"compute:live_migration_auto_converge": "true", "compute:live_migration_post_copy": "true"},
                {},
                ["compute:live_migration_auto_converge", "compute:live_migration_post_copy"],
            ),
            (
                {"compute:live_migration_auto_converge": "true"},
                {"compute_live_migration_post_copy": "1"},
                ["compute:live_migration_auto_converge", "compute_live_migration_post_copy"],
            ),
            (
                {},
                {"compute_live_migration_auto_converge": "on", "compute_live_migration_post_copy": "yes"},
                ["compute_live_migration_auto_converge", "compute_live_migration_post_copy"],
            ),
            (
                {"compute:live_migration_post_copy": "true"},
                {"compute_live_migration_auto_converge": "true"},
                ["compute_live_migration_auto_converge", "compute:live_migration_post_copy"],
            ),
        ],
    )
    def test_both_features_true(self, specs, image, keys):
        rejects(specs, image, keys=keys)

    def test_one_true_one_false(self):
        m = parse(
            {"compute:live_migration_auto_converge": "false", "compute:live_migration_post_copy": "true"}
        ).migration
        assert m.auto_converge is False and m.post_copy is True

    @pytest.mark.parametrize(
        "where,key",
        [
            ("flavor", "compute:live_migration_postcopy"),
            ("flavor", "compute:live_migration_auto_converge.0"),
            ("image", "compute_live_migration_autoconverge"),
            ("flavor", "compute_live_migration_post_copy"),
            ("image", "compute:live_migration_post_copy"),
        ],
    )
    def test_typos_and_wrong_spelling_for_the_source(self, where, key):
        if where == "flavor":
            rejects({key: "true"}, keys=[key])
        else:
            rejects(image={key: "true"}, keys=[key])

    def test_other_compute_keys_ignored(self):
        assert parse({"compute:foo": "x"}).migration.post_copy is None


# --- canonical form -------------------------------------------------------------------------------


class TestCanonical:
    def test_shape(self):
        req = parse(
            {
                "hw:cpu_policy": "mixed",
                "hw:cpu_dedicated_mask": "^0",
                "hw:numa_nodes": "2",
                "hw:mem_page_size": "1GB",
                "compute:live_migration_auto_converge": "yes",
            },
            vcpus=4,
        )
        out = request_to_json(req)
        assert out == {
            "uuid": UUID,
            "vcpus": 4,
            "memory_mb": 8192,
            "cells": [
                {"id": 0, "vcpus": [0, 1], "memory_mb": 4096, "dedicated_vcpus": [1]},
                {"id": 1, "vcpus": [2, 3], "memory_mb": 4096, "dedicated_vcpus": [2, 3]},
            ],
            "cpu_policy": "mixed",
            "thread_policy": "prefer",
            "emulator_threads": "share",
            "page_size": {"kind": "explicit", "size_kb": 1048576},
            "numa_implicit": False,
            "migration": {"auto_converge": True, "post_copy": None},
        }
        json.dumps(out)  # JSON-serialisable as is

    def test_equivalent_spellings_are_equal(self):
        a = parse(
            {
                "hw:cpu_policy": "dedicated",
                "hw:numa_nodes": "2",
                "hw:mem_page_size": "2048",
                "compute:live_migration_post_copy": "true",
            }
        )
        b = parse(
            {"hw:mem_page_size": "2MB"},
            {"hw_cpu_policy": "dedicated", "hw_numa_nodes": 2, "compute_live_migration_post_copy": "yes"},
        )
        c = parse(
            {
                "hw:cpu_policy": "dedicated",
                "hw:mem_page_size": "2048",
                "hw:numa_nodes": "2",
                "hw:numa_cpus.0": "0-3",
                "hw:numa_cpus.1": "4,5,6,7",
                "hw:numa_mem.0": "4096",
                "hw:numa_mem.1": "4096",
                "compute:live_migration_post_copy": "1",
            }
        )
        assert request_to_json(a) == request_to_json(b) == request_to_json(c)
        assert request_fingerprint(a) == request_fingerprint(b) == request_fingerprint(c)

    def test_different_requests_differ(self):
        base = {"hw:cpu_policy": "dedicated", "hw:numa_nodes": "2"}
        a = parse(base)
        for other in (
            parse(dict(base, **{"hw:numa_nodes": "1"})),
            parse(dict(base, **{"hw:cpu_thread_policy": "isolate"})),
            parse(dict(base, **{"compute:live_migration_post_copy": "false"})),
            parse(base, memory_mb=4096),
            parse(base, uuid="00000000-0000-0000-0000-000000000001"),
        ):
            assert request_to_json(a) != request_to_json(other)
            assert request_fingerprint(a) != request_fingerprint(other)


# --- the benchmark scenarios ----------------------------------------------------------------------


@pytest.mark.skipif(not FIT_SCENARIOS.exists(), reason=f"{FIT_SCENARIOS} absent")
def test_every_fit_scenario_instance_parses():
    scenarios = fit_scenarios()
    assert scenarios
    for scenario in scenarios:
        req = parse_request(scenario["instance"])
        covered = sorted(v for c in req.cells for v in c.vcpus)
        assert covered == list(range(req.vcpus)), scenario["name"]
        assert sum(c.memory_mb for c in req.cells) == req.memory_mb, scenario["name"]


# --- properties -----------------------------------------------------------------------------------

FLAVOR_KEYS = [
    "hw:numa_nodes",
    "hw:numa_cpus.0",
    "hw:numa_cpus.1",
    "hw:numa_cpus.2",
    "hw:numa_mem.0",
    "hw:numa_mem.1",
    "hw:numa_mem.2",
    "hw:cpu_policy",
    "hw:cpu_thread_policy",
    "hw:cpu_dedicated_mask",
    "hw:emulator_threads_policy",
    "hw:mem_page_size",
    "hw:cpu_realtime",
    "hw:cpu_realtime_mask",
    "compute:live_migration_auto_converge",
    "compute:live_migration_post_copy",
    "hw:numa_cpus.x",
]
IMAGE_KEYS = [
    "hw_numa_nodes",
    "hw_numa_cpus.0",
    "hw_numa_cpus.1",
    "hw_numa_mem.0",
    "hw_numa_mem.1",
    "hw_cpu_policy",
    "hw_cpu_thread_policy",
    "hw_emulator_threads_policy",
    "hw_mem_page_size",
    "hw_cpu_realtime_mask",
    "compute_live_migration_auto_converge",
    "compute_live_migration_post_copy",
]
# plausible words mixed with noise, so that random documents sometimes get deep into the rules
WORDS = [
    "0",
    "1",
    "2",
    "4",
    "0-1",
    "^0",
    "0-3",
    "2-3",
    "1024",
    "2048",
    "4096",
    "true",
    "false",
    "yes",
    "shared",
    "dedicated",
    "mixed",
    "prefer",
    "isolate",
    "require",
    "share",
    "small",
    "large",
    "any",
    "2MB",
    "1GB",
    "",
]
VALUES = st.one_of(
    st.sampled_from(WORDS),
    st.text(max_size=12),
    st.integers(-5, 5000),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=True),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.dictionaries(st.sampled_from(FLAVOR_KEYS), VALUES, max_size=8),
    image=st.dictionaries(st.sampled_from(IMAGE_KEYS), VALUES, max_size=6),
    vcpus=st.integers(-1, 10),
    memory_mb=st.integers(-1, 10000),
)
def test_random_metadata_only_raises_invalid_request(specs, image, vcpus, memory_mb):
    try:
        req = parse(specs, image, vcpus=vcpus, memory_mb=memory_mb)
    except InvalidRequest as exc:
        assert str(exc)
        return
    # whatever parses is internally consistent
    assert sorted(v for c in req.cells for v in c.vcpus) == list(range(req.vcpus))
    assert sum(c.memory_mb for c in req.cells) == req.memory_mb
    assert [c.id for c in req.cells] == list(range(len(req.cells)))
    for c in req.cells:
        assert c.dedicated_vcpus <= c.vcpus and c.vcpus
    pinned = frozenset(v for c in req.cells for v in c.dedicated_vcpus)
    if req.cpu_policy is CpuPolicy.DEDICATED:
        assert pinned == frozenset(range(req.vcpus))
    elif req.cpu_policy is CpuPolicy.SHARED:
        assert not pinned
        assert req.thread_policy is ThreadPolicy.PREFER
        assert req.emulator_threads is EmulatorThreadsPolicy.SHARE
    else:
        assert pinned and pinned != frozenset(range(req.vcpus))
    assert not (req.migration.auto_converge and req.migration.post_copy)
    json.dumps(request_to_json(req))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_random_bytes_only_raise_invalid_request(raw):
    with pytest.raises(InvalidRequest):
        parse_request(raw)


@st.composite
def numa_layouts(draw):
    """A random valid explicit layout: a partition of the vCPUs and of the memory into N cells."""
    nodes = draw(st.integers(1, 8))
    vcpus = draw(st.integers(nodes, 48))
    cell_of = draw(st.lists(st.integers(0, nodes - 1), min_size=vcpus, max_size=vcpus))
    # make sure no cell is empty: the first `nodes` vCPUs (after a shuffle) seed each cell
    order = draw(st.permutations(range(vcpus)))
    for n in range(nodes):
        cell_of[order[n]] = n
    mems = draw(st.lists(st.integers(1, 65536), min_size=nodes, max_size=nodes))
    policy = draw(st.sampled_from(["shared", "dedicated", "mixed"]))
    image = draw(st.booleans())
    return nodes, vcpus, cell_of, mems, policy, image


def _compact(ids: list[int]) -> str:
    """Write a CPU list with ranges, the way an operator would."""
    parts, ids = [], sorted(ids)
    start = prev = ids[0]
    for i in ids[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


@settings(max_examples=200, deadline=None)
@given(numa_layouts())
def test_explicit_layouts_round_trip(layout):
    nodes, vcpus, cell_of, mems, policy, use_image = layout
    prefix = "hw_" if use_image else "hw:"
    meta = {f"{prefix}numa_nodes": str(nodes)}
    for n in range(nodes):
        meta[f"{prefix}numa_cpus.{n}"] = _compact([v for v in range(vcpus) if cell_of[v] == n])
        meta[f"{prefix}numa_mem.{n}"] = str(mems[n])
    specs = {"hw:cpu_policy": policy}
    if policy == "mixed":
        if vcpus < 2:
            return
        specs["hw:cpu_dedicated_mask"] = "^0"
    req = (
        parse(specs, meta if use_image else None, vcpus=vcpus, memory_mb=sum(mems))
        if use_image
        else parse({**specs, **meta}, vcpus=vcpus, memory_mb=sum(mems))
    )
    assert len(req.cells) == nodes and not req.numa_implicit
    seen = [0] * vcpus
    for c in req.cells:
        assert c.memory_mb == mems[c.id]
        assert c.vcpus == frozenset(v for v in range(vcpus) if cell_of[v] == c.id)
        for v in c.vcpus:
            seen[v] += 1
    assert seen == [1] * vcpus
    assert sum(c.memory_mb for c in req.cells) == req.memory_mb
    dedicated = frozenset(v for c in req.cells for v in c.dedicated_vcpus)
    expected = {"shared": frozenset(), "dedicated": frozenset(range(vcpus)), "mixed": frozenset(range(1, vcpus))}[
        policy
    ]
    assert dedicated == expected


@settings(max_examples=200, deadline=None)
@given(nodes=st.integers(1, 64), per_cpu=st.integers(1, 8), per_mem=st.integers(1, 4096))
def test_even_splits_round_trip(nodes, per_cpu, per_mem):
    vcpus, memory_mb = nodes * per_cpu, nodes * per_mem
    req = parse({"hw:numa_nodes": str(nodes)}, vcpus=vcpus, memory_mb=memory_mb)
    assert len(req.cells) == nodes
    assert sorted(v for c in req.cells for v in c.vcpus) == list(range(vcpus))
    assert all(len(c.vcpus) == per_cpu and c.memory_mb == per_mem for c in req.cells)


def test_mixed_realtime_covering_every_vcpu_is_refused():
    rejects(
        {"hw:cpu_policy": "mixed", "hw:cpu_realtime": "yes", "hw:emulator_threads_policy": "isolate"},
        keys=["hw:cpu_realtime", "hw:cpu_policy"],
    )


def test_huge_integer_values_are_refused():
    rejects({"hw:cpu_policy": "dedicated"}, {"hw_numa_nodes": 10**5000}, keys=["hw_numa_nodes"])
