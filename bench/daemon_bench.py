"""Daemon cold start: `compute-agent daemon` from exec to READY=1, and its RSS once ready.

    python bench/daemon_bench.py [--runs N] [--uri URI] [--sysfs-root DIR] [--json]

Each run starts a fresh interpreter (`python -m agent.cli daemon`) with a NOTIFY_SOCKET that this
script owns, against the local RabbitMQ (a prefix of its own per run) and `--uri` (default
test:///default; a testbed host's qemu+tcp URI for the real thing), with a fresh claim ledger and a
copy of a sysfs fixture tree. It measures the wall time from spawning the process to the READY=1
datagram, reads VmRSS from /proc once READY=1 arrived, then SIGTERMs the daemon and checks it exits
0. Reports the median and the spread; `--json` prints one object with runs, ready_ms_median,
ready_ms_min, ready_ms_max, start_ms_median (the daemon's own start(), imports excluded),
rss_mb_median, rss_mb_max.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from broker_objects import delete_bus_objects  # noqa: E402

from agent.config import BusConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SYSFS_FIXTURE = REPO / "tests" / "fixtures" / "sysfs" / "hugepages_mixed"
READY_TIMEOUT_S = 30.0
EXTRA_ENV: dict[str, str] = {}
_READY_IN = re.compile(r"ready in (\d+) ms")
HOST = "bench-host"
BROKER_URL = BusConfig().transport_url  # the daemon's config leaves [bus] transport_url at its default


def write_files(base: Path, uri: str, sysfs_root: Path | None, prefix: str) -> tuple[Path, Path]:
    """(config file, sysfs root) for one run."""
    key_file = base / "bus.keys"
    key_file.write_text(f"k1 {bytes(range(32)).hex()}\n")
    sysfs = sysfs_root or base / "sysfs"
    if sysfs_root is None:
        shutil.copytree(SYSFS_FIXTURE, sysfs)
    config = base / "agent.conf"
    config.write_text(
        f"[DEFAULT]\nhost = {HOST}\nlog_level = INFO\nmy_ip = 127.0.0.1\n"
        f"[libvirt]\nconnection_uri = {uri}\n"
        f"[claims]\nstate_dir = {base / 'state'}\n"
        f"[bus]\nexchange_prefix = {prefix}\nkey_file = {key_file}\n"
    )
    return config, sysfs


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def wait_ready(sock: socket.socket, deadline: float) -> bool:
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            return False
        if b"READY=1" in data.split(b"\n"):
            return True
    return False


def one_run(uri: str, sysfs_root: Path | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="daemon-bench-") as tmp:
        base = Path(tmp)
        prefix = f"bench-{uuid.uuid4().hex[:10]}"
        config, sysfs = write_files(base, uri, sysfs_root, prefix)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(base / "notify"))
        env = {**os.environ, "NOTIFY_SOCKET": str(base / "notify"), **EXTRA_ENV}
        argv = [sys.executable, "-m", "agent.cli", "daemon", "--config", str(config), "--sysfs-root", str(sysfs)]
        started = time.monotonic()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if not wait_ready(sock, started + READY_TIMEOUT_S):
                raise RuntimeError(f"no READY=1 within {READY_TIMEOUT_S} s")
            ready_ms = (time.monotonic() - started) * 1000
            rss = rss_mb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=15)
            sock.close()
            try:  # the daemon's durable queue and exchanges; a failure here must not hide the run's own
                delete_bus_objects(BROKER_URL, prefix, [HOST])
            except Exception as exc:  # noqa: BLE001 - any broker trouble: say it, keep the run's outcome
                print(f"daemon_bench: could not delete {prefix}'s broker objects: {exc}", file=sys.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"daemon exited {proc.returncode}: {err.decode()[-2000:]}")
        own = _READY_IN.search(err.decode())
        return {"ready_ms": ready_ms, "rss_mb": rss, "start_ms": float(own.group(1)) if own else float("nan")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--uri", default="test:///default")
    parser.add_argument("--sysfs-root", type=Path, help="default: a copy of tests/fixtures/sysfs/hugepages_mixed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    one_run(args.uri, args.sysfs_root)  # warm the page cache: "cold" is a fresh process, not a cold disk
    runs = [one_run(args.uri, args.sysfs_root) for _ in range(args.runs)]
    ready = [r["ready_ms"] for r in runs]
    rss = [r["rss_mb"] for r in runs]
    summary = {
        "runs": len(runs),
        "uri": args.uri,
        "ready_ms_median": round(statistics.median(ready), 1),
        "ready_ms_min": round(min(ready), 1),
        "ready_ms_max": round(max(ready), 1),
        "start_ms_median": round(statistics.median(r["start_ms"] for r in runs), 1),
        "rss_mb_median": round(statistics.median(rss), 1),
        "rss_mb_max": round(max(rss), 1),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>16}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
