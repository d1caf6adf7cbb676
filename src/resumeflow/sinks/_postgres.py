"""PostgreSQL table sink: upsert of the latest value per key, or append of every item, inside
the store's commit.

The table lives in the database of the pipeline's ``PostgresStore``. Each checkpoint's rows
are upserted or inserted by one set-based statement that runs inside the store's commit
transaction, so the output, the state delta and the commit record are one atomic write:
exactly-once with no second phase, and nothing to finalize or recover. A commit refused for
a stale epoch or lost in a crash writes no row. The table and the DSN are checked when a task
opens (a bad name, an unreachable database or a table without the mode's columns fails at
start).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgspec

from ..checkpoint import StagedEntry
from ..checkpoint._pg_retry import describe_dsn
from ..errors import ConfigurationError, DataError, UnavailableError
from ._base import Precommit, SinkContext

__all__ = ["PostgresTable"]

_encoder = msgspec.json.Encoder()
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class PostgresTable:
    """Write a stream's items into a PostgreSQL table, inside the store's commit.

    ``mode="upsert"`` (keyed streams): ``table(key text PRIMARY KEY, value jsonb)`` holds the
    latest value per key; string keys are stored as they are, other keys as their JSON text.
    Several tasks upserting the same key overwrite each other (state is per task).
    ``mode="append"``: ``table(id bigint identity PRIMARY KEY, task text, seq bigint, key jsonb,
    value jsonb)`` gets one row per item, in order (``key`` is NULL on a stream without keys),
    tagged with the task and checkpoint that wrote it: when a task resumes from an earlier
    checkpoint than its newest (a corrupt newest record, a rewind), its rows of the discarded
    checkpoints are deleted before it writes again. The table is created when missing.

    Args:
        dsn: the database of the pipeline's ``PostgresStore`` (the same database is
            required: the rows are written in the store's transaction).
        table: ``name`` or ``schema.name`` (letters, digits, underscores).
        mode: ``"upsert"`` or ``"append"``.
    """

    def __init__(self, dsn: str, *, table: str, mode: str = "upsert") -> None:
        if mode not in ("upsert", "append"):
            raise ConfigurationError(f"PostgresTable mode {mode!r} is unknown; use 'upsert' "
                                     "or 'append'")
        self.mode = mode
        parts = table.split(".")
        if len(parts) > 2 or not all(_IDENT.match(p) for p in parts):
            raise ConfigurationError(
                f"PostgresTable table name {table!r} is not a plain identifier or "
                "schema.identifier; use letters, digits and underscores")
        self.where, _ = describe_dsn(dsn)
        self.dsn = dsn
        self.table = table
        self.qualified = ".".join(f'"{p}"' for p in parts)
        self.name = f"postgres:{self.where}:{table}"
        self._checked = False

    def open(self, ctx: SinkContext) -> _PostgresTableWriter:
        if not ctx.keyed and self.mode == "upsert":
            raise ConfigurationError(
                f"{self!r} upserts by key but the stream is not keyed: add .key_by(...) "
                "before .sink(...), or use mode='append'")
        if ctx.store_path is not None:
            raise ConfigurationError(
                f"{self!r} writes inside the store's transaction, but the store is SQLite "
                f"({ctx.store_path}); run the pipeline on a PostgresStore of the same database")
        if not self._checked:
            self._check_table()
            self._checked = True
        return _PostgresTableWriter(self, ctx)

    def _check_table(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                if self.mode == "upsert":
                    conn.execute(f"CREATE TABLE IF NOT EXISTS {self.qualified} "
                                 "(key text PRIMARY KEY, value jsonb NOT NULL)")
                    conn.execute(f"SELECT key, value FROM {self.qualified} LIMIT 0")
                else:
                    conn.execute(f"CREATE TABLE IF NOT EXISTS {self.qualified} (id bigint "
                                 "GENERATED ALWAYS AS IDENTITY PRIMARY KEY, task text NOT NULL, "
                                 "seq bigint NOT NULL, key jsonb, value jsonb NOT NULL)")
                    index = f'"{self.table.split(".")[-1]}_by_task_seq"'
                    conn.execute(f"CREATE INDEX IF NOT EXISTS {index} ON {self.qualified} "
                                 "(task, seq)")
                    conn.execute(f"SELECT id, task, seq, key, value FROM {self.qualified} "
                                 "LIMIT 0")
        except psycopg.Error as exc:
            _, password = describe_dsn(self.dsn)
            reason = str(exc).strip()
            if password:
                reason = reason.replace(password, "***")
            raise ConfigurationError(
                f"{self!r} cannot be used: {reason}; check the DSN and that the table has "
                "the columns of its mode (upsert: key text primary key, value jsonb; append: "
                "id identity, task text, seq bigint, key jsonb, value jsonb), or choose "
                "another table"
            ) from None

    def same_database(self, conn: Any) -> bool:
        """Whether ``conn`` (the store's connection) is connected to this sink's database."""
        info = getattr(conn, "info", None)
        if info is None or not hasattr(info, "dbname"):
            return False
        from psycopg.conninfo import conninfo_to_dict

        want = conninfo_to_dict(self.dsn)
        return (str(want.get("dbname") or want.get("user") or info.dbname) == info.dbname
                and str(want.get("port") or 5432) == str(info.port))

    def __repr__(self) -> str:
        return f"PostgresTable({self.where!r}, table={self.table!r}, mode={self.mode!r})"


def _column(key: Any) -> str:
    return key if isinstance(key, str) else _encoder.encode(key).decode()


class _PostgresTableWriter:
    def __init__(self, sink: PostgresTable, ctx: SinkContext) -> None:
        self.buffer: list[Any] = []
        self.ctx = ctx
        self._sink = sink
        if sink.mode == "upsert":
            self._sql = (
                f"INSERT INTO {sink.qualified} (key, value) "
                "SELECT k, v::jsonb FROM unnest(%s::text[], %s::text[]) AS u(k, v) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
        else:
            self._sql = (
                f"INSERT INTO {sink.qualified} (task, seq, key, value) "
                "SELECT %s, %s, k::jsonb, v::jsonb FROM unnest(%s::text[], %s::text[]) "
                "WITH ORDINALITY AS u(k, v, n) ORDER BY n")

    def _rows(self) -> tuple[list[str | None], list[str]]:
        if self._sink.mode == "append":
            return self._append_rows()
        try:
            latest = {_column(k): v for k, v in self.buffer}
            keys: list[str | None] = list(latest)
            values = [_encoder.encode(v).decode() for v in latest.values()]
        except TypeError as exc:
            raise DataError(
                f"output for table {self._sink.table!r} is not JSON-serializable ({exc}); "
                "emit dicts, lists, strings and numbers") from exc
        return keys, values

    def _append_rows(self) -> tuple[list[str | None], list[str]]:
        try:
            if self.ctx.keyed:
                keys: list[str | None] = [_encoder.encode(k).decode() for k, _ in self.buffer]
                values = [_encoder.encode(v).decode() for _, v in self.buffer]
            else:
                keys = [None] * len(self.buffer)
                values = [_encoder.encode(v).decode() for v in self.buffer]
        except TypeError as exc:
            raise DataError(
                f"output for table {self._sink.table!r} is not JSON-serializable ({exc}); "
                "emit dicts, lists, strings and numbers") from exc
        return keys, values

    def recover(self, meta: dict[str, Any] | None, staged: Sequence[StagedEntry]) -> None:
        """Nothing to redo: committed rows landed with their commit record. In append mode,
        rows of checkpoints after the one the task resumes from (discarded as corrupt, or
        rewound) are deleted; the new owner's epoch already fences their writer."""
        if self._sink.mode != "append":
            return
        import psycopg

        resumed = int(meta.get("seq", 0)) if meta else 0
        try:
            with psycopg.connect(self._sink.dsn, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f"DELETE FROM {self._sink.qualified} WHERE task = %s AND seq > %s",
                             (self.ctx.task, resumed))
        except psycopg.OperationalError as exc:
            raise UnavailableError(f"{self._sink!r}: recovering task {self.ctx.task!r} "
                                   f"failed ({type(exc).__name__}); the task restarts") from None

    def precommit(self, seq: int) -> Precommit:
        append = self._sink.mode == "append"
        meta = {"seq": seq} if append else None
        if not self.buffer:
            return Precommit(meta=meta)
        keys, values = self._rows()
        self.buffer.clear()
        sink = self._sink
        params: tuple[Any, ...] = (self.ctx.task, seq, keys, values) if append else \
            (keys, values)

        def write(conn: Any) -> None:
            if not sink.same_database(conn):
                raise ConfigurationError(
                    f"{sink!r} must be written in the store's transaction, but the store is "
                    "not a PostgresStore on the same database; give both the same DSN")
            conn.execute(self._sql, params)

        return Precommit(meta=meta, in_store=write)

    def finalize(self, seq: int) -> None:
        """Nothing to do: the rows became visible at the commit point."""

    def releasable(self) -> int | None:
        return None

    def close(self) -> None:
        """Holds no resources: the store's connection writes the rows."""
