"""Shared fixtures: scratch directories, event files, the example flow and its reference output.

The suite runs with ``--import-mode=importlib``, so test modules do not import each other or
this file: every helper is reached through a fixture (``work`` above all).

The example flow is the one of the issue: events ``{"id", "customer", "amount"}`` keyed by
customer, a running total per customer (``reduce``), into one of three sinks:

* ``jsonl``: ``JsonLinesSink``, one line ``{"key": customer, "value": running total}`` per
  event (so every record's effect is visible in the output, and a duplicate or a loss shows);
* ``sqlite-store``: ``SQLiteTable`` in the store's own database (one transaction);
* ``sqlite-other``: ``SQLiteTable`` in another database (staged, applied once per seq).

The reference output is computed with straight Python from the events that were written.
"""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import resumeflow as rf

SINK_KINDS = ("jsonl", "sqlite-store", "sqlite-other")


@dataclass
class EventFile:
    """A JSON-lines input file and what was written to it.

    Attributes:
        path: the file.
        events: the valid events, in file order.
        bad: ``(byte offset, raw line)`` of every line that is not valid JSON.
        offsets: byte offset of each valid event's line, parallel to ``events``.
    """

    path: Path
    seed: int = 0
    customers: int = 50
    events: list[dict[str, Any]] = field(default_factory=list)
    bad: list[tuple[int, bytes]] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)

    def append(self, n: int, *, bad_every: int = 0, newline: bool = True) -> EventFile:
        """Append ``n`` events (every ``bad_every``-th line malformed); returns ``self``."""
        rng = random.Random(f"{self.seed}:{len(self.events)}")
        size = self.path.stat().st_size if self.path.exists() else 0
        chunks: list[bytes] = []
        first_id = len(self.events) + len(self.bad)
        for i in range(first_id, first_id + n):
            if bad_every and i % bad_every == bad_every - 1:
                line = b'{"id": %d, "customer": "broken' % i
                self.bad.append((size, line))
            else:
                event = {"id": i, "customer": f"c{rng.randrange(self.customers)}",
                         "amount": rng.randrange(1, 100)}
                line = json.dumps(event, separators=(",", ":")).encode()
                self.events.append(event)
                self.offsets.append(size)
            chunks.append(line + b"\n")
            size += len(line) + 1
        data = b"".join(chunks)
        if not newline:
            data = data[:-1]
        with open(self.path, "ab") as f:
            f.write(data)
        return self

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def running_totals(self) -> list[dict[str, Any]]:
        """Reference output of the ``jsonl`` sink: one running total per event."""
        totals: dict[str, int] = {}
        out = []
        for e in self.events:
            totals[e["customer"]] = totals.get(e["customer"], 0) + e["amount"]
            out.append({"key": e["customer"], "value": totals[e["customer"]]})
        return out

    def totals(self) -> dict[str, int]:
        """Reference output of the table sinks: the final total per customer."""
        totals: dict[str, int] = {}
        for e in self.events:
            totals[e["customer"]] = totals.get(e["customer"], 0) + e["amount"]
        return totals


def read_jsonl(path: Path) -> list[Any]:
    """Every line of a JSON-lines file, decoded; ``[]`` when the file does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def read_table(path: Path, table: str = "totals") -> dict[Any, Any]:
    """``{key: value}`` of an ``SQLiteTable``; ``{}`` when the table does not exist yet."""
    if not path.exists():
        return {}
    db = sqlite3.connect(path)
    try:
        return {k: json.loads(v) for k, v in db.execute(f"SELECT key, value FROM {table}")}
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


_PIPELINE = '''\
"""Example flow written by the test suite."""
import time

import resumeflow as rf

EVENTS = {events!r}
SINK = {sink!r}
STORE = {store!r}
OUT = {out!r}
OTHER_DB = {other_db!r}
POISON_IDS = {poison_ids!r}
PACE_EVERY = {pace_every!r}


def check(event):
    if event["id"] in POISON_IDS:
        raise ValueError(f"poison event {{event['id']}}")
    if PACE_EVERY and event["id"] % PACE_EVERY == 0:
        time.sleep(0.01)  # keeps a run long enough for kills to land mid-way on any machine
    return event


def flow():
    f = rf.Flow({name!r})
    stream = f.source(rf.sources.JsonLines(EVENTS))
    if POISON_IDS or PACE_EVERY:
        stream = stream.map(check)
    stream = (stream.key_by(lambda e: e["customer"])
                    .reduce(lambda total, e: total + e["amount"], initial=0))
    if SINK == "jsonl":
        stream.sink(rf.sinks.JsonLinesSink(OUT))
    elif SINK == "sqlite-store":
        stream.sink(rf.sinks.SQLiteTable(STORE, table="totals"))
    else:
        stream.sink(rf.sinks.SQLiteTable(OTHER_DB, table="totals"))
    return f
'''

_REPLAYING = re.compile(r"replaying (\d+)")
_REPLAYED = re.compile(r"replayed (\d+)")


class Work:
    """A scratch directory holding one pipeline: its input, store and outputs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = root / "store.db"
        self.out = root / "out.jsonl"
        self.other_db = root / "sink.db"

    # -- inputs ----------------------------------------------------------------------------

    def events(self, n: int, *, name: str = "events.jsonl", seed: int = 0,
               customers: int = 50, bad_every: int = 0) -> EventFile:
        """Write a fresh event file of ``n`` lines."""
        path = self.root / name
        path.unlink(missing_ok=True)
        return EventFile(path, seed=seed, customers=customers).append(n, bad_every=bad_every)

    # -- the example flow ------------------------------------------------------------------

    def sink(self, kind: str) -> Any:
        if kind == "jsonl":
            return rf.sinks.JsonLinesSink(self.out)
        if kind == "sqlite-store":
            return rf.sinks.SQLiteTable(self.store, table="totals")
        if kind == "sqlite-other":
            return rf.sinks.SQLiteTable(self.other_db, table="totals")
        raise ValueError(kind)

    def flow(self, events: EventFile | Path, kind: str = "jsonl", *, name: str = "orders",
             check: Callable[[Any], Any] | None = None) -> rf.Flow:
        """The example flow, in process; ``check`` runs as a ``map`` before ``key_by``."""
        path = events.path if isinstance(events, EventFile) else events
        flow = rf.Flow(name)
        stream = flow.source(rf.sources.JsonLines(path))
        if check is not None:
            stream = stream.map(check)
        (stream.key_by(lambda e: e["customer"])
               .reduce(lambda total, e: total + e["amount"], initial=0)
               .sink(self.sink(kind)))
        return flow

    def pipeline(self, events: EventFile, kind: str = "jsonl", *, name: str = "orders",
                 poison_ids: tuple[int, ...] = (), pace_every: int = 0) -> str:
        """Write the example flow to ``pipeline.py``; returns the ``FILE.py:ATTR`` spec.

        ``poison_ids``: events whose processing always raises. ``pace_every``: sleep 10 ms at
        every event whose id is a multiple of it (a run then lasts a known minimum time).
        """
        path = self.root / "pipeline.py"
        path.write_text(_PIPELINE.format(
            events=str(events.path), sink=kind, store=str(self.store), out=str(self.out),
            other_db=str(self.other_db), poison_ids=set(poison_ids) or set(), name=name,
            pace_every=pace_every))
        return f"{path}:flow"

    def output(self, kind: str) -> Any:
        """What the sink of the example flow holds now."""
        if kind == "jsonl":
            return read_jsonl(self.out)
        return read_table(self.store if kind == "sqlite-store" else self.other_db)

    @staticmethod
    def expected(events: EventFile, kind: str) -> Any:
        """The fault-free reference output of the example flow for ``kind``."""
        return events.running_totals() if kind == "jsonl" else events.totals()

    def dead_letters(self, partition: str = "0") -> list[dict[str, Any]]:
        """Dead letters of a partition, from the default file next to the store."""
        return read_jsonl(Path(f"{self.store}.deadletters") / f"{partition}.jsonl")

    # -- real processes --------------------------------------------------------------------

    def env(self, crash_at: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "RESUMEFLOW_CRASH_AT"}
        if crash_at:
            env["RESUMEFLOW_CRASH_AT"] = crash_at
        return env

    def cli_args(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "resumeflow.cli", *args]

    def cli(self, *args: str, crash_at: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``resumeflow ARGS`` to its end in a subprocess."""
        return subprocess.run(self.cli_args(*args), cwd=self.root, env=self.env(crash_at),
                              capture_output=True, text=True, timeout=timeout, check=False)

    def run_args(self, spec: str, *extra: str, replay_max_events: int = 2000) -> list[str]:
        return ["run", spec, "--store", str(self.store), "--no-progress",
                "--replay-max-events", str(replay_max_events), *extra]

    @staticmethod
    def replayed(stderr: str) -> list[int]:
        """Records replayed, as told by the recovery lines and the run summary line."""
        return [int(n) for n in _REPLAYING.findall(stderr) + _REPLAYED.findall(stderr)]


@pytest.fixture
def work(tmp_path: Path) -> Work:
    """A scratch directory for one pipeline."""
    return Work(tmp_path)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[rf.SQLiteStore]:
    """A fresh SQLite store, closed after the test."""
    s = rf.SQLiteStore(tmp_path / "unit.db", keep_checkpoints=3)
    yield s
    s.close()


# ---- Kafka broker: BEGIN (real single-node KRaft broker, see resumeflow.testing._kafka_broker) --


def _service_unavailable(what: str, exc: BaseException) -> None:
    """A real service the test needs cannot run: a failure under CI=true, else a skip."""
    message = f"{what} cannot start: {exc}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Kafka broker on 127.0.0.1, one per test session, with a fresh data directory.

    Tests may ``stop()``/``start()`` it (same ports and data); it is running again when the
    fixture hands it to the next test. Yields a ``KafkaBroker``; ``.bootstrap`` is its address.
    """
    try:
        import confluent_kafka  # noqa: F401 - the tests' client

        from resumeflow.testing._kafka_broker import KafkaBroker
        broker = KafkaBroker(data_dir=tmp_path_factory.mktemp("kafka"))
        broker.start()
    except Exception as exc:  # ImportError, BrokerStartError, OSError
        _service_unavailable("the Kafka broker", exc)
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def kafka(kafka_broker: Any) -> Any:
    """The session's Kafka broker, started again if an earlier test left it stopped."""
    kafka_broker.start()
    return kafka_broker


# ---- Kafka broker: END ---------------------------------------------------------------------


# -- PostgreSQL (issue 5): a private server for the session, a fresh database per test -------
# Started by resumeflow.testing._pg_server from Debian's binaries on 127.0.0.1 and a free port.
# When it cannot start: a failure under CI=true, else a skip that says why.


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A PostgreSQL server for the whole session (stopped and removed at its end)."""
    try:
        import psycopg  # noqa: F401  (the postgres extra)

        from resumeflow.testing._pg_server import PostgresServer, PostgresUnavailable
    except ImportError as exc:
        _postgres_missing(f"the postgres extra is not installed ({exc}); "
                          "pip install -e '.[dev,postgres]'")
    try:
        server = PostgresServer()
    except (PostgresUnavailable, OSError, subprocess.SubprocessError) as exc:
        _postgres_missing(f"PostgreSQL cannot start here: {exc}")
    try:
        yield server
    finally:
        server.close()


def _postgres_missing(reason: str) -> Any:
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


_pg_databases = iter(range(1, 1_000_000))


@pytest.fixture
def postgres_dsn(postgres_server: Any) -> str:
    """The DSN of a fresh, empty database on the session's PostgreSQL server."""
    if not postgres_server.running:
        postgres_server.start()  # a test that stopped it must not break the next one
    return str(postgres_server.create_database(f"t{next(_pg_databases)}"))
