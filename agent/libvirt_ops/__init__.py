"""libvirt edge: connections, domain XML read/rewrite, migration policy, migration runner."""
