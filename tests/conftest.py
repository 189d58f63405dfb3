"""Suite-wide settings.

COMPUTE_AGENT_REQUIRE_TESTBED=1 (set by .ci/run) makes an unavailable testbed an error instead of
a quiet skip, so CI can never go green without the real-libvirt tests having run: the session
refuses to start without the testbed, and any `testbed` test that skips anyway is reported failed.
"""

import os

import pytest

from agent.testing.testbed import testbed_available

REQUIRE_TESTBED = os.environ.get("COMPUTE_AGENT_REQUIRE_TESTBED") == "1"


def pytest_collection_modifyitems(config, items):
    if not REQUIRE_TESTBED or not any(item.get_closest_marker("testbed") for item in items):
        return
    ok, reason = testbed_available()
    if not ok:
        raise pytest.UsageError(f"COMPUTE_AGENT_REQUIRE_TESTBED=1 but the testbed is unavailable: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_TESTBED and report.skipped and item.get_closest_marker("testbed"):
        report.outcome = "failed"
        report.longrepr = f"testbed test skipped although COMPUTE_AGENT_REQUIRE_TESTBED=1: {report.longrepr}"
