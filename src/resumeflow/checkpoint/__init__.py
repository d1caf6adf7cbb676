"""Checkpoints: commit records, the store contract, and the SQLite store.

``PostgresStore`` is imported on first use (it needs the ``postgres`` extra: psycopg), so
``import resumeflow`` works without it.
"""

from typing import TYPE_CHECKING, Any

from ._record import GENESIS_DIGEST, SCHEMA_VERSION, CommitRecord, decode_record, make_record
from ._sqlite import SQLiteStore
from ._store import OpenedTask, StagedEntry, Store, TaskStatus

__all__ = [
    "GENESIS_DIGEST",
    "SCHEMA_VERSION",
    "CommitRecord",
    "OpenedTask",
    "SQLiteStore",
    "StagedEntry",
    "Store",
    "TaskStatus",
    "decode_record",
    "make_record",
]

if TYPE_CHECKING:
    from ._postgres import PostgresStore as PostgresStore


def __getattr__(name: str) -> Any:
    if name == "PostgresStore":
        from ._postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
