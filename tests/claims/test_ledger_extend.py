"""Ledger.extend: the source keeps a claim for ttl_s (bounded by the ledger's longest TTL)."""

from __future__ import annotations

import pytest

from agent.claims.errors import ClaimEnded, UnknownClaim
from agent.claims.ledger import ClaimState, Ledger
from agent.errors import InvalidInput
from tests.claims.helpers import FakeClock, request, state_fn, topology

FN = state_fn(topology(cells=2, cores_per_cell=4, threads=2, huge_2m=1024))


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def ledger(tmp_path, clock):
    with Ledger.open(tmp_path, clock=clock, migrating_timeout_s=600, max_ttl_s=3600) as led:
        yield led


def test_extend_starts_a_held_claim_and_keeps_it_ttl_s(ledger, clock):
    ledger.claim("m", request(), "src", 60, FN)
    claim = ledger.extend("m", 1800)
    assert claim.state is ClaimState.MIGRATING and claim.expires_at == clock() + 1800
    assert [t.to_state.value for t in ledger.transitions("m")] == ["held", "migrating"]
    clock.advance(100)
    again = ledger.extend("m", 1800)  # a progress report: no new transition
    assert again.expires_at == clock() + 1800 and ledger.get("m").expires_at == again.expires_at
    assert len(ledger.transitions("m")) == 2


def test_extend_never_gives_less_than_progress_would(ledger, clock):
    ledger.claim("m", request(), "src", 60, FN)
    assert ledger.extend("m", 10).expires_at == clock() + 600  # migrating_timeout_s
    assert ledger.extend("m", 3000).expires_at == clock() + 3000
    clock.advance(5)
    assert ledger.extend("m", 10).expires_at == clock() + 600  # from now, as the source asks


def test_extend_is_bounded_by_the_longest_ttl(ledger):
    ledger.claim("m", request(), "src", 60, FN)
    with pytest.raises(InvalidInput, match="longest TTL"):
        ledger.extend("m", 3601)
    for bad in (0, -1, float("nan"), "60", True):
        with pytest.raises(InvalidInput):
            ledger.extend("m", bad)
    assert ledger.get("m").state is ClaimState.HELD  # nothing moved


def test_extend_of_an_ended_or_unknown_claim(ledger, clock):
    ledger.claim("m", request(), "src", 60, FN)
    clock.advance(61)
    with pytest.raises(ClaimEnded):
        ledger.extend("m", 600)  # past its TTL: expired, not revived
    assert ledger.get("m").state is ClaimState.EXPIRED
    with pytest.raises(UnknownClaim):
        ledger.extend("nope", 600)
