"""Sinks: outputs staged before the commit point and finalized idempotently after it."""

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
