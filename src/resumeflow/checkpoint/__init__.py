"""Checkpoints: commit records, the store contract, and the SQLite store."""

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
