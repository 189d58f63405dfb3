"""Driver of the real-libvirt testbed (scripts/testbed, docs/testbed.md), shared by the
`testbed` tests, bench/migration_bench.py, scripts/demo.py and scripts/testbed.d/migration_demo.py.

Typical use::

    from agent.testing.testbed import ensure_testbed, guest_xml, define_and_start, wait_guest_ready

    h1, h2 = ensure_testbed(2)
    define_and_start(h1, guest_xml("g1", vcpu_pins={0: [1]}))
    wait_guest_ready(h1, "g1")

The `libvirt` Python binding (PyPI: libvirt-python) is imported lazily so
that importing this module never fails; helpers that talk to libvirt need it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple
from xml.sax.saxutils import escape, quoteattr

# agent/testing/testbed.py -> the checkout (the package is installed in editable mode: scripts/setup)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "testbed")
STATE = os.environ.get("COMPUTE_AGENT_TESTBED_DIR", "/var/tmp/compute-agent-testbed")
NET = os.environ.get("COMPUTE_AGENT_TESTBED_NET", "127.0.0")
IMAGE_DIR = os.path.join(STATE, "image")
KERNEL = os.path.join(IMAGE_DIR, "vmlinuz")
INITRD = os.path.join(IMAGE_DIR, "initrd.gz")
READY_LINE = "TESTBED-GUEST-READY"
TICK_LINE = "TESTBED-GUEST-TICK"
# path of the console log *inside* a host's namespace; {name} is the domain.
# /var/log/libvirt is per host, so after a migration the destination writes
# to its own copy (host.log_dir on the outside).
CONSOLE_LOG_IN_NS = "/var/log/libvirt/qemu/{name}.console.log"
MIGRATION_PORT_BASE = 49152  # host i: BASE + (i-1)*100 .. +99, as scripts/testbed


# A guest that does not converge without help on this testbed, and migration settings that
# separate the three policies on it (measured with correct dirty tracking, pti=on below; 2 cores,
# TCG): no policy never converges, post-copy completes in ~20 s, auto-converge in 30-60 s at 99 %
# throttle. An unpaced dirtier manages ~32 MB/s under TCG and QEMU's throttle cuts that only ~3x,
# hence the paced 20 MB/s over a 16 MiB/s link. Used by the migration tests, bench and demo.
HOT_GUEST: Dict[str, Any] = dict(memory_mib=256, dirty_mb=64, dirty_rate_mbps=20, tick_s=2)
HOT_MIGRATION: Dict[str, Any] = dict(  # LibvirtConfig keyword arguments
    live_migration_bandwidth_mib=16,
    live_migration_downtime_ms=1000,
    live_migration_downtime_steps=10,
    live_migration_downtime_delay_s=1,
    live_migration_completion_timeout_s=120,
    live_migration_timeout_action="abort",
    live_migration_auto_converge_initial=50,
    live_migration_auto_converge_increment=25,
    live_migration_poll_interval_s=0.5,
    live_migration_postcopy_switch="on_stall",  # post-copy (when armed) switches once pre-copy stalls
)


@dataclasses.dataclass(frozen=True)
class TestbedHost:
    __test__ = False  # not a pytest test class

    index: int
    name: str  # hostname inside the host's UTS namespace, e.g. "tb-host1"
    uri: str  # "qemu+tcp://127.0.0.2/system"
    address: str  # "127.0.0.2"
    migration_uri: str  # "tcp://127.0.0.2"
    log_dir: str  # outside view of the host's /var/log/libvirt
    state_dir: str  # STATE/hostN

    def console_log(self, domain: str) -> str:
        """Outside path of a domain's serial console log on this host
        (for domains whose XML uses the default console_log)."""
        return os.path.join(self.log_dir, "qemu", "%s.console.log" % domain)

    def connect(self):
        return _libvirt().open(self.uri)

    @property
    def migration_ports(self) -> Tuple[int, int]:
        """(first, last) of this host's QEMU migration port range (scripts/testbed: migration_ports)."""
        first = MIGRATION_PORT_BASE + (self.index - 1) * 100
        return first, first + 99


_QUIET = False


def _libvirt():
    """Import libvirt; silence its default print-every-error-to-stderr
    handler once (errors still raise libvirt.libvirtError)."""
    global _QUIET
    import libvirt  # noqa: PLC0415

    if not _QUIET:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _QUIET = True
    return libvirt


def host(i: int) -> TestbedHost:
    addr = "%s.%d" % (NET, i + 1)
    hd = os.path.join(STATE, "host%d" % i)
    return TestbedHost(
        index=i,
        name="tb-host%d" % i,
        uri="qemu+tcp://%s/system" % addr,
        address=addr,
        migration_uri="tcp://%s" % addr,
        log_dir=os.path.join(hd, "log"),
        state_dir=hd,
    )


def testbed_available() -> Tuple[bool, str]:
    """(True, "") when this machine can run the testbed, else (False, reason)."""
    if os.geteuid() != 0:
        return False, "testbed needs root (namespaces, bind mounts, libvirtd)"
    if not os.path.exists(SCRIPT):
        return False, "scripts/testbed not found"
    missing = [
        b
        for b in ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "unshare")
        if not shutil.which(b, path="/usr/sbin:/usr/bin:/sbin:/bin")
    ]
    if missing:
        return False, "missing binaries: %s (run scripts/testbed up 2 once to install)" % ", ".join(missing)
    try:
        import libvirt  # noqa: F401, PLC0415
    except ImportError:
        return False, "python module 'libvirt' missing (pip install libvirt-python)"
    return True, ""


testbed_available.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def ensure_testbed(n: int = 2) -> List[TestbedHost]:
    """Run `scripts/testbed up n` (idempotent) and return hosts 1..n."""
    r = subprocess.run([SCRIPT, "up", str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError("scripts/testbed up %d failed (rc=%d):\n%s%s" % (n, r.returncode, r.stdout, r.stderr))
    return [host(i) for i in range(1, n + 1)]


def _cpuset(cpus: Sequence[int] | str) -> str:
    if isinstance(cpus, str):
        return cpus
    return ",".join(str(c) for c in cpus)


def guest_xml(
    name: str,
    *,
    vcpus: int = 1,
    memory_mib: int = 256,
    vcpu_pins: Optional[Dict[int, Sequence[int]]] = None,
    emulator_pins: Optional[Sequence[int]] = None,
    numa_cells: Optional[Sequence[Tuple[Sequence[int] | str, int]]] = None,
    numatune_nodeset: Optional[str] = None,
    numatune_mode: str = "strict",
    memnodes: Optional[Dict[int, str]] = None,
    dirty_mb: int = 0,
    dirty_rate_mbps: int = 0,
    dirty_wpp: int = 512,
    tick_s: int = 5,
    console_log: Optional[str] = None,
    uuid: Optional[str] = None,
    extra_cmdline: str = "",
) -> str:
    """TCG (type='qemu') domain XML booting the testbed kernel + initramfs.

    vcpu_pins: {vcpu: [host cpus]} -> <vcpupin>; emulator_pins -> <emulatorpin>.
    numa_cells: [(guest cpus, memory MiB)] -> <cpu><numa><cell id=i .../>.
    numatune_nodeset -> <numatune><memory mode=numatune_mode nodeset=.../>;
    memnodes: {cellid: nodeset} -> <memnode cellid=.. mode=strict nodeset=../>.
    dirty_mb / dirty_rate_mbps / dirty_wpp go to the guest's dirtier (see
    scripts/testbed.d/dirtier.c; rate -1 = unthrottled, 0 = fill once then
    idle; dirty_wpp = 64-bit words rewritten per 4 KiB page, 512 = whole page).
    console_log: path *inside the host namespace* (default
    /var/log/libvirt/qemu/NAME.console.log, i.e. host.console_log(NAME) outside).
    """
    console_log = console_log or CONSOLE_LOG_IN_NS.format(name=name)
    cmdline = (
        "console=ttyS0 quiet loglevel=1 panic=-1 tsc=reliable no_timer_check "
        # pti=on: QEMU 7.2 (Debian 12) loses TCG guest writes during live migration (its dirty
        # bitmap sync fast path does not reset the TCG TLB; fixed upstream in QEMU 9.0, commit
        # 03bfc2188f). Page-table isolation flushes the TLB on every kernel entry and exit, which
        # keeps dirty tracking right: 0 stale pages in 17 measured migrations vs 44-57 without.
        # See docs/testbed.md. It must be explicit: qemu64 looks like AMD, where PTI is off.
        "mitigations=off pti=on nokaslr tb_name=%s dirty_mb=%d dirty_rate_mbps=%d dirty_wpp=%d tick_s=%d %s"
        % (name, dirty_mb, dirty_rate_mbps, dirty_wpp, tick_s, extra_cmdline)
    ).strip()
    parts = ["<domain type='qemu'>", "  <name>%s</name>" % escape(name)]
    if uuid:
        parts.append("  <uuid>%s</uuid>" % uuid)
    parts += [
        "  <memory unit='MiB'>%d</memory>" % memory_mib,
        "  <currentMemory unit='MiB'>%d</currentMemory>" % memory_mib,
        "  <vcpu placement='static'>%d</vcpu>" % vcpus,
    ]
    if vcpu_pins or emulator_pins:
        parts.append("  <cputune>")
        for v, cpus in sorted((vcpu_pins or {}).items()):
            parts.append("    <vcpupin vcpu='%d' cpuset='%s'/>" % (v, _cpuset(cpus)))
        if emulator_pins:
            parts.append("    <emulatorpin cpuset='%s'/>" % _cpuset(emulator_pins))
        parts.append("  </cputune>")
    if numatune_nodeset or memnodes:
        parts.append("  <numatune>")
        if numatune_nodeset:
            parts.append("    <memory mode=%s nodeset=%s/>" % (quoteattr(numatune_mode), quoteattr(numatune_nodeset)))
        for cell, nodeset in sorted((memnodes or {}).items()):
            parts.append("    <memnode cellid='%d' mode='strict' nodeset=%s/>" % (cell, quoteattr(nodeset)))
        parts.append("  </numatune>")
    parts += [
        "  <os>",
        "    <type arch='x86_64' machine='pc'>hvm</type>",
        "    <kernel>%s</kernel>" % escape(KERNEL),
        "    <initrd>%s</initrd>" % escape(INITRD),
        "    <cmdline>%s</cmdline>" % escape(cmdline),
        "  </os>",
        "  <features><acpi/></features>",
    ]
    if numa_cells:
        parts.append("  <cpu mode='custom' match='exact' check='none'>")
        parts.append("    <model fallback='allow'>qemu64</model>")
        parts.append("    <numa>")
        for idx, (cell_cpus, mem) in enumerate(numa_cells):
            parts.append("      <cell id='%d' cpus='%s' memory='%d' unit='MiB'/>" % (idx, _cpuset(cell_cpus), mem))
        parts.append("    </numa>")
        parts.append("  </cpu>")
    parts += [
        "  <clock offset='utc'/>",
        "  <on_poweroff>destroy</on_poweroff>",
        "  <on_reboot>restart</on_reboot>",
        "  <on_crash>destroy</on_crash>",
        "  <devices>",
        "    <emulator>/usr/bin/qemu-system-x86_64</emulator>",
        "    <serial type='file'>",
        "      <source path=%s append='on'/>" % quoteattr(console_log),
        "      <target port='0'/>",
        "    </serial>",
        "    <console type='file'>",
        "      <source path=%s append='on'/>" % quoteattr(console_log),
        "      <target type='serial' port='0'/>",
        "    </console>",
        "    <memballoon model='none'/>",
        "  </devices>",
        "</domain>",
    ]
    return "\n".join(parts) + "\n"


def define_and_start(host: TestbedHost, xml: str) -> str:
    """Define `xml` persistently on `host` and start it; returns the domain name."""
    conn = host.connect()
    try:
        dom = conn.defineXML(xml)
        name = dom.name()
        log = _console_log_outside(host, xml)
        if log and os.path.exists(log):
            os.unlink(log)  # so wait_guest_ready only sees this boot
        dom.create()
        return name
    finally:
        conn.close()


def _console_log_outside(host: TestbedHost, xml: str) -> Optional[str]:
    m = re.search(r"<serial type='file'>\s*<source path=(['\"])(.*?)\1", xml)
    if not m:
        return None
    path = m.group(2)
    if path.startswith("/var/log/libvirt/"):
        return os.path.join(host.log_dir, path[len("/var/log/libvirt/") :])
    return path


def wait_console_line(host: TestbedHost, name: str, pattern: str, timeout: float = 60, after: int = 0) -> str:
    """Wait until the console log of `name` on `host` has a line containing
    `pattern` (at byte offset >= after); returns that line."""
    path = host.console_log(name)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, "rb") as f:
                f.seek(after)
                for raw in f.read().decode("utf-8", "replace").splitlines():
                    if pattern in raw:
                        return raw.strip()
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("no %r in %s after %.0fs" % (pattern, path, timeout))
        time.sleep(0.2)


def wait_guest_ready(host: TestbedHost, name: str, timeout: float = 60) -> str:
    """Wait for the guest's readiness line on its serial console; returns it."""
    return wait_console_line(host, name, READY_LINE, timeout)


def live_xml(host: TestbedHost, name: str) -> str:
    return _xml_desc(host, name, 0)


def persistent_xml(host: TestbedHost, name: str) -> str:
    return _xml_desc(host, name, _libvirt().VIR_DOMAIN_XML_INACTIVE)


def _xml_desc(host: TestbedHost, name: str, flags: int) -> str:
    conn = host.connect()
    try:
        return conn.lookupByName(name).XMLDesc(flags)
    finally:
        conn.close()


def destroy_domain(host: TestbedHost, name: str) -> None:
    """Destroy (if running) and undefine domain `name` on `host`; no error if absent."""
    libvirt = _libvirt()
    conn = host.connect()
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            return
        _destroy_and_undefine(dom)
    finally:
        conn.close()


def destroy_all(host: TestbedHost, prefix: Optional[str] = None) -> None:
    """Destroy and undefine every domain on `host` (test cleanup); with
    `prefix`, only domains whose name starts with it.  Without a prefix this
    also kills the guests of any other test run sharing the testbed."""
    conn = host.connect()
    try:
        for dom in conn.listAllDomains(0):
            if prefix is None or dom.name().startswith(prefix):
                _destroy_and_undefine(dom)
    finally:
        conn.close()


def _destroy_and_undefine(dom: Any) -> None:
    """Each step on its own: a domain already stopped or already transient is fine."""
    libvirt = _libvirt()
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass
    try:
        if dom.isPersistent():
            dom.undefineFlags(0)
    except libvirt.libvirtError:
        pass


# --- breaking a migration stream for real ------------------------------------------------------------


def port_masks(lo: int, hi: int) -> List[Tuple[int, int]]:
    """(value, mask) pairs whose union is exactly the ports lo..hi (for tc u32 matches)."""
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while lo + size - 1 > hi:
            size >>= 1
        out.append((lo, 0xFFFF ^ (size - 1)))
        lo += size
    return out


class StreamBreaker:
    """Breaks the migration stream into `dest` for real and keeps the link down for `seconds`.

    1. Every packet to or from the destination's QEMU migration ports is dropped (a tc ``htb``
       root qdisc on ``lo`` whose class for those ports leads to a ``blackhole`` qdisc; other
       traffic goes through unshaped); this machine has no iptables/nft, and tc's drop action
       module is missing.
    2. The established stream is killed (``ss -K``, SOCK_DESTROY): both QEMUs see it fail at once
       (a dropped-only stream would go unnoticed for minutes of TCP retransmits).
    3. After `seconds` (or ``stop()``) the qdisc is removed: a reconnect (QEMU retries its SYN)
       gets through.

    Why not kill sockets again and again for the whole break: QEMU 7.2 segfaults in the
    destination's postcopy/listen thread when a *resumed* post-copy stream breaks again during the
    recovery (docs/testbed.md); a flapping link would test that QEMU bug, not the agent.

    The loopback root qdisc is machine-wide: the breaker refuses to start unless ``lo`` has its
    default (noqueue) root, and always removes its own. The libvirtd RPC (port 16509) is untouched.
    ``start()`` (a thread), ``stop()``, ``join()``; ``killed`` counts the sockets killed;
    ``started_at`` / ``ended_at`` are time.monotonic() values."""

    def __init__(self, dest: TestbedHost, seconds: float) -> None:
        import threading  # noqa: PLC0415

        self.dest, self.seconds = dest, seconds
        self.killed = 0
        self.started_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self.error: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-breaker", daemon=True)

    def _filter(self) -> List[str]:
        lo, hi = self.dest.migration_ports
        addr = self.dest.address
        return [
            "( dst %s and dport >= :%d and dport <= :%d ) or ( src %s and sport >= :%d and sport <= :%d )"
            % (addr, lo, hi, addr, lo, hi)
        ]

    def kill_once(self) -> int:
        out = subprocess.run(
            ["ss", "-K", "-t", "-n", "-H"] + self._filter(), capture_output=True, text=True, check=False
        ).stdout
        n = len([line for line in out.splitlines() if line.strip()])
        self.killed += n
        return n

    @staticmethod
    def _tc(*args: str) -> None:
        subprocess.run(["tc"] + list(args), check=True, capture_output=True, text=True)

    def _drop_on(self) -> None:
        root = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout
        if not root.startswith("qdisc noqueue"):
            raise RuntimeError("lo has a root qdisc already (%s): not touching it" % root.strip())
        self._tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "0")
        try:
            self._tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb", "rate", "8bit")
            self._tc("qdisc", "add", "dev", "lo", "parent", "1:1", "handle", "10:", "blackhole")
            lo, hi = self.dest.migration_ports
            for value, mask in port_masks(lo, hi):
                for way, port in (("dst", "dport"), ("src", "sport")):
                    self._tc(
                        "filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                        "match", "ip", way, "%s/32" % self.dest.address,
                        "match", "ip", port, str(value), hex(mask), "flowid", "1:1",
                    )  # fmt: skip
        except BaseException:
            self._drop_off()
            raise

    @staticmethod
    def _drop_off() -> None:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True, check=False)

    def _run(self) -> None:
        self.started_at = time.monotonic()
        try:
            self._drop_on()
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            self.error = str(exc)
            self.ended_at = time.monotonic()
            return
        try:
            self.kill_once()
            self._stop.wait(self.seconds)
        finally:
            self._drop_off()
            self.ended_at = time.monotonic()

    def start(self) -> "StreamBreaker":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: Optional[float] = None) -> None:
        self._thread.join(timeout)


def dirtier_verdict(host: TestbedHost, name: str) -> Tuple[int, int, List[str]]:
    """(verified_pages, bad_pages) of the last tick on `host`'s console of a guest started with
    ``extra_cmdline="dirty_verify=1"``, and the MISMATCH lines (lost writes) printed there."""
    with open(host.console_log(name), errors="replace") as fh:
        text = fh.read()
    ticks = re.findall(r"verified_pages=(\d+) bad_pages=(\d+)", text)
    mismatches = [line for line in text.splitlines() if "TESTBED-DIRTIER-MISMATCH" in line]
    if not ticks:
        return 0, 0, mismatches
    verified, bad = ticks[-1]
    return int(verified), int(bad), mismatches
