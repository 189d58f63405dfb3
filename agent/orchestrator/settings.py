"""The options the orchestrator reads, gathered from the config sections that hold them."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config import AgentConfig
from agent.orchestrator.candidates import Preference


@dataclass(frozen=True, slots=True)
class Settings:
    version_cap: str = "auto"  # [upgrade_levels] agent
    numa_workaround: bool = False  # [workarounds] enable_numa_live_migration
    max_retries: int = -1  # [orchestrator] migrate_max_retries
    preference: Preference = "spread"  # [compute] placement_preference
    claim_ttl_s: float = 300.0  # [orchestrator] claim_ttl_s
    host_max_age_s: float = 180.0  # [orchestrator] host_max_age_s
    discovery_timeout_s: float = 2.0  # [orchestrator] discovery_timeout_s

    @classmethod
    def from_config(cls, cfg: AgentConfig) -> Settings:
        o = cfg.orchestrator
        return cls(
            version_cap=cfg.upgrade_levels.agent,
            numa_workaround=cfg.workarounds.enable_numa_live_migration,
            max_retries=o.migrate_max_retries,
            preference=cfg.compute.placement_preference,
            claim_ttl_s=float(o.claim_ttl_s),
            host_max_age_s=o.host_max_age_s,
            discovery_timeout_s=o.discovery_timeout_s,
        )
