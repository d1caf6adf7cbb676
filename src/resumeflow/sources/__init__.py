"""Sources: partitioned inputs with exact resume positions."""

from ._base import Batch, Source, SourceReader
from ._jsonlines import JsonLines, JsonLinesDir

__all__ = ["Batch", "JsonLines", "JsonLinesDir", "Source", "SourceReader"]
