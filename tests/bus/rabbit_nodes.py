"""Private RabbitMQ nodes that a test starts, owns and throws away.

The machine's shared broker (`rabbit@localhost`, port 5672) is never touched: every private node has
its own node name (`ca-test-<id>@localhost`), AMQP port, distribution port, data and log directories,
config file, an empty enabled-plugins file (no management plugin, so no port clashes) and its own HOME
holding the Erlang cookie. The nodes register with the machine's epmd. The cookie is made per test
session and shared by its nodes (a cluster needs one cookie; the machine's cookie is root-only, and a
cookie of our own lets the nodes run as any user).

Every node started here is recorded; `cleanup_all()` (also registered with atexit) SIGKILLs whatever
of ours is still alive, found by the node's own HOME path in the beam's command line, so a failed or
interrupted test leaves no beam behind. A test process killed outright runs no cleanup: the next
NodeSet reaps the nodes of every node set whose owner process (its `owner.pid`) is gone.

Measured on this machine (2 cores shared with other runs): a node boots in 3-4.5 s (`start_seconds`
records each start), a clean stop takes ~1.4 s, three nodes started in parallel and joined into a
cluster take ~13 s. Set COMPUTE_AGENT_KEEP_RABBIT_DIRS=1 to keep the nodes' logs after a run.

The second half of the module wires the bus to such nodes for the fault tests: a `[bus]` config, an
RpcServer whose one method counts its executions by operation id, and steady caller threads that
record every outcome with its time.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec

from agent.bus.errors import BusError, RemoteError
from agent.bus.keys import Keyring
from agent.bus.rpc import RpcClient, RpcServer
from agent.config import BusConfig

RABBIT_BIN = Path(os.environ.get("COMPUTE_AGENT_RABBIT_BIN", "/usr/lib/rabbitmq/bin"))
#: A node on a loaded 2-core machine boots in ~4 s; a cluster join can take a few more.
START_TIMEOUT_S = 90.0
#: Ports are taken from a range far below the ephemeral range, so the CLI's own distribution port
#: (the node's plus 10000) stays below 65536 and clear of outgoing connections.
PORT_RANGE = (21000, 31000)

_live: dict[str, RabbitNode] = {}


def rabbit_available() -> tuple[bool, str]:
    for tool in ("rabbitmq-server", "rabbitmqctl"):
        if not (RABBIT_BIN / tool).exists():
            return False, f"{RABBIT_BIN / tool} missing (scripts/setup installs rabbitmq-server)"
    if not shutil.which("openssl"):
        return False, "openssl missing"
    return True, ""


def free_port() -> int:
    """A port free on 127.0.0.1 now, from PORT_RANGE (a race with other programs is possible but rare)."""
    for _ in range(200):
        port = random.randrange(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORT_RANGE}")


def port_open(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class TlsFiles:
    """A test PKI: a CA, a server cert for localhost/127.0.0.1, a client cert, and an unrelated CA."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca_cert: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _self_signed_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl(
        "req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN=compute-agent test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return key, cert


def _signed_cert(directory: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    ext_file = directory / f"{name}.ext"
    ext_file.write_text(ext)
    _openssl(
        "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", key, "-out", csr, "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext_file,
    )  # fmt: skip
    return key, cert


def make_test_pki(directory: Path) -> TlsFiles:
    """Everything with openssl (EC P-256 keys: fast to make), valid for two days."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _self_signed_ca(directory, "ca")
    _, wrong_ca = _self_signed_ca(directory, "wrong-ca")
    server_key, server_cert = _signed_cert(
        directory, "localhost", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    )
    client_key, client_cert = _signed_cert(directory, "client", ca, "extendedKeyUsage=clientAuth\n")
    return TlsFiles(ca[1], server_cert, server_key, client_cert, client_key, wrong_ca)


class RabbitNode:
    """One private RabbitMQ node: its files live under `base`, its processes are ours alone."""

    def __init__(self, base: Path, cookie: str, *, tls: TlsFiles | None = None, short_id: str | None = None):
        self.short_id = short_id or uuid.uuid4().hex[:10]
        self.name = f"ca-test-{self.short_id}@localhost"
        self.base = base / self.short_id
        self.home = self.base / "home"
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.tls = tls
        self.amqps_port = free_port() if tls else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        self._write_files(cookie)

    # --- files -----------------------------------------------------------------------------
    def _write_files(self, cookie: str) -> None:
        self.home.mkdir(parents=True)
        cookie_file = self.home / ".erlang.cookie"
        cookie_file.write_text(cookie)
        cookie_file.chmod(0o400)
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("")  # the machine's env file names rabbit@localhost
        (self.base / "rabbitmq.conf").write_text(self._config_text())

    def _config_text(self) -> str:
        lines = [
            f"listeners.tcp.1 = 127.0.0.1:{self.amqp_port}",
            "loopback_users.guest = true",
            "log.file.level = warning",
            "log.console = false",
            # the tests' own disks may be nearly full; the default alarm (50 MB) would block publishers
            "disk_free_limit.absolute = 1MB",
        ]
        if self.tls:
            lines += [
                f"listeners.ssl.1 = 127.0.0.1:{self.amqps_port}",
                f"ssl_options.cacertfile = {self.tls.ca_cert}",
                f"ssl_options.certfile = {self.tls.server_cert}",
                f"ssl_options.keyfile = {self.tls.server_key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        return "\n".join(lines) + "\n"

    def env(self, *, for_cli: bool = False) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_")) and k != "HOME"
        }  # nothing of the caller's (or the machine's) broker settings leaks in
        env.update(
            HOME=str(self.home),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_CONF_ENV_FILE=str(self.base / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.base / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        if not for_cli:  # the CLI picks its own distribution port from its default range
            env["RABBITMQ_DIST_PORT"] = str(self.dist_port)
            env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = "-kernel inet_dist_use_interface {127,0,0,1}"
        return env

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}//"

    @property
    def amqps_url(self) -> str:
        if self.amqps_port is None:
            raise RuntimeError(f"{self.name} has no TLS listener")
        return f"amqps://guest:guest@localhost:{self.amqps_port}//"

    # --- control ---------------------------------------------------------------------------
    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.name, *args]
        res = subprocess.run(cmd, env=self.env(for_cli=True), capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
        return res

    def start(self, *, wait: bool = True) -> None:
        if self.alive():
            raise RuntimeError(f"{self.name} is already running")
        log = open(self.base / "server.out", "ab")  # noqa: SIM115 (the child keeps it open)
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [str(RABBIT_BIN / "rabbitmq-server")],
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: SIGKILL reaches the beam and its helpers
        )
        log.close()
        _live[self.name] = self
        if wait:
            self.wait_ready()
            self.start_seconds = time.monotonic() - t0

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """The AMQP port answers (cheap to poll), then `rabbitmqctl await_startup` confirms the boot."""
        deadline = time.monotonic() + timeout
        while not port_open(self.amqp_port):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail_log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not listening after {timeout} s: {self.tail_log()}")
            time.sleep(0.1)
        self.ctl("await_startup", "--timeout", str(int(max(1, deadline - time.monotonic()))))

    def stop(self, timeout: float = 60.0) -> None:
        """A clean shutdown (`rabbitmqctl stop`), SIGKILL if it does not finish in time."""
        if not self.alive():
            return
        res = self.ctl("stop", timeout=timeout, check=False)
        if res.returncode != 0 or not self._wait_exit(timeout):
            self.kill()

    def kill(self) -> None:
        """SIGKILL the node (a crash, as an operator's power cut would be): no clean close of anything."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.beam_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._wait_exit(10.0)

    def restart(self, *, kill: bool = False) -> None:
        """Stop (or kill) and start again on the same data directory."""
        (self.kill if kill else self.stop)()
        self.start()

    def alive(self) -> bool:
        return bool(self.beam_pids()) or (self.proc is not None and self.proc.poll() is None)

    def beam_pids(self) -> list[int]:
        """The beam processes of this node, found by its own HOME in their command line."""
        return beam_pids(f"-home {self.home} ")

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None:
                self.proc.poll()  # reap
            exited = not self.beam_pids() and (self.proc is None or self.proc.returncode is not None)
            # a SIGKILLed beam is a zombie (empty cmdline) a moment before its sockets close
            if exited and not any(port_open(p, 0.05) for p in self.ports()):
                return True
            time.sleep(0.05)
        return False

    def ports(self) -> list[int]:
        return [p for p in (self.amqp_port, self.amqps_port, self.dist_port) if p is not None]

    def tail_log(self, chars: int = 2000) -> str:
        parts = []
        for path in [self.base / "server.out", *sorted((self.base / "log").glob("*.log"))]:
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def __repr__(self) -> str:
        return f"RabbitNode({self.name}, amqp={self.amqp_port})"


def beam_pids(marker: str) -> list[int]:
    """Beam (Erlang VM) processes whose command line contains `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if cmdline.startswith(b"/") and b"beam" in cmdline.split(b" ", 1)[0] and marker.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_orphans(prefix: str = "ca-rabbit-") -> None:
    """SIGKILL the nodes of node sets whose owning process died without cleaning up (SIGKILLed
    test run), and remove their directories. Node sets of live processes are left alone."""
    for owner_file in Path(tempfile.gettempdir()).glob(f"{prefix}*/owner.pid"):
        try:
            owner = int(owner_file.read_text())
        except (OSError, ValueError):
            continue
        if _pid_alive(owner):
            continue
        for pid in beam_pids(f"-home {owner_file.parent}/"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(owner_file.parent, ignore_errors=True)


def cleanup_all() -> None:
    """SIGKILL every node this process started that is still alive (atexit and fixture finalizers)."""
    for node in list(_live.values()):
        node.kill()
        _live.pop(node.name, None)


atexit.register(cleanup_all)


class NodeSet:
    """Nodes sharing one cookie and one temporary directory, all removed by `close()`."""

    def __init__(self, prefix: str = "ca-rabbit-"):
        reap_orphans(prefix)
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        (self.tmp / "owner.pid").write_text(str(os.getpid()))
        self.cookie = secrets.token_hex(20).upper()
        self.nodes: list[RabbitNode] = []
        self._pki: TlsFiles | None = None

    @property
    def pki(self) -> TlsFiles:
        if self._pki is None:
            self._pki = make_test_pki(self.tmp / "pki")
        return self._pki

    def new_node(self, *, tls: bool = False) -> RabbitNode:
        node = RabbitNode(self.tmp, self.cookie, tls=self.pki if tls else None)
        self.nodes.append(node)
        return node

    def start_nodes(self, count: int, *, tls: bool = False) -> list[RabbitNode]:
        """Start `count` new nodes in parallel (each boot is mostly waiting), then wait for all."""
        nodes = [self.new_node(tls=tls) for _ in range(count)]
        t0 = time.monotonic()
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_ready()
            node.start_seconds = time.monotonic() - t0
        return nodes

    def start_cluster(self, size: int = 3) -> list[RabbitNode]:
        """`size` nodes joined into one cluster (join_cluster onto the first), as quorum queues need."""
        nodes = self.start_nodes(size)
        for node in nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", nodes[0].name)
            node.ctl("start_app")
        nodes[0].ctl("await_online_nodes", str(size))
        return nodes

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
            _live.pop(node.name, None)
        if os.environ.get("COMPUTE_AGENT_KEEP_RABBIT_DIRS") == "1":  # the nodes' logs, to debug a failure
            print(f"rabbit_nodes: kept {self.tmp}")
            return
        shutil.rmtree(self.tmp, ignore_errors=True)


@contextlib.contextmanager
def node_set(prefix: str = "ca-rabbit-") -> Iterator[NodeSet]:
    """A NodeSet cleaned up on exit, even when the test fails (use it in a pytest fixture)."""
    nodes = NodeSet(prefix)
    try:
        yield nodes
    finally:
        nodes.close()


# --- bus wiring for the fault tests ------------------------------------------------------------------


class OpBody(msgspec.Struct, frozen=True):
    """The body of the fault tests' one method: an operation id, unique per call."""

    op: str


class Executions:
    """A handler that counts its executions by operation id (the proof of "never twice")."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def handler(self, body: OpBody) -> dict[str, str]:
        with self._lock:
            self.counts[body.op] += 1
        return {"op": body.op}

    def more_than_once(self) -> dict[str, int]:
        with self._lock:
            return {op: n for op, n in self.counts.items() if n > 1}

    def __getitem__(self, op: str) -> int:
        with self._lock:
            return self.counts[op]


def bus_config(transport_url: str, key_file: Path, **overrides: Any) -> BusConfig:
    """A [bus] for private nodes: its own exchange prefix, short heartbeats and timeouts."""
    base = dict(
        transport_url=transport_url,
        exchange_prefix=f"fault-{uuid.uuid4().hex[:10]}",
        key_file=key_file,
        heartbeat_s=2,
        call_timeout_s=2.0,
    )
    return replace(BusConfig(), **{**base, **overrides})


def serve(cfg: BusConfig, host: str, keyring: Keyring, executions: Executions) -> RpcServer:
    """A started RpcServer for `host` whose `work` method counts executions."""
    server = RpcServer(cfg, host, keyring)
    server.register("work", executions.handler, since="1.0", body_type=OpBody)
    server.start(wait=30.0)
    return server


@dataclass(frozen=True)
class Outcome:
    op: str
    started: float  # time.monotonic()
    ended: float
    error: str | None  # None: answered (call) or confirmed by the broker (cast)


class Traffic(threading.Thread):
    """Steady calls (or casts) from one thread until stopped, each with an operation id of its own."""

    def __init__(self, client: RpcClient, host: str, prefix: str, *, cast: bool = False, timeout: float = 2.0):
        super().__init__(name=f"traffic-{prefix}", daemon=True)
        self.client, self.host, self.prefix, self.cast, self.timeout = client, host, prefix, cast, timeout
        self.outcomes: list[Outcome] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            op = f"{self.prefix}-{i}"
            i += 1
            t0 = time.monotonic()
            try:
                self._send(op)
                error = None
            except (BusError, RemoteError) as exc:
                error = type(exc).__name__
            self.outcomes.append(Outcome(op, t0, time.monotonic(), error))
            self.stopping.wait(0.005 if error is None else 0.05)

    def _send(self, op: str) -> None:
        if self.cast:
            self.client.cast(self.host, "work", {"op": op}, timeout=self.timeout)
        elif self.client.call(self.host, "work", {"op": op}, timeout=self.timeout) != {"op": op}:
            raise AssertionError(f"wrong answer to {op}")

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)

    def ok_ops(self) -> set[str]:
        return {o.op for o in list(self.outcomes) if o.error is None}

    def first_ok_started_after(self, t: float) -> float | None:
        """When the first call that started after `t` succeeded (None: none yet)."""
        return next((o.ended for o in list(self.outcomes) if o.started >= t and o.error is None), None)


def wait_for(predicate: Callable[[], Any], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())
