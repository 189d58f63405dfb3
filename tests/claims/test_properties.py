"""Property-based: random claim / start / confirm / release / expire / restart sequences over random
small hosts never promise a pCPU, a page or small-page memory twice, and free counts never go
negative.

The model of the outside world: the host may start with a few domains the agent did not place
(no agent metadata, no numatune: floating vCPUs or a pinned one, memory bound to no cell); a
claim for an instance that runs here is refused. A migrating claim's domain may arrive (active,
carrying the claim's placement as agent metadata) before the claim is confirmed, and reconcile
then sees it running. A confirmed claim becomes a running domain, whose pages the "kernel" then
reports as used (free = total - domain pages); domains may also go away (VM deleted). The host
state is recomputed from the ledger at every claim, as in the agent (a HostStateReport, so the
ledger knows which domains are active).
"""

from __future__ import annotations

import shutil
import tempfile
import uuid as uuidlib
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent.claims.errors import ClaimConflict, ClaimEnded, IllegalTransition, NoFitError
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
        pages=st.sampled_from([0, 8, 64, 256]),
        small_pool=st.booleans(),
        plain=st.lists(st.tuples(st.integers(1, 2), st.sampled_from([64, 256, 512]), st.booleans()), max_size=2),
    )
    def setup(self, cells, cores, threads, pages, small_pool, plain):
        self.base = topology(
            cells=cells,
            cores_per_cell=cores,
            threads=threads,
            huge_2m=pages,
            memory_mb_per_cell=2048,
            small_pool=small_pool,
        )
        # tmpfs when there is one: this test is about logic; durability is test_crash's job
        shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
        self.dir = Path(tempfile.mkdtemp(prefix="claims-prop-", dir=shm))
        self.clock = FakeClock()
        self.ledger = self._open()
        self.domains: dict[str, DomainPlacement] = {}  # uuid -> running domain
        self.expected: dict[str, ClaimState] = {}  # migration id -> state the model expects
        self.n = 0
        # domains the agent did not place: no metadata, no numatune (memory bound to no cell),
        # floating vCPUs or one vCPU pinned to the host's last CPU (the first such domain only)
        last = max(self.base.online_cpus)
        # pin only where the cell keeps a shared CPU for the floating vCPUs (a consistent world)
        pinned_one = len(self.base.cell_of_cpu(last).cpus) < 2
        for vcpus, mem, pin in plain:
            uuid = str(uuidlib.UUID(int=len(self.domains) + 1, version=4))
            pins = {}
            if pin and not pinned_one:
                pins, pinned_one = {0: frozenset({last})}, True
            self.domains[uuid] = DomainPlacement(
                name=f"plain-{uuid[:8]}", uuid=uuid, vcpus=vcpus, memory_kib=mem * 1024, vcpu_pins=pins
            )

    def _open(self) -> Ledger:
        return Ledger.open(self.dir, clock=self.clock, migrating_timeout_s=MIGRATING_TIMEOUT, retention_s=10**6)

    def kernel_topology(self) -> HostTopology:
        """The base host with page free counts lowered by what running placed domains use."""
        doc = self.base.to_json()
        for d in self.domains.values():
            if d.agent_placement is None:
                continue  # guest memory not touched yet: the kernel does not see it
            u = placement_usage(Placement.from_json(dict(d.agent_placement)), self.base)
            for cid, cu in u.cells.items():
                cell_doc = next(c for c in doc["cells"] if c["id"] == cid)
                for pool in cell_doc["pages"]:
                    pool["free"] -= cu.used_pages.get(pool["size_kb"], 0)
        return HostTopology.from_json(doc)

    def host_state(self, claims):
        # a HostStateReport: every domain in the model is active
        return compute_host_state(self.kernel_topology(), self.domains.values(), claims, NO_RESERVE)

    def teardown(self):
        self.ledger.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _sync_expiry(self) -> None:
        for c in self.ledger.list_claims():
            if self.expected[c.migration_id] in LIVE_STATES and c.state is ClaimState.EXPIRED:
                self.expected[c.migration_id] = ClaimState.EXPIRED

    # ---- rules ---------------------------------------------------------------------------------

    @rule(
        vcpus=st.integers(1, 4),
        mem=st.sampled_from([2, 64, 512, 1024]),
        dedicated=st.booleans(),
        page=st.sampled_from([None, 4, 2048]),
        iso=st.booleans(),
    )
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

    @precondition(lambda self: self.domains)
    @rule(data=st.data())
    def claim_running_instance(self, data):
        """A claim for an instance that runs here is refused (whatever fits)."""
        uuid = data.draw(st.sampled_from(sorted(self.domains)))
        self.n += 1
        try:
            self.ledger.claim(f"m{self.n}", request(1, 2, uuid=uuid), "src", TTL, self.host_state)
        except ClaimConflict:
            pass
        else:
            raise AssertionError(f"claim for {uuid}, which runs here, was accepted")
        finally:
            self._sync_expiry()

    def _ended_past_expiry(self, mid, before, exc) -> None:
        """start/confirm on a live claim past its expiry: the claim is expired and ClaimEnded raised."""
        assert isinstance(exc, ClaimEnded) and before in LIVE_STATES, (before, exc)
        assert self.ledger.get(mid).state is ClaimState.EXPIRED
        self.expected[mid] = ClaimState.EXPIRED

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def start(self, data):
        mid = self._pick(data)
        before = self.expected[mid]
        try:
            c = self.ledger.start(mid)
        except IllegalTransition as exc:
            if before in LIVE_STATES:
                self._ended_past_expiry(mid, before, exc)
            return
        assert before in LIVE_STATES and c.state is ClaimState.MIGRATING
        self.expected[mid] = ClaimState.MIGRATING

    @precondition(lambda self: any(s is ClaimState.MIGRATING for s in self.expected.values()))
    @rule(data=st.data())
    def domain_arrives(self, data):
        """The migration completed: the domain runs here with the claim's placement, not yet confirmed."""
        mid = self._pick(data, {ClaimState.MIGRATING})
        c = self.ledger.get(mid)
        if c.state is ClaimState.MIGRATING:
            self.domains[c.instance_uuid] = DomainPlacement(
                name=mid, uuid=c.instance_uuid, vcpus=1, memory_kib=1024, agent_placement=c.placement.to_json()
            )

    @precondition(lambda self: self.expected)
    @rule(data=st.data())
    def confirm(self, data):
        mid = self._pick(data)
        before = self.expected[mid]
        try:
            c = self.ledger.confirm(mid)
        except IllegalTransition as exc:
            if before in LIVE_STATES:
                self._ended_past_expiry(mid, before, exc)
            else:
                assert before in (ClaimState.RELEASED, ClaimState.EXPIRED)
            return
        assert c.state is ClaimState.CONFIRMED
        if before is not ClaimState.CONFIRMED:
            self.expected[mid] = ClaimState.CONFIRMED
            # the domain now runs here, with the agent's placement metadata
            self.domains[c.instance_uuid] = DomainPlacement(
                name=mid, uuid=c.instance_uuid, vcpus=1, memory_kib=1024, agent_placement=c.placement.to_json()
            )

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

    @rule(tell_running=st.booleans())
    def reconcile(self, tell_running):
        running = sorted(self.domains) if tell_running else []
        for d in self.ledger.reconcile(running, prune=False):
            if d.instance_uuid in running:
                assert d.to_state is ClaimState.CONFIRMED
            else:
                assert d.to_state is ClaimState.EXPIRED
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
        claims = self.ledger.list_claims()
        assert {c.migration_id: c.state for c in claims} == self.expected
        # confirmed claims became domain usage: they hold nothing once their domain is gone
        live = [c for c in claims if c.state in LIVE_STATES]
        check_invariant(self.kernel_topology(), live, self.domains.values())


LedgerMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLedgerMachine = LedgerMachine.TestCase
