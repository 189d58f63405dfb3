"""Test support for compute-agent: one home for the fakes, the builders and the testbed driver.

Used by the tests (tests/), the benchmarks (bench/) and the demos (scripts/demo.py,
scripts/testbed.d/migration_demo.py) alike; none of them imports `tests` or edits `sys.path`
(the venv has the package installed in editable mode, scripts/setup). Nothing in the agent itself
imports this package.

- `agent.testing.fake_libvirt`: one fake libvirt: `FakeError` (a libvirtError with a code),
  `FakeDomain` (a domain whose migration job follows a script of `job_stats`), `FakeConn`,
  and the destination's `DestConn` / `DestDomain`.
- `agent.testing.clock`: one `FakeClock`, a callable clock with `advance` and `sleep`, for every
  `clock=` / `sleep=` the agent takes.
- `agent.testing.builders`: host topologies (`topology`), host states (`state_cell`,
  `host_state`, `state_fn`), instance requests (`request`, `cells_request`) and the shared fit
  scenarios (`fit_scenarios`).
- `agent.testing.daemons`: real `compute-agent daemon` processes on the testbed hosts (one per
  host, own config and state, one bus prefix and key file), for the orchestrator's testbed tests
  and scripts/demo.
- `agent.testing.fleet`: a simulated fleet for the orchestrator's tests and bench/fleet_bench.py:
  real bus servers and claim ledgers per simulated host, the libvirt side modelled.
- `agent.testing.ledger`: `fill_ledger`, a claim ledger with tens of thousands of claims in about
  a second, for scale tests and the claims benchmark.
- `agent.testing.testbed`: the driver of the real-libvirt testbed (scripts/testbed): hosts,
  guest XML, define/start/destroy, console waits, the calibrated non-converging guest.

Import the module you need (`from agent.testing.fake_libvirt import FakeConn`); this package
imports none of them, so using the builders never loads libvirt.
"""

MODULES = ("builders", "clock", "daemons", "fake_libvirt", "fleet", "ledger", "testbed")
