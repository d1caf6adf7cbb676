"""A real single-node Kafka broker (KRaft, broker and controller in one JVM) for tests.

The broker runs from Apache Kafka's own jars on Maven Central; nothing is mocked. ``fetch()``
resolves them once with Maven into a cache directory (a later call finds them there and does
nothing, so runs after the first are offline). ``KafkaBroker`` renders a configuration into a
fresh data directory, formats it with a random cluster id, and starts ``kafka.Kafka`` in a
separate JVM bound to 127.0.0.1 on free ports::

    with KafkaBroker() as broker:
        create_topic(broker.bootstrap, "orders", partitions=6)

``stop()`` and ``start()`` keep the data directory and the ports, so a test can restart the
broker mid-run and find its topics, committed transactions and group offsets again. A broker
that fails to start raises ``BrokerStartError`` with the tail of its log. The JVM is killed when
the interpreter exits, and also when the thread that started it dies abruptly if that thread is
the main thread (Linux parent-death signal), so a SIGKILLed test run leaves no broker behind.

From a shell, ``python -m resumeflow.testing._kafka_broker fetch`` fills the cache (CI runs it
before the tests) and ``... run`` starts a broker and prints its bootstrap address until Ctrl-C.

Environment:
    RESUMEFLOW_KAFKA_LIB: where the jars are cached (default
        ``~/.cache/resumeflow/kafka-<version>/lib``).
    RESUMEFLOW_KAFKA_JAVA: the ``java`` executable (default: ``java`` on PATH).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "KAFKA_VERSION",
    "BrokerStartError",
    "KafkaBroker",
    "TopicMessage",
    "create_topic",
    "fetch",
    "lib_dir",
    "produce_json",
    "read_topic",
]

KAFKA_VERSION = "4.1.1"
"""The Kafka release the tests run against."""

LOG4J_VERSION = "2.24.3"
"""The log4j 2 release Kafka 4.1.1 is built with (its binary distribution ships it)."""

READY_LINE = "Kafka Server started"
"""What ``kafka.server.KafkaRaftServer`` logs once the broker is unfenced and serving."""

# The broker's classpath. kafka_2.13's POM brings the broker and its runtime dependencies,
# but not a logging backend: Kafka's binary distribution adds log4j-core and the SLF4J 1.7
# binding itself, so without them here the broker would log nothing (and never print the
# line start() waits for).
_POM = """\
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 https://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>io.resumeflow.testing</groupId>
  <artifactId>kafka-broker-classpath</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
      <scope>runtime</scope>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
      <scope>runtime</scope>
    </dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin>
        <groupId>org.apache.maven.plugins</groupId>
        <artifactId>maven-dependency-plugin</artifactId>
        <version>3.6.1</version>
        <configuration>
          <outputDirectory>${{resumeflow.lib}}</outputDirectory>
          <includeScope>runtime</includeScope>
        </configuration>
      </plugin>
    </plugins>
  </build>
</project>
"""

# Warnings and errors only, plus the one INFO line start() waits for.
_LOG4J2 = """\
status = warn
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_OUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.console.ref = console
logger.ready.name = kafka.server.KafkaRaftServer
logger.ready.level = INFO
"""

# One node that is both broker and controller, with a static one-voter quorum (so formatting
# needs no --standalone). Replication factors of the internal topics must be 1 on one node.
# One partition for the offsets and transaction logs and few threads make it start fast.
_SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={log_dir}
num.partitions=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
num.network.threads=2
num.io.threads=2
background.threads=2
num.recovery.threads.per.data.dir=1
"""

_JVM_FLAGS = (
    "-Xms64m", "-Xmx{heap}", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
    "-Xshare:auto", "-Djava.awt.headless=true",
)


class BrokerStartError(RuntimeError):
    """The broker could not be fetched, formatted or started; the message says why."""


def lib_dir() -> Path:
    """Where the broker's jars are cached (``RESUMEFLOW_KAFKA_LIB`` overrides the default)."""
    override = os.environ.get("RESUMEFLOW_KAFKA_LIB")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "resumeflow" / f"kafka-{KAFKA_VERSION}" / "lib"


_COMPLETE = ".complete"


def fetch(lib: Path | None = None, *, timeout_s: float = 900.0) -> Path:
    """Resolve the broker's jars into ``lib`` (default ``lib_dir()``) unless already there.

    Idempotent and safe to call from concurrent processes (a file lock serializes them): the
    jars land in a temporary directory that is renamed into place and then marked complete, so
    an interrupted fetch leaves nothing that a later one would take for a finished cache.
    Needs ``mvn`` and Maven Central (or a Maven repository with the artifacts) the first time.
    """
    lib = (lib or lib_dir()).expanduser().resolve()
    if (lib / _COMPLETE).exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with open(lib.parent / f".{lib.name}.lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if (lib / _COMPLETE).exists():
            return lib
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerStartError(
                "Maven (mvn) is not on PATH; install it (Debian: apt-get install maven) to fetch "
                f"Kafka {KAFKA_VERSION}, or point RESUMEFLOW_KAFKA_LIB at a directory of its jars"
            )
        with tempfile.TemporaryDirectory(dir=lib.parent, prefix=".fetch-") as tmp:
            work = Path(tmp)
            staged = work / "lib"
            (work / "pom.xml").write_text(_POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION))
            cmd = [mvn, "-B", "-q", "-f", str(work / "pom.xml"),
                   f"-Dresumeflow.lib={staged}", "dependency:copy-dependencies"]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                      check=False)
            except subprocess.TimeoutExpired as exc:
                raise BrokerStartError(
                    f"fetching Kafka {KAFKA_VERSION} with Maven took over {timeout_s:.0f} s; "
                    "check the network access to Maven Central"
                ) from exc
            jars = list(staged.glob("*.jar")) if staged.is_dir() else []
            if done.returncode != 0 or not jars:
                tail = (done.stdout + done.stderr).strip().splitlines()[-20:]
                raise BrokerStartError(
                    f"fetching Kafka {KAFKA_VERSION} with Maven failed (exit {done.returncode}); "
                    "check the network access to Maven Central. Maven said:\n" + "\n".join(tail)
                )
            (staged / _COMPLETE).write_text(f"kafka {KAFKA_VERSION}\n")
            if lib.exists():
                shutil.rmtree(lib)
            staged.rename(lib)
    return lib


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cluster_id() -> str:
    """A Kafka UUID: base64url of 16 random bytes without padding, not starting with '-'."""
    while True:
        uid = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        if not uid.startswith("-"):
            return uid


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the thread that started us dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_live: weakref.WeakSet[KafkaBroker] = weakref.WeakSet()


@atexit.register
def _kill_live_brokers() -> None:
    for broker in list(_live):
        broker.kill()


class KafkaBroker:
    """A single-node KRaft Kafka broker in its own JVM, on 127.0.0.1.

    Args:
        data_dir: where the configuration, the log segments and ``broker.log`` go. Default: a
            fresh temporary directory, removed by ``close()``. A given directory is kept.
        lib: the jars (default: ``fetch()``'s cache; fetched on first start if missing).
        heap: the JVM's maximum heap.
        start_timeout_s: how long ``start()`` waits for the broker to serve.
        overrides: extra ``server.properties`` entries (e.g. transaction timeouts).
    """

    def __init__(self, *, data_dir: Path | None = None, lib: Path | None = None,
                 heap: str = "384m", start_timeout_s: float = 90.0,
                 overrides: Mapping[str, str] | None = None) -> None:
        self._own_dir = data_dir is None
        self.root = Path(data_dir) if data_dir is not None else Path(
            tempfile.mkdtemp(prefix="resumeflow-kafka-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self._lib = lib
        self.heap = heap
        self.start_timeout_s = start_timeout_s
        self.overrides = dict(overrides or {})
        self.port = 0
        self.controller_port = 0
        self.log_path = self.root / "broker.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def bootstrap(self) -> str:
        """``host:port`` for clients' ``bootstrap.servers``."""
        if not self.port:
            raise BrokerStartError("the broker was never started; call start() first")
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> KafkaBroker:
        """Start the broker (formatting its data directory the first time); returns ``self``.

        Blocks until the broker logs that it serves, or raises ``BrokerStartError`` with the
        tail of its log after ``start_timeout_s``. A no-op when it already runs.
        """
        with self._lock:
            if self.running:
                return self
            lib = fetch(self._lib)
            if not (self.root / "data" / "meta.properties").exists():
                self._configure()
                self._format(lib)
            self._launch(lib)
            _live.add(self)
            return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Shut the broker down cleanly (SIGTERM, then SIGKILL after ``timeout_s``)."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is None or proc.poll() is not None:
                return
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        """Kill the JVM at once (SIGKILL), as a crash would; ``start()`` recovers its data."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """``stop()`` then ``start()``: same data, same ports."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the broker and remove its data directory if this object made it."""
        self.stop()
        _live.discard(self)
        if self._own_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> KafkaBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the broker's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no broker log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- steps -----------------------------------------------------------------------------

    def _configure(self) -> None:
        self.port, self.controller_port = _free_port(), _free_port()
        while self.controller_port == self.port:
            self.controller_port = _free_port()
        data = self.root / "data"
        if data.exists():
            shutil.rmtree(data)
        text = _SERVER_PROPERTIES.format(port=self.port, controller_port=self.controller_port,
                                         log_dir=data)
        text += "".join(f"{k}={v}\n" for k, v in self.overrides.items())
        (self.root / "server.properties").write_text(text)
        (self.root / "log4j2.properties").write_text(_LOG4J2)

    def _java(self, lib: Path, main: str, *args: str) -> list[str]:
        java = os.environ.get("RESUMEFLOW_KAFKA_JAVA") or shutil.which("java")
        if not java:
            raise BrokerStartError("java is not on PATH; install a JDK (17 or newer) to run "
                                   "Kafka, or set RESUMEFLOW_KAFKA_JAVA")
        flags = [f.format(heap=self.heap) for f in _JVM_FLAGS]
        return [java, *flags, f"-Dlog4j2.configurationFile={self.root / 'log4j2.properties'}",
                "-cp", f"{lib}/*", main, *args]

    def _format(self, lib: Path) -> None:
        cmd = self._java(lib, "kafka.tools.StorageTool", "format",
                         f"--cluster-id={_cluster_id()}",
                         "-c", str(self.root / "server.properties"))
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise BrokerStartError(
                f"formatting the Kafka data directory {self.root / 'data'} failed "
                f"(exit {done.returncode}):\n{(done.stdout + done.stderr).strip()[-3000:]}"
            )

    def _launch(self, lib: Path) -> None:
        cmd = self._java(lib, "kafka.Kafka", str(self.root / "server.properties"))
        start_at = self.log_path.stat().st_size if self.log_path.exists() else 0
        main_thread = threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.root, preexec_fn=_die_with_parent if main_thread else None)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self._ready(start_at):
                return
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise BrokerStartError(
                    f"the Kafka broker exited with code {code} while starting; its log "
                    f"({self.log_path}) ends with:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerStartError(
                    f"the Kafka broker did not start within {self.start_timeout_s:.0f} s; "
                    f"its log ({self.log_path}) ends with:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _ready(self, start_at: int) -> bool:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start_at)
                return READY_LINE.encode() in f.read()
        except OSError:
            return False


# -- helpers for tests -------------------------------------------------------------------------


def create_topic(bootstrap: str, name: str, partitions: int = 1, *,
                 config: Mapping[str, str] | None = None, timeout_s: float = 30.0) -> None:
    """Create topic ``name`` with ``partitions`` partitions (replication factor 1)."""
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=partitions, replication_factor=1,
                  config=dict(config or {}))], operation_timeout=timeout_s)
    futures[name].result(timeout=timeout_s)


def produce_json(bootstrap: str, topic: str, records: Iterable[Any], *,
                 key: Any = None, partition: int | None = None,
                 timeout_s: float = 30.0) -> int:
    """Produce each record as a JSON value; ``(key, value)`` pairs when ``key`` is ``"pairs"``.

    Returns how many were produced; raises ``RuntimeError`` if any delivery failed.
    """
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    errors: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    count = 0
    for record in records:
        k, v = record if key == "pairs" else (key, record)
        extra: dict[str, Any] = {} if partition is None else {"partition": partition}
        producer.produce(topic, value=json.dumps(v).encode(),
                         key=None if k is None else json.dumps(k).encode(),
                         on_delivery=on_delivery, **extra)
        producer.poll(0)
        count += 1
    left = producer.flush(timeout_s)
    if left or errors:
        raise RuntimeError(f"{left} records undelivered, errors: {errors[:5]}")
    return count


@dataclass(frozen=True)
class TopicMessage:
    """One message read back from a topic; ``key`` and ``value`` are decoded JSON."""

    partition: int
    offset: int
    key: Any
    value: Any


def read_topic(bootstrap: str, topic: str, *, isolation: str = "read_committed",
               timeout_s: float = 30.0) -> list[TopicMessage]:
    """Every message of ``topic`` up to its end (the last stable offset under read_committed),
    ordered by partition then offset."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"resumeflow-read-{secrets.token_hex(4)}",
        "isolation.level": isolation, "enable.auto.commit": False,
        "enable.partition.eof": True, "auto.offset.reset": "earliest",
    })
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics[topic]
        if meta.error is not None:
            raise RuntimeError(f"topic {topic!r}: {meta.error}")
        parts = sorted(meta.partitions)
        consumer.assign([TopicPartition(topic, p, -2) for p in parts])  # -2: beginning
        pending, out = set(parts), []
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic!r}: partitions {sorted(pending)} did not "
                                   f"reach their end within {timeout_s} s")
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(msg.partition())
                    continue
                raise RuntimeError(f"reading {topic!r}: {err}")
            raw_key, raw_value = msg.key(), msg.value()
            out.append(TopicMessage(
                partition=msg.partition() or 0, offset=msg.offset() or 0,
                key=None if raw_key is None else json.loads(raw_key),
                value=None if raw_value is None else json.loads(raw_value)))
        out.sort(key=lambda m: (m.partition, m.offset))
        return out
    finally:
        consumer.close()


def _main(argv: list[str]) -> int:
    usage = f"usage: python -m {__name__} fetch | run"
    if len(argv) != 1 or argv[0] not in ("fetch", "run"):
        print(usage, file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        lib = fetch()
    except BrokerStartError as exc:
        print(exc, file=sys.stderr)
        return 1
    if argv[0] == "fetch":
        print(f"Kafka {KAFKA_VERSION} jars in {lib} ({time.monotonic() - started:.1f} s)")
        return 0
    with KafkaBroker() as broker:
        print(f"Kafka {KAFKA_VERSION} serving on {broker.bootstrap} "
              f"(data in {broker.root}); Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while broker.running:
                time.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
