"""Method bodies, results and events: decoded once, bad fields named, bounds held (pure, no broker)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.bus import schemas as s
from agent.bus.errors import RemoteInvalidRequest, RemoteNoFit
from agent.errors import InvalidRequest
from agent.numa.placement import NoFit, Placement

UUID = "8d5b0c1e-5f2a-4c4e-9f51-7f2d1c0e9a10"
INSTANCE = {
    "uuid": UUID,
    "vcpus": 2,
    "memory_mb": 2048,
    "extra_specs": {"hw:cpu_policy": "dedicated", "hw:mem_page_size": "2048"},
    "image_properties": {},
}
PLACEMENT = {
    "fits": True,
    "cells": [
        {
            "guest_cell": 0,
            "host_cell": 1,
            "vcpus": [0, 1],
            "cpu_pins": {"0": [21], "1": [22]},
            "memory_mb": 2048,
            "pagesize_kb": 2048,
        }
    ],
    "emulator_pins": [23],
    "reason": None,
}
DESTINATION = {"host": "hv-02", "libvirt_uri": "qemu+tcp://10.0.0.2/system", "migration_uri": "tcp://10.0.0.2"}
CELL_FREE = {"id": 0, "free_pcpus": 10, "free_shared_vcpus": 40, "free_memory_mb": 100000, "free_pages": {"2048": 512}}
CAPABILITIES = {
    "host": "hv-01",
    "seq": 7,
    "agent_version": "0.1.0",
    "rpc_versions": {"min": "1.0", "max": "1.1"},
    "traits": ["COMPUTE_MIGRATE_AUTO_CONVERGE", "COMPUTE_MIGRATE_POST_COPY"],
    "libvirt_version": "9.0.0",
    "qemu_version": "7.2.0",
    "migration_uri": "tcp://10.0.0.1",
    "libvirt_uri": "qemu+tcp://10.0.0.1/system",
    "cells": [CELL_FREE],
    "ts": 1796131260.5,
}
POLICY = {"auto_converge": False, "post_copy": True, "decided_by": "compute:live_migration_post_copy=true"}
CLAIM_VIEW = {
    "migration_id": "m-1",
    "instance_uuid": UUID,
    "source_host": "hv-01",
    "state": "held",
    "created_at": 1796131260.0,
    "expires_at": 1796131560.0,
    "updated_at": 1796131260.0,
    "ttl_s": 300.0,
    "reason": None,
    "request": {"uuid": UUID},
    "placement": PLACEMENT,
}

#: one valid example for every body and result of the method table (docs/protocol.md has the same)
BODIES: dict[type, dict[str, Any]] = {
    s.Empty: {},
    s.DescribeInstanceBody: {"instance": UUID},
    s.LiveMigrateBodyV10: {"migration_id": "m-1", "instance": UUID, "destination": DESTINATION},
    s.LiveMigrateBody: {
        "migration_id": "m-1",
        "instance": UUID,
        "destination": DESTINATION,
        "placement": PLACEMENT,
        "claim_host": "hv-02",
    },
    s.MigrationIdBody: {"migration_id": "m-1"},
    s.ListMigrationsBody: {"limit": 10, "active_only": False},
    s.FitBody: {"instance": INSTANCE},
    s.ClaimBody: {"migration_id": "m-1", "instance": INSTANCE, "source_host": "hv-01", "ttl_s": 300},
    s.ExtendClaimBody: {"migration_id": "m-1", "ttl_s": 600},
    s.ConfirmClaimBody: {"migration_id": "m-1"},
    s.ReleaseClaimBody: {"migration_id": "m-1", "reason": "migration failed"},
}
RESULTS: dict[type, dict[str, Any]] = {
    s.DescribeHostResult: {**CAPABILITIES, "host_state": {"cells": []}},
    s.DescribeInstanceResult: {
        "uuid": UUID,
        "name": "instance-0001",
        "state": "running",
        "vcpus": 2,
        "memory_mb": 2048,
        "extra_specs": {"hw:cpu_policy": "dedicated"},
        "image_properties": {},
        "placement": PLACEMENT,
        "policy": POLICY,
    },
    s.LiveMigrateResult: {"migration_id": "m-1", "accepted": True},
    s.MigrationStateResult: {
        "migration_id": "m-1",
        "instance": UUID,
        "status": "running",
        "phase": "precopy",
        "percent": 42.5,
        "reason": None,
    },
    s.ListMigrationsResult: {
        "migrations": [
            {
                "migration_id": "m-1",
                "instance": UUID,
                "status": "completed",
                "phase": "done",
                "percent": 100.0,
                "reason": None,
                "source": "hv-01",
                "destination": "hv-02",
                "move": "numa-aware",
                "created_at": 1796131200.0,
                "updated_at": 1796131260.5,
                "ended_at": 1796131260.5,
                "downtime_ms": 42,
                "total_s": 60.5,
                "host_now": "hv-02",
            }
        ]
    },
    s.PlacementDoc: PLACEMENT,
    s.ClaimResult: {"placement": PLACEMENT, "expires_at": 1796131560.0},
    s.ClaimView: CLAIM_VIEW,
}
EVENTS: dict[type, dict[str, Any]] = {
    s.Capabilities: CAPABILITIES,
    s.MigrationProgressEvent: {
        "migration_id": "m-1",
        "instance": UUID,
        "source": "hv-01",
        "destination": "hv-02",
        "phase": "precopy",
        "percent": 42.5,
        "eta_s": 12.0,
        "memory_total": 2147483648,
        "memory_remaining": 1073741824,
        "dirty_rate_bps": 10485760,
        "bandwidth_bps": 104857600,
        "iteration": 2,
        "throttle_pct": 0,
        "max_downtime_ms": 50,
        "ts": 1796131260.5,
    },
    s.MigrationDoneEvent: {
        "migration_id": "m-1",
        "status": "completed",
        "reason": None,
        "downtime_ms": 12,
        "total_s": 30.5,
        "policy": POLICY,
        "host_now": "hv-02",
    },
    s.ClaimEvent: {
        "host": "hv-02",
        "migration_id": "m-1",
        "instance_uuid": UUID,
        "state": "confirmed",
        "reason": None,
        "ts": 1796131260.5,
    },
}


def test_every_method_has_an_example():
    assert {m.body for m in s.METHODS} <= set(BODIES)
    assert {m.result for m in s.METHODS} <= set(RESULTS)
    assert [m.name for m in s.METHODS if m.since == "1.0"] == [
        "describe_host",
        "describe_instance",
        "live_migrate",
        "abort_migration",
        "force_complete",
        "migration_status",
        "list_migrations",
    ]
    assert {m.name for m in s.METHODS if m.since == "1.1"} == {
        "fit",
        "claim",
        "extend_claim",
        "confirm_claim",
        "release_claim",
        "live_migrate",
    }


@pytest.mark.parametrize("kind", [*BODIES, *RESULTS, *EVENTS], ids=lambda k: k.__name__)
def test_examples_round_trip(kind):
    doc = {**BODIES, **RESULTS, **EVENTS}[kind]
    value = s.decode_body(doc, kind)
    again = msgspec.to_builtins(value)
    assert s.decode_body(again, kind) == value
    assert s.decode_body({**doc, "future_field": [1]}, kind) == value  # readers ignore unknown keys


@pytest.mark.parametrize(
    ("kind", "doc", "field"),
    [
        (s.ClaimBody, {"instance": INSTANCE, "source_host": "hv-01"}, "body.migration_id"),
        (s.ClaimBody, {"migration_id": "m 1", "instance": INSTANCE, "source_host": "h"}, "body.migration_id"),
        (s.ClaimBody, {"migration_id": "m", "instance": INSTANCE, "source_host": "h", "ttl_s": 0}, "body.ttl_s"),
        (s.ClaimBody, {"migration_id": "m", "instance": "x", "source_host": "h"}, "body.instance"),
        (s.ClaimBody, {"migration_id": "m", "instance": INSTANCE, "source_host": ""}, "body.source_host"),
        (
            s.LiveMigrateBody,
            {**BODIES[s.LiveMigrateBodyV10], "destination": {"host": "h"}},
            "body.destination.libvirt_uri",
        ),
        (
            s.LiveMigrateBody,
            {**BODIES[s.LiveMigrateBody], "placement": {**PLACEMENT, "cells": [{"guest_cell": "0"}]}},
            "body.placement.cells[0].guest_cell",
        ),
        (s.DescribeInstanceBody, {"instance": "x" * 256}, "body.instance"),
        (s.ReleaseClaimBody, {"migration_id": "m", "reason": ""}, "body.reason"),
        (s.Capabilities, {**CAPABILITIES, "traits": ["T"] * 257}, "body.traits"),
        (s.Capabilities, {**CAPABILITIES, "cells": [{**CELL_FREE, "free_pcpus": -1}]}, "body.cells[0].free_pcpus"),
        (s.MigrationProgressEvent, {**EVENTS[s.MigrationProgressEvent], "percent": 101}, "body.percent"),
        (s.MigrationDoneEvent, {**EVENTS[s.MigrationDoneEvent], "status": "exploded"}, "body.status"),
    ],
)
def test_bad_fields_are_named(kind, doc, field):
    with pytest.raises(RemoteInvalidRequest) as exc:
        s.decode_body(doc, kind)
    assert exc.value.details == {"field": field}
    assert exc.value.message.startswith(f"{field}: ")
    assert exc.value.type == "InvalidRequest"


def test_instance_requests_use_the_one_parser():
    body = s.decode_body(BODIES[s.ClaimBody], s.ClaimBody)
    req = body.request()
    assert (req.uuid, req.vcpus, req.memory_mb) == (UUID, 2, 2048)
    bad = s.decode_body({"instance": {**INSTANCE, "vcpus": 0}}, s.FitBody)
    with pytest.raises(InvalidRequest, match="vcpus"):
        bad.request()
    with pytest.raises(RemoteInvalidRequest, match="body.instance"):
        s.decode_body({"instance": {str(i): i for i in range(65)}}, s.FitBody)


def test_placements_use_the_one_reader():
    body = s.decode_body(BODIES[s.LiveMigrateBody], s.LiveMigrateBody)
    placement = body.placement_value()
    assert isinstance(placement, Placement)
    assert placement == Placement.from_json(PLACEMENT)
    assert s.decode_body(BODIES[s.LiveMigrateBodyV10], s.LiveMigrateBody).placement_value() is None


def test_no_fit_becomes_a_wire_error_with_per_cell_reasons():
    err = s.no_fit_error(NoFit("no host cell has 2 free pCPUs", {1: "1 free pCPU", 0: "no 2048 KiB pages"}))
    assert isinstance(err, RemoteNoFit) and err.type == "NoFit"
    assert err.details == {
        "reason": "no host cell has 2 free pCPUs",
        "cells": {"0": "no 2048 KiB pages", "1": "1 free pCPU"},
    }


def test_versions():
    assert s.parse_version("1.1") == (1, 1)
    assert s.parse_version("10.20") == (10, 20)
    for bad in ("1", "1.x", "a.1", "1.1.1", "", "1234.1", "-1.0", "1. 1"):
        with pytest.raises(ValueError):
            s.parse_version(bad)
    assert s.method_since("live_migrate") == "1.0"
    assert s.method_since("claim") == "1.1"
    assert s.method_since("nope") is None


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["migration_id", "instance", "source_host", "ttl_s", "x"]),
        st.none() | st.integers() | st.floats() | st.text(max_size=300) | st.lists(st.integers(), max_size=3),
    )
)
def test_any_body_decodes_or_names_a_field(doc):
    try:
        s.decode_body(doc, s.ClaimBody)
    except RemoteInvalidRequest as exc:
        assert exc.details["field"].startswith("body")


def test_the_default_version_is_the_newest_within_the_cap():
    from agent.bus.schemas import best_version, fields_needing_newer

    assert best_version("live_migrate", (1, 1)) == "1.1"
    assert best_version("live_migrate", (1, 0)) == "1.0"
    assert best_version("live_migrate", (1, 9)) == "1.1"
    assert best_version("claim", (1, 0)) is None
    assert fields_needing_newer("live_migrate", "1.0", {"placement": {"cells": []}, "claim_host": "hv-2"}) == {
        "placement": "1.1",
        "claim_host": "1.1",
    }
    assert fields_needing_newer("live_migrate", "1.0", {"placement": None, "migration_id": "m"}) == {}
    assert fields_needing_newer("live_migrate", "1.1", {"placement": {"cells": []}}) == {}
    assert fields_needing_newer("echo", "1.0", {"anything": 1}) == {}
