"""Every refusal of the orchestrator, drawn once (exit codes of `compute-agent migrate` in brackets):

    AgentError (agent.errors)
    ├── InvalidInput
    │   └── BadMigrationRequest        [2] the operator's input: unknown host, instance, option
    └── OrchestratorError
        ├── NumaMigrationRefused       [3] a NUMA instance below RPC 1.1 without the workaround
        ├── NoDestination              [3] every candidate refused (each host's reason kept)
        └── MigrationFailed            [4] the migration failed or was aborted; the VM is on the source

A flavor/image conflict is agent.errors.InvalidRequest from the one parser of instance metadata
(agent.numa.request), raised before anything is claimed.
"""

from __future__ import annotations

from agent.errors import AgentError, InvalidInput
from agent.orchestrator.model import Rejection


class BadMigrationRequest(InvalidInput):
    code = "bad_migration_request"


class OrchestratorError(AgentError):
    code = "orchestrator_error"


class NumaMigrationRefused(OrchestratorError):
    code = "numa_migration_refused"


class NoDestination(OrchestratorError):
    """No candidate took the instance; `rejections` says why, host by host, in the order tried."""

    code = "no_destination"

    def __init__(self, message: str, rejections: tuple[Rejection, ...] = ()) -> None:
        super().__init__(message)
        self.rejections = rejections


class MigrationFailed(OrchestratorError):
    code = "migration_failed"
