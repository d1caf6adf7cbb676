"""Sources: partitioned inputs with exact resume positions.

``KafkaSource`` needs the ``kafka`` extra (confluent-kafka); it is imported on first use, so
``import resumeflow`` works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._base import Batch, Source, SourceReader
from ._jsonlines import JsonLines, JsonLinesDir

if TYPE_CHECKING:
    from ._kafka import KafkaRecord, KafkaSource

__all__ = ["Batch", "JsonLines", "JsonLinesDir", "KafkaRecord", "KafkaSource", "Source",
           "SourceReader"]


def __getattr__(name: str) -> Any:
    if name in ("KafkaSource", "KafkaRecord"):
        from . import _kafka

        return getattr(_kafka, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
