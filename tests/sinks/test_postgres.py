"""PostgresTable against a real PostgreSQL server: the sink contract inside the store's
transaction, fencing of its rows, and configuration checked at start."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("CI") != "true":  # under CI a missing extra fails the import below
    pytest.importorskip("psycopg", reason="the postgres extra is not installed: "
                        "pip install -e '.[dev,postgres]'")

import psycopg

from resumeflow.checkpoint import GENESIS_DIGEST, make_record
from resumeflow.checkpoint._postgres import PostgresStore
from resumeflow.errors import ConfigurationError, FencedError
from resumeflow.sinks import PostgresTable, SinkContext
from resumeflow.testing import SinkFixture, check_sink


def _rows(dsn: str, table: str = "totals") -> list[Any]:
    with psycopg.connect(dsn) as conn:
        try:
            return [[k, v] for k, v in conn.execute(f"SELECT key, value FROM {table}")]
        except psycopg.errors.UndefinedTable:
            return []


def _ctx(*, keyed: bool = True, store_path: Path | None = None) -> SinkContext:
    return SinkContext(sink_id="out", task="f:s:0", partition="0", partitions=1, keyed=keyed,
                       guarantee="exactly-once", store_path=store_path)


def test_postgres_table_passes_check_sink(postgres_dsn: str) -> None:
    """PostgresTable keeps the exactly-once sink contract with a PostgresStore of its database."""
    schemas = iter(range(100))
    tables = iter(range(100))

    def make() -> SinkFixture:
        table = f"totals_{next(tables)}"
        return SinkFixture(sink=PostgresTable(postgres_dsn, table=table),
                           read=lambda: _rows(postgres_dsn, table),
                           store=PostgresStore(postgres_dsn, schema=f"s{next(schemas)}"))
    check_sink(make)


def test_rows_of_a_fenced_commit_never_land(postgres_dsn: str) -> None:
    """A stale owner's commit is refused and none of its rows reach the table."""
    sink = PostgresTable(postgres_dsn, table="app.totals")
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app")
    store = PostgresStore(postgres_dsn)
    try:
        old = store.open_task("f:s:0")
        writer = sink.open(_ctx())
        store.open_task("f:s:0")  # a new owner takes the task
        writer.buffer.extend([("a", 1), ("b", 2)])
        pre = writer.precommit(1)
        record = make_record(task="f:s:0", epoch=old.epoch, seq=1, positions={}, sink_txn={},
                             inflight=[], created_at=0.0, stats={}, prev_digest=GENESIS_DIGEST)
        assert pre.in_store is not None
        with pytest.raises(FencedError):
            store.commit(old, record, [], [], [], [pre.in_store])
        assert _rows(postgres_dsn, "app.totals") == []
    finally:
        store.close()


def test_non_string_keys_and_values_round_trip(postgres_dsn: str) -> None:
    """Numeric and composite keys are stored as JSON text and values as jsonb."""
    sink = PostgresTable(postgres_dsn, table="totals")
    store = PostgresStore(postgres_dsn)
    try:
        opened = store.open_task("f:s:0")
        writer = sink.open(_ctx())
        writer.buffer.extend([(7, {"total": 1}), (["a", 1], [1, 2]), ("s", "text"), (7, 3)])
        pre = writer.precommit(1)
        assert pre.in_store is not None
        record = make_record(task="f:s:0", epoch=opened.epoch, seq=1, positions={},
                             sink_txn={}, inflight=[], created_at=0.0, stats={},
                             prev_digest=GENESIS_DIGEST)
        store.commit(opened, record, [], [], [], [pre.in_store])
        assert sorted(map(repr, _rows(postgres_dsn))) == sorted(
            map(repr, [["7", 3], ['["a",1]', [1, 2]], ["s", "text"]]))
    finally:
        store.close()


def test_bad_configuration_fails_at_start(postgres_server: Any, postgres_dsn: str,
                                          tmp_path: Path) -> None:
    """Bad table names, an unkeyed stream, a SQLite store, an unreachable database or a table
    of another shape fail when the sink opens, with what to change."""
    with pytest.raises(ConfigurationError, match="identifier"):
        PostgresTable(postgres_dsn, table="totals; DROP TABLE x")
    with pytest.raises(ConfigurationError, match="not keyed"):
        PostgresTable(postgres_dsn, table="totals").open(_ctx(keyed=False))
    with pytest.raises(ConfigurationError, match="SQLite"):
        PostgresTable(postgres_dsn, table="totals").open(_ctx(store_path=tmp_path / "s.db"))
    with pytest.raises(ConfigurationError, match="does not exist"):
        PostgresTable(postgres_server.dsn_for("missing_db"), table="totals").open(_ctx())
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE odd (id int PRIMARY KEY)")
    with pytest.raises(ConfigurationError, match="columns key"):
        PostgresTable(postgres_dsn, table="odd").open(_ctx())


def test_rows_need_a_postgres_store_on_the_same_database(postgres_server: Any,
                                                         postgres_dsn: str) -> None:
    """A PostgresTable whose store is on another database refuses to write, and the commit
    writes nothing."""
    other = postgres_server.create_database("sink_other_db")
    sink = PostgresTable(other, table="totals")
    store = PostgresStore(postgres_dsn)
    try:
        opened = store.open_task("f:s:0")
        writer = sink.open(_ctx())
        writer.buffer.append(("a", 1))
        pre = writer.precommit(1)
        assert pre.in_store is not None
        record = make_record(task="f:s:0", epoch=opened.epoch, seq=1, positions={},
                             sink_txn={}, inflight=[], created_at=0.0, stats={},
                             prev_digest=GENESIS_DIGEST)
        with pytest.raises(ConfigurationError, match="same DSN"):
            store.commit(opened, record, [], [], [], [pre.in_store])
        assert store.records("f:s:0") == [] and _rows(other) == []
    finally:
        store.close()
