import pytest

from tests.daemon.logging_support import compute_agent_logger_restored

compute_agent_logger = pytest.fixture(autouse=True)(compute_agent_logger_restored)
