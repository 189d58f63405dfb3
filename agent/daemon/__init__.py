"""`compute-agent daemon`: one per hypervisor, under systemd.

process        the process: start to READY=1, the asyncio control loop, signals, systemd
context        AgentContext (what every role gets) and the Role protocol
destination    the destination role: describe_host, fit, claims (destination_watch follows them)
source         the source role: describe_instance, live_migrate & co (migrations, source_* modules)
capabilities   the capabilities.<host> event and describe_host's first part
lifecycle      libvirt's domain lifecycle events, handed to the roles
reload         SIGHUP: which options change at run time
notify, metrics, hotplug, host_load: the edges (sd_notify, Prometheus, udev, psutil)
"""
