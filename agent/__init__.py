"""compute-agent: per-host agent for safe, NUMA-aware live migration of pinned VMs."""

__version__ = "0.1.0"
