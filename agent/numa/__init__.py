"""NUMA model: host topology, host state, instance requests, placements and the fitter.

Pure logic only: nothing here talks to libvirt or the bus. Discovery reads files at the edge
(`discovery.py`) and hands back immutable objects.
"""
