"""Typed errors shared by every package.

Each error carries a short machine-readable ``code`` so the CLI, the bus and the logs can report it
without parsing messages. Bad input never escapes as a bare ValueError/KeyError/traceback.

    AgentError
    ├── InvalidInput                 input from outside is malformed or contradictory
    │   ├── InvalidRequest           flavor extra specs / image properties (names the keys)
    │   ├── InvalidHostState         host topology / host state documents
    │   ├── ConfigError              the agent's configuration file
    │   └── DomainXMLError           libvirt domain / capabilities XML
    └── DiscoveryError               sysfs or libvirt could not be read (names the file)

The libvirt edge adds its own subtree under AgentError (agent.libvirt_ops.errors).
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""

    code = "agent_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(AgentError):
    """Input from outside (a file, a message, an operator) is malformed or contradictory."""

    code = "invalid_input"


class InvalidRequest(InvalidInput):
    """An instance request (extra specs / image properties) contradicts itself or the rules.

    ``keys`` names the offending metadata keys so an operator can fix the flavor or image.
    """

    code = "invalid_request"

    def __init__(self, message: str, keys: tuple[str, ...] | list[str] = ()) -> None:
        self.keys = tuple(keys)
        super().__init__(f"{message} [keys: {', '.join(self.keys)}]" if self.keys else message)


class InvalidHostState(InvalidInput):
    """A host topology or host state document is malformed or inconsistent."""

    code = "invalid_host_state"


class DiscoveryError(AgentError):
    """Host discovery could not read or understand a source (names the file)."""

    code = "discovery_error"

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(message if path is None or path in message else f"{path}: {message}")


class ConfigError(InvalidInput):
    """The agent configuration is invalid (names the section and option)."""

    code = "config_error"


class DomainXMLError(InvalidInput):
    """A libvirt domain/capabilities XML document is malformed, unsafe or too large."""

    code = "domain_xml_error"
