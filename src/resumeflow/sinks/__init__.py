"""Sinks: outputs staged before the commit point and finalized idempotently after it.

``KafkaSink`` and ``PostgresTable`` are imported on first use (they need the ``kafka`` and
``postgres`` extras: confluent-kafka, psycopg), so ``import resumeflow`` works without them.
"""

from typing import TYPE_CHECKING, Any

from ._base import Guarantee, Precommit, Sink, SinkContext, SinkWriter
from ._jsonlines import JsonLinesSink
from ._sqlite import SQLiteTable
from ._stdout import Stdout

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
    from ._kafka import KafkaSink as KafkaSink
    from ._postgres import PostgresTable as PostgresTable


def __getattr__(name: str) -> Any:
    """Connectors with optional dependencies load on first use (``import resumeflow`` stays
    light)."""
    if name == "PostgresTable":
        try:
            from ._postgres import PostgresTable
        except ImportError as exc:
            raise ImportError(
                f"PostgresTable needs the postgres extra (psycopg 3): pip install "
                f"'resumeflow[postgres]' ({exc})") from exc
        return PostgresTable
    if name == "KafkaSink":
        from ._kafka import KafkaSink

        return KafkaSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
