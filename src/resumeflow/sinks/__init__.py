"""Sinks: outputs staged before the commit point and finalized idempotently after it."""

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


def __getattr__(name: str) -> Any:
    """Connectors with optional dependencies load on first use (``import resumeflow`` stays
    light)."""
    if name == "KafkaSink":
        from ._kafka import KafkaSink

        return KafkaSink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
