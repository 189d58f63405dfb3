"""Suite-wide settings.

COMPUTE_AGENT_REQUIRE_TESTBED=1 (set by .ci/run) makes an unavailable testbed an error instead of
a quiet skip, so CI can never go green without the real-libvirt tests having run.
"""

import os

import pytest

from tests.testbed import testbed_available


def pytest_collection_modifyitems(config, items):
    if os.environ.get("COMPUTE_AGENT_REQUIRE_TESTBED") != "1":
        return
    if not any(item.get_closest_marker("testbed") for item in items):
        return
    ok, reason = testbed_available()
    if not ok:
        raise pytest.UsageError(f"COMPUTE_AGENT_REQUIRE_TESTBED=1 but the testbed is unavailable: {reason}")
