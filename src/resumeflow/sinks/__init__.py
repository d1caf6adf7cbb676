"""Sinks: outputs staged before the commit point and finalized idempotently after it.

``PostgresTable`` is imported on first use (it needs the ``postgres`` extra: psycopg), so
``import resumeflow`` works without it.
"""

from typing import TYPE_CHECKING, Any

from ._base import Guarantee, Precommit, Sink, SinkContext, SinkWriter
from ._jsonlines import JsonLinesSink
from ._sqlite import SQLiteTable
from ._stdout import Stdout

__all__ = [
    "Guarantee",
    "JsonLinesSink",
    "Precommit",
    "SQLiteTable",
    "Sink",
    "SinkContext",
    "SinkWriter",
    "Stdout",
]

if TYPE_CHECKING:
    from ._postgres import PostgresTable as PostgresTable


def __getattr__(name: str) -> Any:
    if name == "PostgresTable":
        from ._postgres import PostgresTable

        return PostgresTable
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
