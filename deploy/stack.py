"""The local stack of real services: Apache Kafka (single-node KRaft) and Redis, no Docker needed.

``make stack-up`` / ``stack-down`` / ``stack-status`` call this module's CLI; the test suite uses
:class:`KafkaServer` and :class:`RedisServer` directly to run its own instances on free ports (and
to restart or kill them in fault tests).

- Kafka comes from the official jars on Maven Central (``org.apache.kafka:kafka_2.13``, see
  ``deploy/kafka/pom.xml``), resolved once per machine with Maven into
  ``~/.cache/eventcast/kafka-<version>/libs`` and run on the machine's Java (17+). The storage
  directory is formatted on first start. The broker is configured to behave on one node:
  replication factor and min ISR 1 for the internal topics, no initial rebalance delay, no topic
  auto-creation.
- Redis is the system's ``redis-server`` with AOF persistence (``appendfsync everysec``) in the
  stack's data directory. With ``--redis-cluster`` (or ``EVENTCAST_REDIS_CLUSTER=1``) the stack's
  Redis is instead a Redis Cluster of three primaries and three replicas
  (:class:`RedisClusterServers`, ports ``EVENTCAST_REDIS_CLUSTER_PORT`` to +5, 7000-7005 by
  default), created with ``redis-cli --cluster create``.

Each service keeps ``<dir>/<name>.pid``; starting a service that is already running on its port
reuses it, and ``stop()`` is safe to call twice. Logs go to ``<dir>/logs/``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field

from model.errors import ConfigError
from stream.config import Settings, settings_from_environment

REPO = Path(__file__).resolve().parent.parent
KAFKA_POM = REPO / "deploy" / "kafka" / "pom.xml"
KAFKA_LOG4J = REPO / "deploy" / "kafka" / "log4j2.properties"
CACHE = Path(os.environ.get("EVENTCAST_CACHE", Path.home() / ".cache" / "eventcast"))

DEFAULT_TOPICS = {"events": 6, "forecasts": 6, "events.dlq": 1}


class StackError(RuntimeError):
    """A service could not be set up, started or stopped; the message says what to do."""


# --- small helpers -----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ensure_port_free(port: int, what: str) -> None:
    if not _port_free(port):
        raise StackError(
            f"port {port} is already taken on 127.0.0.1, so {what} cannot start there; "
            f"stop whatever listens on {port} or choose another port"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited child not yet reaped) is not alive for our purposes.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _terminate(pid: int, timeout: float, sig: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not _pid_alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _pid_alive(pid) and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)


def _spawn(cmd: list[str], log_path: Path, env: Mapping[str, str] | None = None) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            start_new_session=True,  # survives the caller; stopped through its pid file
        )
    return proc.pid


# --- Kafka -------------------------------------------------------------------------------------


def kafka_version() -> str:
    text = KAFKA_POM.read_text()
    start = text.index("<kafka.version>") + len("<kafka.version>")
    return text[start : text.index("</kafka.version>", start)]


def ensure_kafka_jars() -> Path:
    """Resolve the broker's jars through Maven Central once per machine; return the libs folder."""
    libs = CACHE / f"kafka-{kafka_version()}" / "libs"
    marker = libs / ".complete"
    if marker.exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            "Maven (mvn) not found: it resolves the Apache Kafka jars from Maven Central "
            "(Debian: apt-get install maven)"
        )
    tmp = libs.with_name("libs.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[stack] resolving Apache Kafka {kafka_version()} jars into {libs}", file=sys.stderr)
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(KAFKA_POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise StackError(f"mvn could not resolve the Kafka jars:\n{result.stdout}{result.stderr}")
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    marker.touch()
    return libs


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise StackError(
            "java not found: Kafka needs Java 17+ (Debian: apt-get install openjdk-17-jre-headless)"
        )
    return java


class _ManagedProcess:
    """What Kafka and Redis share: a pid file, a log file, running checks, stop and kill.

    Subclasses are dataclasses with ``dir`` and ``port`` and set ``name``.
    """

    name: ClassVar[str]
    dir: Path
    port: int

    @property
    def pid_file(self) -> Path:
        return self.dir / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        pid = _read_pid(self.pid_file)
        return pid if pid is not None and _pid_alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None and port_open(self.port)

    def stop(self, timeout: float = 30.0) -> None:
        """Graceful stop (SIGTERM, then SIGKILL after ``timeout``). Safe to call twice."""
        pid = self.pid()
        if pid is not None:
            _terminate(pid, timeout)
        self.pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """``kill -9`` the process, as a crash would."""
        pid = self.pid()
        if pid is not None:
            _terminate(pid, 10, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)


@dataclass
class KafkaServer(_ManagedProcess):
    """One single-node KRaft broker (combined broker + controller) on 127.0.0.1.

    ``scram_users`` (name → password) adds a ``SASL_PLAINTEXT`` listener on ``sasl_port`` with
    SCRAM-SHA-256, the credentials written into the storage at format time.
    """

    name: ClassVar[str] = "kafka"
    dir: Path
    port: int = 9092
    controller_port: int | None = None
    sasl_port: int | None = None
    scram_users: Mapping[str, str] = field(default_factory=dict)
    heap: str = "768m"

    def __post_init__(self) -> None:
        self.dir = Path(self.dir)
        if self.controller_port is None:
            self.controller_port = self._saved_controller_port() or free_port()

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _saved_controller_port(self) -> int | None:
        props = self.dir / "kafka" / "server.properties"
        if props.exists():
            for line in props.read_text().splitlines():
                if line.startswith("controller.quorum.voters="):
                    return int(line.rsplit(":", 1)[1])
        return None

    def _properties(self) -> str:
        listeners = [
            f"PLAINTEXT://127.0.0.1:{self.port}",
            f"CONTROLLER://127.0.0.1:{self.controller_port}",
        ]
        advertised = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        extra: list[str] = []
        if self.sasl_port:
            listeners.append(f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}")
            advertised.append(f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}")
            protocols.append("SASL_PLAINTEXT:SASL_PLAINTEXT")
            extra += [
                "sasl.enabled.mechanisms=SCRAM-SHA-256",
                "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config="
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            ]
        lines = [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners={','.join(listeners)}",
            f"advertised.listeners={','.join(advertised)}",
            f"listener.security.protocol.map={','.join(protocols)}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={self.dir / 'kafka' / 'data'}",
            "num.partitions=1",
            "auto.create.topics.enable=false",
            "group.initial.rebalance.delay.ms=0",
            # One node: internal topics cannot be replicated, and fewer partitions start faster.
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=6",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=6",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "min.insync.replicas=1",
            "default.replication.factor=1",
            # No time-based retention on this local stack. Forecast records carry the newest
            # observation's ts as their Kafka timestamp (docs/contract.md), and the demo, the tests
            # and the benchmarks replay historical data (2010 temperatures, fixed 2023 test times):
            # with a time limit the broker's retention check (30 s after start, then every 5 min)
            # deletes those forecasts minutes after they were written — it made fault tests lose
            # "forecasts" at random. Nothing is deleted here (`make stack-down` keeps the data;
            # removing .stack/ clears it).
            "log.retention.ms=-1",
            "log.segment.bytes=67108864",
            # Let tests add partitions and see them quickly.
            "metadata.max.idle.interval.ms=500",
            *extra,
        ]
        return "\n".join(lines) + "\n"

    def _format(self, java: str, libs: Path, props: Path, cluster_id: str | None = None) -> None:
        # A random id in Kafka's URL-safe base64 starts with "-" once in 64: passed as a separate
        # argument, the tool's parser would take it for an option ("expected one argument").
        cluster_id = cluster_id or base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        cmd = [
            java,
            "-cp",
            f"{libs}/*",
            f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
            "kafka.tools.StorageTool",
            "format",
            f"--cluster-id={cluster_id}",
            "-c",
            str(props),
        ]
        for name, password in self.scram_users.items():
            cmd += ["--add-scram", f"SCRAM-SHA-256=[name={name},password={password}]"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise StackError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")

    def start(self, timeout: float = 90.0) -> None:
        """Start the broker, or reuse it when it already runs; return once it serves requests."""
        if self.running():
            return
        for port, what in (
            (self.port, "Kafka"),
            (self.controller_port, "the Kafka controller"),
            (self.sasl_port, "Kafka's SASL listener"),
        ):
            if port:
                _ensure_port_free(port, what)
        java, libs = _java(), ensure_kafka_jars()
        conf = self.dir / "kafka"
        conf.mkdir(parents=True, exist_ok=True)
        props = conf / "server.properties"
        props.write_text(self._properties())
        if not (conf / "data" / "meta.properties").exists():
            self._format(java, libs, props)
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        cmd = [
            java,
            f"-Xmx{self.heap}",
            "-Xms128m",
            "-XX:+UseG1GC",
            "-XX:TieredStopAtLevel=1",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
            "-cp",
            f"{libs}/*",
            "kafka.Kafka",
            str(props),
        ]
        pid = _spawn(cmd, self.log_file)
        self.pid_file.write_text(f"{pid}\n")
        self._wait_ready(pid, offset, timeout)

    def _wait_ready(self, pid: int, log_offset: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                raise StackError(
                    f"Kafka exited during start-up; see {self.log_file}:\n{self._log_tail()}"
                )
            if port_open(self.port):
                with open(self.log_file, "rb") as fh:
                    fh.seek(log_offset)
                    if b"Kafka Server started" in fh.read():
                        return
            time.sleep(0.2)
        raise StackError(f"Kafka did not become ready within {timeout:.0f}s; see {self.log_file}")

    def _log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def restart(self, timeout: float = 90.0) -> None:
        self.stop()
        self.start(timeout)


# --- Redis -------------------------------------------------------------------------------------


def _redis_ping(port: int, password: str | None = None, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            if password:
                s.sendall(f"AUTH {password}\r\n".encode())
                s.recv(64)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer(_ManagedProcess):
    """The system's ``redis-server`` with AOF persistence in ``dir``.

    ``extra_args`` are passed through (e.g. ``["--aclfile", path]`` or TLS options).
    """

    name: ClassVar[str] = "redis"
    dir: Path
    port: int = 6379
    extra_args: tuple[str, ...] = ()
    password: str | None = None

    def __post_init__(self) -> None:
        self.dir = Path(self.dir)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        """Start redis-server, or reuse it when it already runs; return once it answers PING."""
        if self.running():
            return
        server = shutil.which("redis-server")
        if server is None:
            raise StackError("redis-server not found (Debian: apt-get install redis-server)")
        _ensure_port_free(self.port, "Redis")
        data = self.dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            server,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_file),
            "--maxmemory-policy",
            "noeviction",
            "--databases",
            "64",
            *self.extra_args,
        ]
        pid = _spawn(cmd, self.log_file)
        self.pid_file.write_text(f"{pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                raise StackError(f"redis-server exited during start-up; see {self.log_file}")
            if port_open(self.port) and (self.extra_args or _redis_ping(self.port, self.password)):
                return
            time.sleep(0.1)
        raise StackError(f"Redis did not answer PING within {timeout:.0f}s; see {self.log_file}")


def _redis_cli(port: int, *args: str, options: tuple[str, ...] = (), timeout: float = 10.0) -> str:
    """``redis-cli -p PORT OPTIONS... ARGS...``'s output (an empty string when the node does not
    answer); ``options`` are connection options (``--tls --cacert F``, ``--user U --pass P``)."""
    cli = shutil.which("redis-cli")
    if cli is None:
        raise StackError("redis-cli not found (Debian: apt-get install redis-tools)")
    try:
        result = subprocess.run(
            [cli, "-h", "127.0.0.1", "-p", str(port), *options, *args],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return ""
    return result.stdout if result.returncode == 0 else ""


@dataclass
class ClusterNode:
    """One node as ``CLUSTER NODES`` lists it: its port, whether it is a primary, the node id of
    its primary (replicas) and the hash slot ranges it serves (primaries)."""

    id: str
    port: int
    primary: bool
    primary_id: str | None
    slots: tuple[tuple[int, int], ...]

    def serves(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)


@dataclass
class RedisClusterServers:
    """A Redis Cluster on 127.0.0.1: ``len(ports) // 2`` primaries with one replica each, every
    node a :class:`RedisServer` (AOF, ``noeviction``) in its own folder ``dir/redis-cluster/PORT``.

    ``cluster-node-timeout`` is short (``node_timeout_ms``, 2 s) so that a replica takes over a
    dead primary within seconds (the failover tests rely on it). The cluster is created once
    (``redis-cli --cluster create``); a later start finds each node's ``nodes.conf`` and the
    cluster re-forms by itself.

    ``extra_args`` go to every node (an ACL file, TLS: ``--port 0 --tls-port {port}
    --tls-cluster yes ...``, where ``{port}`` is the node's port), ``cli_options`` to every
    ``redis-cli`` call that creates or inspects the cluster (``--tls --cacert F -a PASSWORD``).
    """

    dir: Path
    ports: tuple[int, ...] = (7000, 7001, 7002, 7003, 7004, 7005)
    node_timeout_ms: int = 2000
    extra_args: tuple[str, ...] = ()
    cli_options: tuple[str, ...] = ()
    nodes: list[RedisServer] = field(init=False)

    def __post_init__(self) -> None:
        self.dir = Path(self.dir)
        if len(self.ports) < 6 or len(self.ports) % 2:
            raise StackError("a Redis Cluster here needs an even number of ports, at least 6")
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms))  # fmt: skip
        self.nodes = [
            RedisServer(
                self.dir / "redis-cluster" / str(port),
                port=port,
                extra_args=(*args, *(a.format(port=port) for a in self.extra_args)),
            )
            for port in self.ports
        ]

    @classmethod
    def on_free_ports(cls, dir: Path, nodes: int = 6, **options: Any) -> RedisClusterServers:
        """A cluster on ports that are free now, each with its cluster bus port (port + 10000,
        which must stay below 65536) free too (the test suite's cluster); ``options`` as the
        class takes them."""
        ports: list[int] = []
        while len(ports) < nodes:
            port = free_port()
            if port <= 55535 and port not in ports and _port_free(port + 10000):
                ports.append(port)
        return cls(dir, ports=tuple(ports), **options)

    def cli(self, port: int, *args: str) -> str:
        """``redis-cli`` against one node with :attr:`cli_options` (empty when it does not
        answer)."""
        return _redis_cli(port, *args, options=self.cli_options)

    @property
    def url(self) -> str:
        """A URL of one node: the cluster client discovers the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def running(self) -> bool:
        return any(n.pid() is not None for n in self.nodes)

    def info(self, port: int) -> dict[str, str]:
        """``CLUSTER INFO`` of one node as a dict (empty when it does not answer)."""
        text = self.cli(port, "cluster", "info")
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def topology(self, port: int | None = None) -> list[ClusterNode]:
        """The cluster as one node (``port``, else the first that answers) sees it."""
        for p in [port] if port is not None else self.ports:
            text = self.cli(p, "cluster", "nodes")
            if text:
                return [_cluster_node(line) for line in text.splitlines() if line.strip()]
        return []

    def primary_for(self, key: str) -> int:
        """The port of the primary that serves ``key``'s slot now."""
        from redis.crc import key_slot

        slot = key_slot(key.encode())  # CLUSTER KEYSLOT's hash, here: any node may be down
        for n in self.topology():
            if n.primary and n.serves(slot) and self.node(n.port).pid() is not None:
                return n.port
        raise StackError(f"no live primary serves slot {slot} of {key!r}")

    def healthy(self) -> bool:
        """Every node is up and sees ``cluster_state:ok`` with all nodes known, and every
        primary has a replica attached (so that a failover can happen)."""
        if any(n.pid() is None for n in self.nodes):
            return False
        for port in self.ports:
            info = self.info(port)
            if info.get("cluster_state") != "ok":
                return False
            if info.get("cluster_known_nodes") != str(len(self.ports)):
                return False
        topo = self.topology()
        primaries = {n.id for n in topo if n.primary and n.slots}
        followed = {n.primary_id for n in topo if not n.primary}
        return len(primaries) == len(self.ports) // 2 and primaries <= followed

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return
            time.sleep(0.2)
        raise StackError(
            f"the Redis Cluster on ports {self.ports[0]}-{self.ports[-1]} did not reach "
            f"cluster_state:ok within {timeout:.0f}s; see the logs under "
            f"{self.dir / 'redis-cluster'}"
        )

    def start(self, timeout: float = 60.0) -> None:
        """Start every node (reusing running ones), create the cluster if it was never created,
        and return once it is healthy (:meth:`healthy`)."""
        started: list[RedisServer] = []
        try:
            for n in self.nodes:
                if not n.running():
                    n.start()
                    started.append(n)
            if self.info(self.ports[0]).get("cluster_slots_assigned") == "0":
                self._create()
            self.wait_healthy(timeout)
        except StackError:
            for n in started:
                n.stop()
            raise

    def _create(self) -> None:
        cli = shutil.which("redis-cli")
        assert cli is not None  # checked by _redis_cli already
        result = subprocess.run(
            [cli, *self.cli_options, "--cluster", "create",
             *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if result.returncode != 0:
            raise StackError(f"redis-cli --cluster create failed:\n{result.stdout}{result.stderr}")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def _cluster_node(line: str) -> ClusterNode:
    """One line of ``CLUSTER NODES``: ``id ip:port@bus flags primary-id ping pong epoch link
    slot-ranges...``."""
    parts = line.split()
    port = int(parts[1].split("@", 1)[0].rsplit(":", 1)[1])
    flags = parts[2].split(",")
    slots = []
    for item in parts[8:]:
        if item.startswith("["):  # a slot being migrated or imported
            continue
        lo, _, hi = item.partition("-")
        slots.append((int(lo), int(hi or lo)))
    return ClusterNode(
        id=parts[0], port=port, primary="master" in flags,
        primary_id=None if parts[3] == "-" else parts[3], slots=tuple(slots),
    )  # fmt: skip


# --- topics ------------------------------------------------------------------------------------


def create_topics(bootstrap: str, topics: Mapping[str, int], timeout: float = 30.0) -> list[str]:
    """Create the topics that are missing (name → partitions); return the names created."""
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    async def run() -> list[str]:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000)
        )
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [NewTopic(n, p, 1) for n, p in topics.items() if n not in existing]
            if missing:
                await admin.create_topics(missing)
            return [t.name for t in missing]
        finally:
            await admin.close()

    return asyncio.run(run())


# --- the stack as a whole (what make stack-* runs) -----------------------------------------------


class StackSettings(Settings):
    """Where the local stack lives and listens (``EVENTCAST_STACK_DIR``, ``EVENTCAST_KAFKA_PORT``,
    ``EVENTCAST_REDIS_PORT``; the test suite runs its own stack on free ports this way), and
    whether its Redis is a Redis Cluster (``EVENTCAST_REDIS_CLUSTER=1``, six nodes from
    ``EVENTCAST_REDIS_CLUSTER_PORT`` on)."""

    stack_dir: Path = REPO / ".stack"
    kafka_port: Annotated[int, Field(ge=1, le=65535)] = 9092
    redis_port: Annotated[int, Field(ge=1, le=65535)] = 6379
    redis_cluster: bool = False
    redis_cluster_port: Annotated[int, Field(ge=1, le=65530)] = 7000


@dataclass
class Stack:
    """Kafka and either the single Redis or (``use_cluster``) the Redis Cluster."""

    dir: Path
    kafka: KafkaServer
    redis: RedisServer
    cluster: RedisClusterServers
    use_cluster: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Stack:
        s = settings_from_environment(StackSettings, environ)
        return cls(
            dir=s.stack_dir,
            kafka=KafkaServer(s.stack_dir, port=s.kafka_port),
            redis=RedisServer(s.stack_dir, port=s.redis_port),
            cluster=RedisClusterServers(
                s.stack_dir, ports=tuple(range(s.redis_cluster_port, s.redis_cluster_port + 6))
            ),
            use_cluster=s.redis_cluster,
        )

    def up(self, topics: Mapping[str, int] | None = DEFAULT_TOPICS) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        redis = self.cluster if self.use_cluster else self.redis
        redis.start()
        try:
            self.kafka.start()
        except StackError:
            redis.stop()
            raise
        if topics:
            create_topics(self.kafka.bootstrap, topics)

    def down(self) -> None:
        """Stop everything this stack runs (the cluster too, whether or not it was asked for)."""
        self.kafka.stop()
        self.redis.stop()
        self.cluster.stop()

    def status(self) -> list[str]:
        services: list[tuple[str, _ManagedProcess, str]] = [
            (f"kafka (Apache Kafka {kafka_version()}, KRaft)", self.kafka, self.kafka.bootstrap),
            ("redis", self.redis, self.redis.url),
        ]
        rows = []
        for name, svc, addr in services:
            state = f"running, pid {svc.pid()}" if svc.running() else "stopped"
            rows.append(f"{name:<36} {addr:<28} {state}   logs: {svc.log_file}")
        if self.use_cluster or self.cluster.running():
            first = self.cluster.ports[0]
            state = self.cluster.info(first).get("cluster_state", "down")
            roles = {n.port: "primary" if n.primary else "replica" for n in self.cluster.topology()}
            rows.append(f"{'redis cluster':<36} {self.cluster.url:<28} cluster_state:{state}")
            for node in self.cluster.nodes:
                up = f"running, pid {node.pid()}" if node.running() else "stopped"
                role = roles.get(node.port, "?")
                rows.append(
                    f"{'  node (' + role + ')':<36} {'127.0.0.1:' + str(node.port):<28} {up}   "
                    f"logs: {node.log_file}"
                )
        return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.stack", description=__doc__.split("\n")[0]
    )
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument(
        "--no-topics", action="store_true", help="up: do not create the default topics"
    )
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help="up/status: Redis is a 3-primary + 3-replica Redis Cluster on ports 7000-7005 "
        "(EVENTCAST_REDIS_CLUSTER=1 does the same; EVENTCAST_REDIS_CLUSTER_PORT moves it)",
    )
    args = parser.parse_args(argv)
    try:
        stack = Stack.from_env()
    except ConfigError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 2
    stack.use_cluster = stack.use_cluster or args.redis_cluster
    try:
        if args.action == "up":
            stack.up(None if args.no_topics else DEFAULT_TOPICS)
        elif args.action == "down":
            stack.down()
        for row in stack.status():
            print(row)
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
