"""The Apache Kafka backend: KRaft brokers from the jars of ``devstack/kafka/pom.xml``.

Maven resolves the pinned ``kafka_2.13`` and its dependencies into the local Maven cache once
and writes the classpath to ``devstack/kafka/target/``; later starts read that file and need
no network. Each node is one JVM (combined broker + controller) on loopback, with its log dirs
under the stack's temporary directory, so a node killed with SIGKILL starts again on its data.
One node is the dev stack's ``kafka``; three (replication factor 3, ``min.insync.replicas=2``)
are ``kafka-cluster``, for the failover tests.

The single node also has the listeners a production cluster has (when ``openssl`` is on PATH):
SASL_SSL with SCRAM-SHA-512 and a certificate from a CA made at start, and SASL_PLAINTEXT with
PLAIN (``KafkaBroker.secured``). The stack's own clients use the PLAINTEXT listener.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from worker.tools.devstack.broker import Broker, free_port, log_tail
from worker.tools.devstack.maven import maven, require
from worker.tools.devstack.tls import BrokerTls, make_broker_tls, openssl

PROJECT = Path(__file__).resolve().parents[3] / "devstack" / "kafka"
POM = PROJECT / "pom.xml"
LOG4J = PROJECT / "log4j2.properties"
HEAP = "-Xmx512m"  # the default 1 GB times three nodes is too much beside the tests
START_TIMEOUT_S = 120.0
RESOLVE_TIMEOUT_S = 900.0


NEEDED_BY = "the Apache Kafka dev stack"


def _require(tool: str, what: str) -> str:
    return require(
        tool, what, NEEDED_BY, " or use the default broker, EMBEDDING_WORKER_DEVSTACK_BROKER=tansu"
    )


def _cached_classpath() -> tuple[Path, str | None]:
    """The classpath file for this pom, and its content if every jar in it is still there."""
    if not POM.is_file():
        raise RuntimeError(f"the Apache Kafka dev stack needs {POM} (a source checkout)")
    digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:16]
    cached = PROJECT / "target" / f"classpath-{digest}.txt"
    if cached.is_file():
        jars = cached.read_text().strip()
        # The Maven cache may have been emptied since: then resolve again.
        if all(Path(j).is_file() for j in jars.split(os.pathsep)):
            return cached, jars
    cached.parent.mkdir(exist_ok=True)
    return cached, None


async def classpath() -> str:
    """The broker's classpath; Maven resolves it the first time (needs Maven Central)."""
    cached, jars = _cached_classpath()
    if jars is not None:
        return jars
    partial = cached.with_suffix(f".{os.getpid()}.tmp")
    await maven(
        POM,
        "dependency:build-classpath",
        f"-Dmdep.outputFile={partial}",
        doing=f"resolve the Kafka broker's jars ({POM})",
        product=partial,
        timeout_s=RESOLVE_TIMEOUT_S,
        needed_by=NEEDED_BY,
    )
    partial.replace(cached)  # atomic: parallel first runs each write a whole file
    return cached.read_text().strip()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _cluster_id() -> str:
    """What ``kafka-storage random-uuid`` prints: 16 random bytes, URL-safe base64, not
    starting with "-" (Kafka redraws those too: a command line would take them for a flag)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


@dataclass(frozen=True)
class Secured:
    """The secured listeners of the single node, and a user that may use them."""

    sasl_ssl: str  # host:port, SCRAM-SHA-512 over TLS
    sasl_plaintext: str  # host:port, PLAIN
    cafile: Path  # the CA that signed the broker's certificate
    username: str
    scram_password: str
    plain_password: str

    def client_settings(self, protocol: str) -> dict[str, Any]:
        """The worker's ``kafka`` settings for ``SASL_SSL`` or ``SASL_PLAINTEXT``."""
        if protocol == "SASL_SSL":
            return {
                "bootstrap_servers": self.sasl_ssl,
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": self.username,
                "sasl_password": self.scram_password,
                "ssl_cafile": str(self.cafile),
            }
        assert protocol == "SASL_PLAINTEXT", protocol
        return {
            "bootstrap_servers": self.sasl_plaintext,
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "PLAIN",
            "sasl_username": self.username,
            "sasl_password": self.plain_password,
        }


class KafkaNode:
    """One combined broker + controller JVM; it keeps its ports and log dirs across restarts."""

    def __init__(self, node_id: int, root: Path) -> None:
        self.node_id = node_id
        self.port = free_port()
        self.controller_port = free_port()
        self.dir = root / f"kafka-{node_id}"
        self.log_path = self.dir / "server.log"
        self.config = self.dir / "server.properties"
        self.process: subprocess.Popen[bytes] | None = None
        self.secured: Secured | None = None
        self.tls: BrokerTls | None = None
        self.scram: list[str] = []  # ``kafka-storage format --add-scram`` arguments

    def secure(self, tls: BrokerTls) -> Secured:
        """Add a SASL_SSL (SCRAM-SHA-512) and a SASL_PLAINTEXT (PLAIN) listener."""
        self.tls = tls
        self.secured = Secured(
            sasl_ssl=f"127.0.0.1:{free_port()}",
            sasl_plaintext=f"127.0.0.1:{free_port()}",
            cafile=tls.cafile,
            username="worker",
            scram_password=secrets.token_urlsafe(12),
            plain_password=secrets.token_urlsafe(12),
        )
        s = self.secured
        self.scram = [f"--add-scram=SCRAM-SHA-512=[name={s.username},password={s.scram_password}]"]
        return s

    def _security_props(self) -> dict[str, object]:
        s, tls = self.secured, self.tls
        if s is None or tls is None:
            return {}
        ssl_name, plain_name = "listener.name.sasl_ssl.", "listener.name.sasl_plaintext."
        return {
            "sasl.enabled.mechanisms": "SCRAM-SHA-512,PLAIN",
            ssl_name + "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            ssl_name + "scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            ssl_name + "ssl.keystore.type": "PKCS12",
            ssl_name + "ssl.keystore.location": tls.keystore,
            ssl_name + "ssl.keystore.password": tls.password,
            ssl_name + "ssl.key.password": tls.password,
            plain_name + "sasl.enabled.mechanisms": "PLAIN",
            plain_name + "plain.sasl.jaas.config": (
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'user_{s.username}="{s.plain_password}";'
            ),
        }

    def write_config(self, voters: str, replication: int) -> None:
        min_isr = min(2, replication)
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        protocols = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
        if self.secured is not None:
            listeners += [
                f"SASL_SSL://{self.secured.sasl_ssl}",
                f"SASL_PLAINTEXT://{self.secured.sasl_plaintext}",
            ]
            protocols += ",SASL_SSL:SASL_SSL,SASL_PLAINTEXT:SASL_PLAINTEXT"
        props = {
            "process.roles": "broker,controller",
            "node.id": self.node_id,
            "controller.quorum.voters": voters,
            "listeners": ",".join([*listeners, f"CONTROLLER://127.0.0.1:{self.controller_port}"]),
            "advertised.listeners": ",".join(listeners),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": protocols,
            "log.dirs": self.dir / "data",
            # Like a production cluster: topics exist because someone created them.
            "auto.create.topics.enable": "false",
            "default.replication.factor": replication,
            "min.insync.replicas": min_isr,
            "offsets.topic.replication.factor": replication,
            "transaction.state.log.replication.factor": replication,
            "transaction.state.log.min.isr": min_isr,
            "share.coordinator.state.topic.replication.factor": replication,
            "share.coordinator.state.topic.min.isr": min_isr,
            # Sizing for a test machine, not workarounds: Kafka's own sample config also sets
            # the rebalance delay to 0, and 50 offsets partitions would only slow the start.
            "group.initial.rebalance.delay.ms": 0,
            "offsets.topic.num.partitions": 4,
            # The log cleaner looks for work every second (default 15 s): a compacted topic
            # is cleaned within a test's patience.
            "log.cleaner.backoff.ms": 1000,
            **self._security_props(),
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))

    def _java(self, jars: str, main: str, *args: str) -> list[str]:
        return [
            _require("java", "Java 17 or newer"),
            HEAP,
            "-XX:+UseSerialGC",  # one GC thread: a small heap on a 2-core machine
            f"-Dlog4j2.configurationFile={LOG4J}",
            "-cp",
            jars,
            main,
            *args,
        ]

    async def format(self, jars: str, cluster_id: str) -> None:
        """``kafka-storage format``: the log dirs get the cluster id and this node's id."""
        proc = await asyncio.create_subprocess_exec(
            *self._java(
                jars,
                "kafka.tools.StorageTool",
                "format",
                f"--cluster-id={cluster_id}",
                f"--config={self.config}",
                *self.scram,
            ),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(
                f"kafka-storage format failed for node {self.node_id}:\n"
                + output.decode(errors="replace")[-3000:]
            )

    def launch(self, jars: str) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self._java(jars, "kafka.Kafka", str(self.config)),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def signal_and_wait(self, sig: signal.Signals, within_s: float = 60) -> None:
        if not self.running():
            return
        assert self.process is not None
        self.process.send_signal(sig)
        try:
            await asyncio.to_thread(self.process.wait, within_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            await asyncio.to_thread(self.process.wait)


class KafkaBroker(Broker):
    """``nodes`` KRaft nodes (1 or 3), all voters, replication factor ``min(nodes, 3)``."""

    def __init__(self, nodes: int = 1) -> None:
        self.name = "kafka" if nodes == 1 else "kafka-cluster"
        self.label = "Apache Kafka, " + ("one node" if nodes == 1 else f"{nodes} nodes")
        self.replication_factor = min(nodes, 3)
        self.size = nodes
        self.nodes: list[KafkaNode] = []
        self.jars = ""
        self.secured: Secured | None = None

    async def start(self, tmp: Path) -> None:
        _require("java", "Java 17 or newer")
        self.jars = await classpath()
        self.nodes = [KafkaNode(i, tmp) for i in range(1, self.size + 1)]
        if self.size == 1 and openssl() is not None:
            tls = await asyncio.to_thread(make_broker_tls, tmp / "tls")
            self.secured = self.nodes[0].secure(tls)
        # A static quorum: every node is a voter, known from the start (no --standalone).
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        for node in self.nodes:
            node.write_config(voters, self.replication_factor)
        cluster_id = _cluster_id()
        await asyncio.gather(*(n.format(self.jars, cluster_id) for n in self.nodes))
        self.bootstrap = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        for node in self.nodes:
            node.launch(self.jars)
        await self.wait_ready()
        await self._create_offsets_topic()

    async def wait_ready(self, within_s: float = START_TIMEOUT_S) -> None:
        """Until every running node accepts connections and is a registered broker.

        A node opens its client port only once it has caught up with the cluster's metadata,
        so the port, not the registration (a killed node stays registered until its session
        times out), says that a restarted node is back.
        """
        want = {n.node_id for n in self.nodes if n.running()}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        last: object = None
        while loop.time() < deadline:
            if any(not n.running() for n in self.nodes if n.node_id in want):
                break
            try:
                ports_open = all(_accepts(n.port) for n in self.nodes if n.node_id in want)
                if ports_open and want <= await self._registered():
                    return
            except Exception as exc:  # not up yet; the last error is reported
                last = exc
            await asyncio.sleep(0.2)
        tails = "\n".join(f"--- {n.log_path}\n{log_tail(n.log_path)}" for n in self.nodes)
        raise RuntimeError(f"Apache Kafka did not start (last error: {last!r}):\n{tails}")

    async def _create_offsets_topic(self) -> None:
        """Kafka creates ``__consumer_offsets`` when a group first needs a coordinator, and
        aiokafka logs an error for each try until it exists: ask once here, until it does."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            for _ in range(300):
                try:
                    await admin.find_coordinator("embedding-worker-devstack")
                    return
                except KafkaError:
                    await asyncio.sleep(0.1)
            raise RuntimeError("Apache Kafka found no group coordinator within 30 s")
        finally:
            await admin.close()

    async def _registered(self) -> set[int]:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.live_bootstrap(), request_timeout_ms=3000
        )
        await admin.start()
        try:
            cluster = await admin.describe_cluster()
            return {int(b["node_id"]) for b in cluster["brokers"]}
        finally:
            await admin.close()

    def live_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes if n.running()) or self.bootstrap

    def node(self, node_id: int) -> KafkaNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    async def kill(self, node_id: int) -> None:
        """SIGKILL: no controlled shutdown, no flush; the log dirs stay as they were."""
        await self.node(node_id).signal_and_wait(signal.SIGKILL)

    async def stop_node(self, node_id: int) -> None:
        """SIGTERM: a controlled shutdown (leadership moves away first)."""
        await self.node(node_id).signal_and_wait(signal.SIGTERM)

    async def restart(self, node_id: int) -> None:
        """Start a stopped or killed node again on the same ports and log dirs."""
        node = self.node(node_id)
        if node.running():
            raise RuntimeError(f"Kafka node {node_id} is still running")
        node.launch(self.jars)
        await self.wait_ready()

    async def stop(self) -> None:
        # The data goes with the stack: a controlled shutdown that waits for a lost quorum
        # is not worth more than a few seconds.
        await asyncio.gather(*(n.signal_and_wait(signal.SIGTERM, 5) for n in self.nodes))

    def pids(self) -> list[int]:
        return [n.process.pid for n in self.nodes if n.process is not None and n.running()]
