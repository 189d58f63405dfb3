"""The daemon's edges (systemd notify, metrics, hotplug, host load); the wiring composes them."""
