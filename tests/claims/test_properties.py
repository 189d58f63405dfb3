"""Property-based: random claim / start / confirm / release / expire / restart sequences over random
small hosts never promise a pCPU or a page twice, and free counts never go negative.

The model of the outside world: a confirmed claim becomes a running domain (carrying the agent's
placement metadata), whose pages the "kernel" then reports as used (free = total - domain pages);
domains may also go away (VM deleted). The host state is recomputed from the ledger at every claim,
as in the agent.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.claims.errors import IllegalTransition, NoFitError
from agent.claims.hoststate import compute_host_state, placement_usage
from agent.claims.ledger import LIVE_STATES, ClaimState, Ledger
from agent.libvirt_ops.domain_xml import DomainPlacement
from agent.numa.placement import Placement
from agent.numa.topology import HostTopology

from tests.claims.helpers import NO_RESERVE, FakeClock, check_invariant, request, topology

TTL = 30
MIGRATING_TIMEOUT = 60


class LedgerMachine(RuleBasedStateMachine):
    @initialize(
        cells=st.integers(1, 3),
        cores=st.integers(1, 4),
        threads=st.integers(1, 2),
        pages=st.sampled_from([0, 8, 64, 512]),
    )
    def setup(self, cells, cores, threads, pages):
        self.base = topology(cells=cells, cores_per_cell=cores, threads=threads, huge_2m=pages,
                             memory_mb_per_cell=4096)
        # tmpfs when there is one: this test is about logic; durability is test_crash's job
        shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
        self.dir = Path(tempfile.mkdtemp(prefix="claims-prop-", dir=shm))
        self.clock = FakeClock()
        self.ledger = self._open()
        self.domains: dict[str, DomainPlacement] = {}  # uuid -> running domain
        self.expected: dict[str, ClaimState] = {}  # migration id -> state the model expects
        self.n = 0

    def _open(self) -> Ledger:
        return Ledger.open(self.dir, clock=self.clock, migrating_timeout_s=MIGRATING_TIMEOUT, retention_s=10 ** 6)

    def kernel_topology(self) -> HostTopology:
        """The base host with page free counts lowered by what running domains use."""
        doc = self.base.to_json()
        for d in self.domains.values():
            u = placement_usage(Placement.from_json(dict(d.agent_placement)), self.base)
            for cid, cu in u.cells.items():
                cell_doc = next(c for c in doc["cells"] if c["id"] == cid)
                for pool in cell_doc["pages"]:
                    pool["free"] -= cu.used_pages.get(pool["size_kb"], 0)
        return HostTopology.from_json(doc)

    def host_state(self, claims):
        return compute_host_state(self.kernel_topology(), self.domains.values(), claims, NO_RESERVE).state

    def teardown(self):
        self.ledger.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _sync_expiry(self) -> None:
        for c in self.ledger.list():
            if self.expected[c.migration_id] in LIVE_STATES and c.state is ClaimState.EXPIRED:
                self.expected[c.migration_id] = ClaimState.EXPIRED

    # ---- rules ---------------------------------------------------------------------------------

    @rule(vcpus=st.integers(1, 4), mem=st.sampled_from([2, 64, 512, 1024]), dedicated=st.booleans(),
          page=st.sampled_from([None, 4, 2048]), iso=st.booleans())
    def claim(self, vcpus, mem, dedicated, page, iso):
        self.n += 1
        mid = f"m{self.n}"
        req = request(vcpus, mem, dedicated=dedicated, page_kb=page, emulator_isolate=iso and dedicated)
        try:
            c = self.ledger.claim(mid, req, "src", TTL, self.host_state)
        except NoFitError:
            self._sync_expiry()
            return
        assert c.state is ClaimState.HELD
        self.expected[mid] = ClaimState.HELD
        self._sync_expiry()
        # idempotent
        assert self.ledger.claim(mid, req, "src", TTL, self.host_state) == c

    def _pick(self, data, states=None):
        ids = sorted(m for m, s in self.expected.items() if states is None or s in states)
        if not ids:
            return None
        return data.draw(st.sampled_from(ids))

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def start(self, data):
        mid = self._pick(data)
        before = self.expected[mid]
        try:
            c = self.ledger.start(mid)
        except IllegalTransition:
            assert before not in LIVE_STATES
            return
        assert before in LIVE_STATES and c.state is ClaimState.MIGRATING
        self.expected[mid] = ClaimState.MIGRATING

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def confirm(self, data):
        mid = self._pick(data)
        before = self.expected[mid]
        try:
            c = self.ledger.confirm(mid)
        except IllegalTransition:
            assert before in (ClaimState.RELEASED, ClaimState.EXPIRED)
            return
        assert c.state is ClaimState.CONFIRMED
        if before is not ClaimState.CONFIRMED:
            self.expected[mid] = ClaimState.CONFIRMED
            # the domain now runs here, with the agent's placement metadata
            self.domains[c.instance_uuid] = DomainPlacement(
                name=mid, uuid=c.instance_uuid, vcpus=1, memory_kib=1024,
                agent_placement=c.placement.to_json())

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def release(self, data):
        mid = self._pick(data)
        before = self.expected[mid]
        try:
            c = self.ledger.release(mid, "random failure")
        except IllegalTransition:
            assert before is ClaimState.CONFIRMED
            return
        assert c.state is (ClaimState.EXPIRED if before is ClaimState.EXPIRED else ClaimState.RELEASED)
        if before in LIVE_STATES:
            self.expected[mid] = ClaimState.RELEASED

    @precondition(lambda self: self.domains)
    @rule(data=st.data())
    def delete_domain(self, data):
        uuid = data.draw(st.sampled_from(sorted(self.domains)))
        del self.domains[uuid]

    @rule(seconds=st.sampled_from([1, 10, 31, 61]))
    def time_passes(self, seconds):
        self.clock.advance(seconds)

    @rule()
    def expire(self):
        for c in self.ledger.expire_due():
            assert self.expected[c.migration_id] in LIVE_STATES
            self.expected[c.migration_id] = ClaimState.EXPIRED

    @rule()
    def reconcile(self):
        for d in self.ledger.reconcile([], prune=False):
            assert d.to_state is ClaimState.EXPIRED  # no domain of a live claim ever runs here
            self.expected[d.migration_id] = d.to_state

    @rule()
    def restart(self):
        self.ledger.close()
        self.ledger = self._open()

    # ---- invariants ----------------------------------------------------------------------------

    @invariant()
    def no_double_booking(self):
        if not hasattr(self, "ledger"):
            return
        claims = self.ledger.list()
        assert {c.migration_id: c.state for c in claims} == self.expected
        # confirmed claims became domain usage: they hold nothing once their domain is gone
        live = [c for c in claims if c.state in LIVE_STATES]
        check_invariant(self.kernel_topology(), live, self.domains.values())


LedgerMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLedgerMachine = LedgerMachine.TestCase
