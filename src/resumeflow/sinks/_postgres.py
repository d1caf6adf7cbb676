"""PostgreSQL table sink: upsert of the latest value per key, inside the store's commit.

The table lives in the database of the pipeline's ``PostgresStore``. Each checkpoint's rows are
upserted by one set-based statement that runs inside the store's commit transaction, so the
output, the state delta and the commit record are one atomic write: exactly-once with no
second phase, and nothing to finalize or recover. A commit refused for a stale epoch or lost
in a crash writes no row. The table and the DSN are checked when a task opens (a bad name,
unreachable database or a table without ``key``/``value`` columns fails at start).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgspec

from ..checkpoint import StagedEntry
from ..checkpoint._pg_retry import describe_dsn
from ..errors import ConfigurationError, DataError
from ._base import Precommit, SinkContext

__all__ = ["PostgresTable"]

_encoder = msgspec.json.Encoder()
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class PostgresTable:
    """Upsert ``(key, value)`` items into ``table(key text PRIMARY KEY, value jsonb)``.

    String keys are stored as they are, other keys as their JSON text; values as ``jsonb``.
    The table is created when missing. Several tasks upserting the same key overwrite each
    other (state, and so the value, is per task).

    Args:
        dsn: the database of the pipeline's ``PostgresStore`` (the same database is
            required: the rows are written in the store's transaction).
        table: ``name`` or ``schema.name`` (letters, digits, underscores).
    """

    def __init__(self, dsn: str, *, table: str) -> None:
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
        if not ctx.keyed:
            raise ConfigurationError(
                f"{self!r} upserts by key but the stream is not keyed: add .key_by(...) "
                "before .sink(...)")
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
                conn.execute(f"CREATE TABLE IF NOT EXISTS {self.qualified} "
                             "(key text PRIMARY KEY, value jsonb NOT NULL)")
                conn.execute(f"SELECT key, value FROM {self.qualified} LIMIT 0")
        except psycopg.Error as exc:
            _, password = describe_dsn(self.dsn)
            reason = str(exc).strip()
            if password:
                reason = reason.replace(password, "***")
            raise ConfigurationError(
                f"{self!r} cannot be used: {reason}; check the DSN and that the table has "
                "columns key (text, primary key) and value (jsonb), or choose another table"
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
        return f"PostgresTable({self.where!r}, table={self.table!r})"


def _column(key: Any) -> str:
    return key if isinstance(key, str) else _encoder.encode(key).decode()


class _PostgresTableWriter:
    def __init__(self, sink: PostgresTable, ctx: SinkContext) -> None:
        self.buffer: list[Any] = []
        self.ctx = ctx
        self._sink = sink
        self._upsert = (
            f"INSERT INTO {sink.qualified} (key, value) "
            "SELECT k, v::jsonb FROM unnest(%s::text[], %s::text[]) AS u(k, v) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value")

    def _rows(self) -> tuple[list[str], list[str]]:
        try:
            latest = {_column(k): v for k, v in self.buffer}
            keys = list(latest)
            values = [_encoder.encode(v).decode() for v in latest.values()]
        except TypeError as exc:
            raise DataError(
                f"output for table {self._sink.table!r} is not JSON-serializable ({exc}); "
                "emit dicts, lists, strings and numbers") from exc
        return keys, values

    def recover(self, meta: dict[str, Any] | None, staged: Sequence[StagedEntry]) -> None:
        """Nothing to redo: committed rows landed with their commit record."""

    def precommit(self, seq: int) -> Precommit:
        if not self.buffer:
            return Precommit()
        keys, values = self._rows()
        self.buffer.clear()
        sink = self._sink

        def write(conn: Any) -> None:
            if not sink.same_database(conn):
                raise ConfigurationError(
                    f"{sink!r} must be written in the store's transaction, but the store is "
                    "not a PostgresStore on the same database; give both the same DSN")
            conn.execute(self._upsert, (keys, values))

        return Precommit(in_store=write)

    def finalize(self, seq: int) -> None:
        """Nothing to do: the rows became visible at the commit point."""

    def releasable(self) -> int | None:
        return None

    def close(self) -> None:
        """Holds no resources: the store's connection writes the rows."""
