"""Host NUMA discovery from sysfs (see shared/formats.md, "Host topology").

`discover_sysfs()` reads, below ROOT (default ``/sys``):

- ``devices/system/node/nodeN/{cpulist,meminfo,distance}`` and
  ``nodeN/hugepages/hugepages-<size>kB/{nr_hugepages,free_hugepages}``;
- ``devices/system/cpu/{online,offline,isolated,present,possible}``,
  ``cpuN/online`` and ``cpuN/topology/thread_siblings_list``.

Rules (what the kernel gives us is not always tidy):

- A CPU is online when it is listed in ``cpu/online`` and its ``cpuN/online`` (if the file exists;
  ``cpu0`` usually has none) does not say ``0``.  A cell's ``cpus`` are its ``cpulist`` intersected
  with the online set (x86 kernels already drop offline CPUs from ``cpulist``; other arches or a
  race with hotplug may not).
- Sibling groups come from ``thread_siblings_list`` of each online CPU, restricted to the cell's online
  CPUs, merged transitively (so a racy, asymmetric pair of files still gives a partition), each group
  sorted and the list sorted by first CPU.  A core with one online thread is a group of one.  Offline
  CPUs have no ``topology`` directory and are never read.
- ``offline_cpus`` is the kernel's ``cpu/offline`` list (it includes possible-but-not-present CPUs);
  without that file, ``present`` (else ``possible``) minus online.  ``isolated_cpus`` is ``cpu/isolated``
  as the kernel reports it (missing file or empty line: none).
- ``memory_kb`` is the node's ``MemTotal``.  Page pools: one entry per ``hugepages-<size>kB`` directory
  (including sizes with zero pages), plus a 4 KiB entry computed like libvirt does:
  ``total = (MemTotal - sum(nr_hugepages * size)) // 4`` (hugetlb pages are part of MemTotal) and
  ``free = MemFree // 4`` (MemFree does not include the hugepage pool), clamped to ``total``.
  A hugepage ``free`` above ``nr`` (surplus pages) is clamped to ``nr`` too, so the result always
  satisfies ``0 <= free <= total``.
- ``distances`` is the node's ``distance`` row; entry *i* belongs to the *i*-th node directory in
  ascending id order (the kernel prints one entry per online node in that order).

Any missing or unparsable file raises `DiscoveryError` naming that file; nothing else escapes.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from agent.cpuset import parse_kernel_cpu_list
from agent.errors import DiscoveryError
from agent.limits import MAX_CPU_SET_IDS, MAX_HOST_CPU_ID, MAX_SMT_SIBLINGS, MAX_SYSFS_DIGITS, MAX_SYSFS_FILE_BYTES
from agent.numa.topology import HostTopology, NumaCell, PagePool, cell_problem, host_size_problem, numa_cell
from agent.numbers import uint_or_none
from agent.safe_io import read_bounded
from agent.units import SMALL_PAGE_KB

__all__ = ["discover_sysfs", "parse_cpu_list"]

_NODE_DIR_RE = re.compile(r"^node(\d+)$", re.ASCII)
_HUGEPAGE_DIR_RE = re.compile(r"^hugepages-(\d+)kB$", re.ASCII)
_MEMINFO_RE = re.compile(r"^Node\s+(\d+)\s+([A-Za-z0-9_()]+):\s+(\d+)(?:\s+kB)?$", re.ASCII)


def _small_int(digits: str, what: str, path: str | Path | None) -> int:
    """int() of an ASCII digit string matched by a regex, refusing absurdly long ones."""
    if len(digits) > MAX_SYSFS_DIGITS:
        raise DiscoveryError(f"{what} {digits[:20]}... has more than {MAX_SYSFS_DIGITS} digits", _p(path))
    return int(digits)


def parse_cpu_list(text: str, path: str | Path | None = None) -> frozenset[int]:
    """Parse a kernel CPU list ("0-3,8,10-11"); garbage raises `DiscoveryError` naming `path`."""
    try:
        return parse_kernel_cpu_list(text)
    except ValueError as exc:
        raise DiscoveryError(f"cannot parse CPU list {text.strip()!r}: {exc}", _p(path)) from None


def _p(path: str | Path | None) -> str | None:
    return None if path is None else str(path)


def _read(path: Path) -> str:
    # sysfs files report a size of 4096 whatever their length: bound the read, not the size
    data = read_bounded(path, limit=MAX_SYSFS_FILE_BYTES, what="sysfs file", trust_size=False, error=_sysfs_error)
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise DiscoveryError("not ASCII text", str(path)) from None


def _sysfs_error(message: str, path: str) -> DiscoveryError:
    return DiscoveryError(message, path)


def _read_cpu_list(path: Path, max_ids: int = MAX_CPU_SET_IDS) -> frozenset[int]:
    text = _read(path)
    try:
        return parse_kernel_cpu_list(text, max_ids=max_ids)
    except ValueError as exc:
        raise DiscoveryError(f"cannot parse CPU list {text.strip()[:80]!r}: {exc}", str(path)) from None


def _read_int(path: Path) -> int:
    text = _read(path)
    value = uint_or_none(text, max_digits=MAX_SYSFS_DIGITS)
    if value is None:
        raise DiscoveryError(f"expected a non-negative integer, got {text.strip()[:40]!r}", str(path))
    return value


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(p.name for p in path.iterdir())
    except FileNotFoundError:
        raise DiscoveryError("missing directory", str(path)) from None
    except NotADirectoryError:
        raise DiscoveryError("expected a directory", str(path)) from None
    except OSError as exc:
        raise DiscoveryError(f"cannot list: {exc.strerror or exc}", str(path)) from None


def _parse_meminfo(path: Path, node_id: int) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in _read(path).splitlines():
        line = line.strip()
        if not line:
            continue
        m = _MEMINFO_RE.match(line)
        if m is None:
            continue  # unknown shapes of lines we do not use are tolerated
        if _small_int(m.group(1), "node id", path) != node_id:
            raise DiscoveryError(f"line {line[:80]!r} is about node {m.group(1)}, not node {node_id}", str(path))
        values[m.group(2)] = _small_int(m.group(3), f"{m.group(2)} value", path)
    for key in ("MemTotal", "MemFree"):
        if key not in values:
            raise DiscoveryError(f"no parsable 'Node {node_id} {key}:' line", str(path))
    if values["MemFree"] > values["MemTotal"]:
        raise DiscoveryError(f"MemFree ({values['MemFree']} kB) exceeds MemTotal ({values['MemTotal']} kB)", str(path))
    return values


def _parse_distance(path: Path, node_ids: list[int]) -> dict[int, int]:
    text = _read(path)
    words = text.split()
    if len(words) != len(node_ids):
        raise DiscoveryError(
            f"expected {len(node_ids)} distances (one per node {node_ids}), got {text.strip()!r}", str(path)
        )
    out: dict[int, int] = {}
    for other, word in zip(node_ids, words, strict=True):
        value = uint_or_none(word, max_digits=3)
        if value is None or not 0 < value <= 255:
            raise DiscoveryError(
                f"bad distance {word[:40]!r} (SLIT values are 1..255) in {text.strip()[:200]!r}", str(path)
            )
        out[other] = value
    return out


def _hugepage_pools(node_dir: Path) -> list[PagePool]:
    hp_dir = node_dir / "hugepages"
    if not hp_dir.exists():
        return []  # kernel without hugetlbfs support
    pools: list[PagePool] = []
    for name in _listdir(hp_dir):
        m = _HUGEPAGE_DIR_RE.match(name)
        if m is None:
            continue
        size_kb = _small_int(m.group(1), "hugepage size", hp_dir / name)
        if size_kb <= 0 or size_kb > 1 << 30:
            raise DiscoveryError(f"implausible hugepage size {size_kb} kB", str(hp_dir / name))
        total = _read_int(hp_dir / name / "nr_hugepages")
        free = _read_int(hp_dir / name / "free_hugepages")
        pools.append(PagePool(size_kb=size_kb, total=total, free=min(free, total)))
    return pools


def _online_cpus(cpu_dir: Path) -> frozenset[int]:
    online = set(_read_cpu_list(cpu_dir / "online"))
    for cpu in sorted(online):
        flag = cpu_dir / f"cpu{cpu}" / "online"
        if not flag.exists():
            continue  # cpu0 (and CPUs that cannot be hot-unplugged) have no `online` file
        value = _read(flag).strip()
        if value == "0":
            online.discard(cpu)  # went offline between the two reads
        elif value != "1":
            raise DiscoveryError(f"expected 0 or 1, got {value[:40]!r}", str(flag))
    return frozenset(online)


def _offline_cpus(cpu_dir: Path, online: frozenset[int]) -> frozenset[int]:
    if (cpu_dir / "offline").exists():
        return _read_cpu_list(cpu_dir / "offline") - online
    for name in ("present", "possible"):
        if (cpu_dir / name).exists():
            return _read_cpu_list(cpu_dir / name) - online
    return frozenset()


def sibling_partition(cpus: frozenset[int], siblings_of: dict[int, frozenset[int]]) -> tuple[tuple[int, ...], ...]:
    """SMT groups of `cpus` from each CPU's sibling list, merged transitively (union-find), so
    sibling lists that disagree with each other still give clean, disjoint groups. Shared by the
    sysfs and the libvirt capabilities readers."""
    parent = {cpu: cpu for cpu in cpus}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for cpu, sibs in siblings_of.items():
        for other in sibs & cpus:
            ra, rb = find(cpu), find(other)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for cpu in sorted(cpus):
        groups.setdefault(find(cpu), []).append(cpu)
    return tuple(sorted(tuple(g) for g in groups.values()))


def _sibling_groups(cpu_dir: Path, cpus: frozenset[int]) -> tuple[tuple[int, ...], ...]:
    siblings_of = {
        cpu: _read_cpu_list(cpu_dir / f"cpu{cpu}" / "topology" / "thread_siblings_list", MAX_SMT_SIBLINGS)
        for cpu in sorted(cpus)
    }
    return sibling_partition(cpus, siblings_of)


def discover_sysfs(root: str | Path = "/sys", hostname: str | None = None) -> HostTopology:
    """Read the host NUMA topology below `root` (a sysfs mount or a copy of its relevant parts).

    Raises `DiscoveryError` (naming the file or directory) when something is missing or garbled.
    """
    root = Path(root)
    node_root = root / "devices" / "system" / "node"
    cpu_dir = root / "devices" / "system" / "cpu"
    if not node_root.is_dir():
        raise DiscoveryError("missing NUMA node directory (kernel without CONFIG_NUMA?)", str(node_root))
    if not cpu_dir.is_dir():
        raise DiscoveryError("missing CPU directory", str(cpu_dir))

    node_ids = sorted(
        _small_int(m.group(1), "node id", node_root) for m in map(_NODE_DIR_RE.match, _listdir(node_root)) if m
    )
    node_ids = [n for n in node_ids if (node_root / f"node{n}").is_dir()]
    if not node_ids:
        raise DiscoveryError("no nodeN directories", str(node_root))
    if node_ids[-1] > MAX_HOST_CPU_ID:
        raise DiscoveryError(f"implausible node id {node_ids[-1]}", str(node_root))
    online = _online_cpus(cpu_dir)
    problem = host_size_problem(len(node_ids), len(online))
    if problem:
        raise DiscoveryError(problem, str(root / "devices" / "system"))

    offline = _offline_cpus(cpu_dir, online)
    isolated = _read_cpu_list(cpu_dir / "isolated") if (cpu_dir / "isolated").exists() else frozenset()

    cells: list[NumaCell] = []
    owner: dict[int, int] = {}
    for node_id in node_ids:
        node_dir = node_root / f"node{node_id}"
        cpulist_path = node_dir / "cpulist"
        cpus = _read_cpu_list(cpulist_path) & online
        clash = sorted(c for c in cpus if c in owner)
        if clash:
            raise DiscoveryError(f"CPUs {clash} are also listed by node{owner[clash[0]]}", str(cpulist_path))
        owner.update((c, node_id) for c in cpus)

        meminfo = _parse_meminfo(node_dir / "meminfo", node_id)
        mem_total, mem_free = meminfo["MemTotal"], meminfo["MemFree"]
        huge = _hugepage_pools(node_dir)
        huge_kb = sum(p.total * p.size_kb for p in huge)
        pages = list(huge)
        if all(p.size_kb != SMALL_PAGE_KB for p in huge):
            small_total = max(0, mem_total - huge_kb) // SMALL_PAGE_KB
            pages.append(PagePool(SMALL_PAGE_KB, small_total, min(mem_free // SMALL_PAGE_KB, small_total)))

        siblings = _sibling_groups(cpu_dir, cpus)
        distances = _parse_distance(node_dir / "distance", node_ids)
        cell = numa_cell(node_id, cpus, siblings, mem_total, pages, distances)
        problem = cell_problem(cell)
        if problem:
            raise DiscoveryError(problem, str(node_dir))
        cells.append(cell)

    return HostTopology(
        hostname=hostname if hostname is not None else socket.gethostname(),
        cells=tuple(cells),
        online_cpus=online,
        offline_cpus=offline,
        isolated_cpus=isolated,
    )
