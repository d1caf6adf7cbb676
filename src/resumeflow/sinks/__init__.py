"""Sinks: outputs staged before the commit point and finalized idempotently after it.

``PostgresTable`` is imported on first use (it needs the ``postgres`` extra: psycopg), so
``import resumeflow`` works without it.
"""

from typing import TYPE_CHECKING, Any

from ._base import Guarantee, Precommit, Sink, SinkContext, SinkWriter
from ._jsonlines import JsonLinesSink
from ._sqlite import SQLiteTable
from ._stdout import Stdout

if TYPE_CHECKING:
    from ._kafka import KafkaSink

__all__ = [
    "Guarantee",
    "JsonLinesSink",
    "KafkaSink",
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
    """Connectors with optional dependencies load on first use (``import resumeflow`` stays
    light)."""
    if name == "PostgresTable":
        from ._postgres import PostgresTable

        return PostgresTable
    if name == "KafkaSink":
        from ._kafka import KafkaSink

        return KafkaSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
