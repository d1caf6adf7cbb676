"""SQLite table sink: upsert of the latest value per key.

When the table lives in the store's own database, the upserts run inside the store's commit
transaction: output, state delta and commit record are one atomic write, exactly-once with no
second phase. In another database, each checkpoint's rows are staged in the store and applied
after the commit point in one transaction of the sink database that also records the applied
``seq`` per task, so applying twice is a no-op.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from ..checkpoint import StagedEntry
from ..errors import ConfigurationError, DataError
from ._base import Precommit, SinkContext

__all__ = ["SQLiteTable"]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PROGRESS = "_resumeflow_sink_progress"


class SQLiteTable:
    """Upsert ``(key, value)`` items into ``table(key PRIMARY KEY, value)``.

    Keys that are strings or numbers are stored as they are; other keys and all values are
    stored as JSON text (query them with SQLite's ``json_extract``).

    Args:
        path: the database file; the store's own file gives a single-transaction commit.
        table: table name (letters, digits, underscore).
    """

    def __init__(self, path: str | os.PathLike[str], *, table: str) -> None:
        if not _IDENT.match(table):
            raise ConfigurationError(
                f"SQLiteTable table name {table!r} is not a plain identifier; use letters, "
                "digits and underscores"
            )
        self.path = Path(path)
        self.table = table
        self.name = f"sqlite:{self.path}:{table}"

    def open(self, ctx: SinkContext) -> _SQLiteTableWriter:
        if not ctx.keyed:
            raise ConfigurationError(
                f"SQLiteTable({str(self.path)!r}, table={self.table!r}) upserts by key but the "
                "stream is not keyed: add .key_by(...) before .sink(...)"
            )
        if not self.path.parent.exists():
            raise ConfigurationError(
                f"directory of {str(self.path)!r} does not exist; create it or fix the path"
            )
        same_db = ctx.store_path is not None and self.path.resolve() == ctx.store_path
        return _SQLiteTableWriter(self.path, self.table, ctx, same_db=same_db)

    def __repr__(self) -> str:
        return f"SQLiteTable({str(self.path)!r}, table={self.table!r})"


def _column(key: Any) -> Any:
    if isinstance(key, (str, int, float)) and not isinstance(key, bool):
        return key
    return _encoder.encode(key).decode()


class _SQLiteTableWriter:
    def __init__(self, path: Path, table: str, ctx: SinkContext, *, same_db: bool) -> None:
        self.buffer: list[Any] = []
        self.ctx = ctx
        self.same_db = same_db
        self._table = table
        self._upsert = (
            f"INSERT INTO {table} (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value"
        )
        self._pending: dict[int, bytes] = {}
        self._finalized: int | None = None
        self._db: sqlite3.Connection | None = None
        if not same_db:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=30.0,
                                       check_same_thread=False)  # finalize: commit thread
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                f"CREATE TABLE IF NOT EXISTS {_PROGRESS} (task TEXT PRIMARY KEY, seq INTEGER)"
            )
            self._create(self._db)
        self._created = not same_db

    def _create(self, db: Any) -> None:
        db.execute(f"CREATE TABLE IF NOT EXISTS {self._table} (key PRIMARY KEY, value TEXT)")

    def _rows(self) -> list[tuple[Any, str]]:
        latest = dict(self.buffer)
        try:
            return [(_column(k), _encoder.encode(v).decode()) for k, v in latest.items()]
        except TypeError as exc:
            raise DataError(
                f"output for table {self._table!r} is not JSON-serializable ({exc}); emit "
                "dicts, lists, strings and numbers"
            ) from exc

    def recover(self, meta: dict[str, Any] | None, staged: Sequence[StagedEntry]) -> None:
        for entry in staged:
            self._apply(entry.seq, entry.payload)
        if self._db is not None:
            # The task resumes from ``resumed``: after a fallback from a damaged record or a
            # rewind, seqs above it are made again (covering other records) and must be
            # applied, not skipped as done. Re-applying upserts in order is harmless.
            resumed = int(meta.get("seq", 0)) if meta else 0
            self._db.execute(f"UPDATE {_PROGRESS} SET seq = ? WHERE task = ? AND seq > ?",
                             (resumed, self.ctx.task, resumed))

    def precommit(self, seq: int) -> Precommit:
        rows = self._rows() if self.buffer else []
        self.buffer.clear()
        if self.same_db:
            create = not self._created
            self._created = True

            def write(db: Any) -> None:
                if create:
                    self._create(db)
                if rows:
                    db.executemany(self._upsert, rows)

            return Precommit(in_store=write)
        if not rows:
            return Precommit(meta={"seq": seq})
        payload = _encoder.encode(rows)
        self._pending[seq] = payload
        return Precommit(meta={"seq": seq}, staged=StagedEntry(sink=self.ctx.sink_id, seq=seq,
                                                               meta={}, payload=payload))

    def finalize(self, seq: int) -> None:
        payload = self._pending.pop(seq, None)
        if payload is not None:
            self._apply(seq, payload)

    def _apply(self, seq: int, payload: bytes) -> None:
        db = self._db
        if db is None:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(f"SELECT seq FROM {_PROGRESS} WHERE task = ?",
                             (self.ctx.task,)).fetchone()
            if row is None or row[0] < seq:
                db.executemany(self._upsert, [tuple(r) for r in _decoder.decode(payload)])
                db.execute(f"INSERT OR REPLACE INTO {_PROGRESS} VALUES (?, ?)",
                           (self.ctx.task, seq))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._finalized = seq

    def releasable(self) -> int | None:
        return self._finalized

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
