"""SQLiteTable: one transaction with the store in its database, once per seq in another."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from resumeflow._faults import installed
from resumeflow.checkpoint import GENESIS_DIGEST, SQLiteStore, make_record
from resumeflow.errors import ConfigurationError, FencedError
from resumeflow.sinks import SinkContext, SQLiteTable

TASK = "f:s:0"


def ctx(store_path: Path | None = None, *, keyed: bool = True) -> SinkContext:
    return SinkContext(sink_id="out", task=TASK, partition="0", partitions=1, keyed=keyed,
                       guarantee="exactly-once", store_path=store_path)


def table(path: Path, name: str = "totals") -> dict[Any, Any]:
    db = sqlite3.connect(path)
    try:
        return {k: json.loads(v) for k, v in db.execute(f"SELECT key, value FROM {name}")}
    except sqlite3.OperationalError:
        return {}
    finally:
        db.close()


class Crash(BaseException):
    """Stands for the process dying at a crash point."""


def test_table_name_must_be_an_identifier(tmp_path: Path) -> None:
    """A table name that is not a plain identifier is refused (no SQL injection)."""
    with pytest.raises(ConfigurationError, match="plain identifier"):
        SQLiteTable(tmp_path / "o.db", table="totals; DROP TABLE x")


def test_unkeyed_stream_is_refused(tmp_path: Path) -> None:
    """Upsert by key needs a keyed stream; the error says to add ``key_by``."""
    with pytest.raises(ConfigurationError, match=r"key_by"):
        SQLiteTable(tmp_path / "o.db", table="t").open(ctx(keyed=False))


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    """A database in a directory that does not exist fails at start."""
    with pytest.raises(ConfigurationError, match="does not exist"):
        SQLiteTable(tmp_path / "no" / "o.db", table="t").open(ctx())


# -- in another database ------------------------------------------------------------------


def test_other_db_applies_at_finalize_only(tmp_path: Path) -> None:
    """Rows are staged at pre-commit and upserted (latest value per key) at finalize."""
    db = tmp_path / "o.db"
    w = SQLiteTable(db, table="totals").open(ctx())
    assert not w.same_db
    w.buffer.extend([("a", 1), ("b", 2), ("a", 3), (7, {"x": [1]})])
    pre = w.precommit(1)
    assert pre.in_store is None and pre.staged is not None
    assert table(db) == {}
    w.finalize(1)
    assert table(db) == {"a": 3, "b": 2, 7: {"x": [1]}}
    assert w.releasable() == 1
    w.close()


def test_other_db_applies_each_seq_once(tmp_path: Path) -> None:
    """Re-applying an applied seq, or an older one after a newer, changes nothing."""
    db = tmp_path / "o.db"
    w = SQLiteTable(db, table="totals").open(ctx())
    w.buffer.append(("a", 1))
    first = w.precommit(1)
    w.finalize(1)
    w.buffer.append(("a", 2))
    second = w.precommit(2)
    w.finalize(2)
    w.close()
    assert first.staged is not None and second.staged is not None
    assert second.meta == {"seq": 2}
    again = SQLiteTable(db, table="totals").open(ctx())
    again.recover(second.meta, [first.staged, second.staged])
    again.recover(second.meta, [first.staged])
    again.close()
    assert table(db) == {"a": 2}
    progress = sqlite3.connect(db).execute(
        "SELECT task, seq FROM _resumeflow_sink_progress").fetchall()
    assert progress == [(TASK, 2)]


def test_other_db_recovery_applies_a_committed_seq_never_applied(tmp_path: Path) -> None:
    """A crash between the commit point and finalize is completed by recovery."""
    db = tmp_path / "o.db"
    w = SQLiteTable(db, table="totals").open(ctx())
    w.buffer.append(("a", 1))
    pre = w.precommit(1)
    w.close()  # crashed before finalize
    assert table(db) == {}
    assert pre.staged is not None
    again = SQLiteTable(db, table="totals").open(ctx())
    again.recover(pre.meta, [pre.staged])
    again.close()
    assert table(db) == {"a": 1}


def test_other_db_applies_seqs_made_again_after_a_fallback(tmp_path: Path) -> None:
    """When the task resumes from an older checkpoint (damaged newer record, or rewind), the
    seqs it makes again are applied even though the sink saw those numbers before."""
    db = tmp_path / "o.db"
    w = SQLiteTable(db, table="totals").open(ctx())
    w.buffer.append(("a", 1))
    first = w.precommit(1)
    w.finalize(1)
    w.buffer.append(("a", 2))
    w.precommit(2)
    w.finalize(2)  # the store later loses checkpoint 2 and resumes from checkpoint 1
    w.close()
    again = SQLiteTable(db, table="totals").open(ctx())
    again.recover(first.meta, [])
    again.buffer.extend([("a", 2), ("b", 7)])  # checkpoint 2, made again, covers more
    again.precommit(2)
    again.finalize(2)
    again.close()
    assert table(db) == {"a": 2, "b": 7}


def test_other_db_crash_inside_apply_leaves_nothing(tmp_path: Path) -> None:
    """Applying a seq is one transaction of the sink database: all rows or none."""
    db = tmp_path / "o.db"
    w = SQLiteTable(db, table="totals").open(ctx())
    w.buffer.extend([("a", 1), ("b", 2)])
    pre = w.precommit(1)
    assert pre.staged is not None
    bad = pre.staged.payload.replace(b'"b"', b"[]")  # a row SQLite refuses half-way
    with pytest.raises(sqlite3.Error):
        w._apply(1, bad)
    assert table(db) == {}
    w.finalize(1)
    assert table(db) == {"a": 1, "b": 2}
    w.close()


# -- in the store's database --------------------------------------------------------------


class StoreTask:
    def __init__(self, path: Path) -> None:
        self.store = SQLiteStore(path)
        self.opened = self.store.open_task(TASK)
        self.digest = GENESIS_DIGEST
        self.seq = 0

    def commit(self, in_store: Any) -> None:
        record = make_record(task=TASK, epoch=self.opened.epoch, seq=self.seq + 1,
                             positions={"0": self.seq + 1}, sink_txn={}, inflight=[],
                             created_at=time.time(), stats={}, prev_digest=self.digest)
        self.store.commit(self.opened, record, [], [], [], [in_store])
        self.seq, self.digest = record.seq, record.digest


def test_same_db_writes_inside_the_store_commit(tmp_path: Path) -> None:
    """In the store's database the upserts are part of the commit transaction."""
    path = tmp_path / "store.db"
    task = StoreTask(path)
    w = SQLiteTable(path, table="totals").open(ctx(task.store.database_path))
    assert w.same_db
    w.buffer.extend([("a", 1), ("b", 2)])
    pre = w.precommit(1)
    assert pre.staged is None and pre.in_store is not None
    assert table(path) == {}
    task.commit(pre.in_store)
    assert table(path) == {"a": 1, "b": 2}
    w.finalize(1)  # nothing left to do
    assert table(path) == {"a": 1, "b": 2}
    w.close()
    task.store.close()


def test_same_db_crash_before_commit_leaves_no_rows(tmp_path: Path) -> None:
    """A crash before the store's COMMIT leaves neither the record nor the rows."""
    path = tmp_path / "store.db"
    task = StoreTask(path)
    w = SQLiteTable(path, table="totals").open(ctx(task.store.database_path))
    w.buffer.append(("a", 1))
    pre = w.precommit(1)

    def crash(point: str) -> None:
        if point == "store.before_commit":
            raise Crash

    with installed(crash), pytest.raises(Crash):
        task.commit(pre.in_store)
    assert table(path) == {}
    assert task.store.records(TASK) == []
    task.store.close()


def test_same_db_fenced_commit_writes_no_rows(tmp_path: Path) -> None:
    """A stale owner's commit is refused before any of its rows is written."""
    path = tmp_path / "store.db"
    old = StoreTask(path)
    w = SQLiteTable(path, table="totals").open(ctx(old.store.database_path))
    w.buffer.append(("a", 1))
    pre = w.precommit(1)
    new = StoreTask(path)
    with pytest.raises(FencedError):
        old.commit(pre.in_store)
    assert table(path) == {}
    old.store.close()
    new.store.close()
