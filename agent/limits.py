"""Every bound the agent puts on input from outside (files, XML, metadata, messages), each with the
reason for its value. A bound exists to refuse garbage early and to cap the work a hostile input can
cause; none is meant to be reached by a real host or instance.
"""

from __future__ import annotations

# --- ids and counts -------------------------------------------------------------------------------

#: Largest CPU / node id in a CPU set or host/placement document: far above any kernel's NR_CPUS.
MAX_ID = 1 << 20
#: Largest CPU / node id read from the host (sysfs, capabilities): kernel NR_CPUS tops out at 8192.
MAX_HOST_CPU_ID = 1 << 16
#: Most ids a CPU set may expand to (included and excluded ranges together): bounds its work to a few ms.
MAX_CPU_SET_IDS = 1 << 17
#: Most comma-separated elements of a CPU set, whatever the text's length.
MAX_CPU_SET_TOKENS = 1 << 16
#: Most digits of an id in a CPU set: enough for MAX_ID; int() of thousands of digits is slow.
MAX_CPU_SET_DIGITS = 7
#: Most vCPUs of an instance or domain: QEMU's largest machine type (q35 with x2APIC) allows 4096.
MAX_VCPUS = 4096
#: Most guest NUMA cells: hosts have at most a few dozen nodes.
MAX_NUMA_NODES = 64

# --- host topology (one set for host-state documents, sysfs discovery and libvirt capabilities) --

#: Most NUMA cells of a host: Linux's MAX_NUMNODES is at most 1024 (CONFIG_NODES_SHIFT <= 10).
MAX_HOST_CELLS = 1024
#: Most CPUs of a host (all cells together): the largest NR_CPUS a distribution kernel builds (x86-64 MAXSMP).
MAX_HOST_CPUS = 8192
#: Most hardware threads of one core: POWER's SMT8 is the widest shipped.
MAX_SMT_SIBLINGS = 8
#: Most page sizes of one cell: x86-64 has 3, arm64 at most 5 (contiguous-bit sizes included).
MAX_PAGE_SIZES = 16

# --- memory ---------------------------------------------------------------------------------------

#: Most memory of an instance request (MiB): 64 TiB, more than the largest hosts sold.
MAX_MEMORY_MB = 64 * 1024 * 1024
#: Most memory a placement or host-state document may record (MiB): overflow guard, not a policy.
MAX_DOC_MEMORY_MB = 1 << 40
#: Largest page size an instance may ask for: 16 GiB, the largest hugepage any platform offers.
MAX_PAGE_SIZE_KB = 16 * 1024 * 1024
#: Largest page size a placement document may record: overflow guard, above any real page size.
MAX_DOC_PAGESIZE_KB = 1 << 30

# --- XML (domain and capabilities) ----------------------------------------------------------------

#: Largest XML document parsed: a domain with hundreds of devices, or the capabilities of a
#: 2-socket host with every machine type listed, are ~100 KiB.
MAX_XML_BYTES = 4 * 1024 * 1024
#: Most elements of an XML document: a domain with hundreds of devices has a few thousand.
MAX_XML_ELEMENTS = 200_000
#: Deepest element nesting: libvirt's domain and capabilities XML nest about 8 deep.
MAX_XML_DEPTH = 64
#: Deepest JSON nesting of any document (files, requests, host states): ours nest at most ~6 deep;
#: the decoders recurse once per level and Python's recursion limit is ~1000.
MAX_JSON_DEPTH = 32
#: Largest placement JSON in a domain's <metadata>: most of what a document may hold (the rest is
#: left to the domain). Each floating vCPU lists every CPU it may run on, so 400 floating vCPUs
#: over 512 CPUs take ~1 MB (a 256 KiB bound made the rewriter refuse guests the parser accepts);
#: json.loads of 4 MiB takes ~50 ms.
MAX_METADATA_CHARS = MAX_XML_BYTES - (64 << 10)

# --- files ----------------------------------------------------------------------------------------

#: Largest sysfs file read during discovery: the longest (a cpulist or meminfo) is a few KiB.
MAX_SYSFS_FILE_BYTES = 1 << 20
#: Most digits of a number read from sysfs: a u64 has 20; int() of thousands of digits is slow.
MAX_SYSFS_DIGITS = 20
#: Largest configuration file: a commented agent.conf is a few KiB.
MAX_CONFIG_FILE_BYTES = 1 << 20
#: Largest JSON/XML file the CLI reads (topologies, requests, host states): far above any real one.
MAX_CLI_FILE_BYTES = 64 << 20

# --- host and placement documents (overflow guards, far above any real host) -----------------------

#: Most pages in one pool of a document: 2^48 4-KiB pages is an exbibyte.
MAX_DOC_PAGE_COUNT = 1 << 48
#: Most memory of one cell in a topology document (KiB): an exbibyte.
MAX_DOC_MEMORY_KB = 1 << 50
#: Largest instance metadata (flavor extra specs + image properties) in a domain's <metadata>: Nova
#: caps an extra spec at 255 characters and a flavor at a few hundred of them, far below this.
MAX_INSTANCE_METADATA_CHARS = 256 << 10
