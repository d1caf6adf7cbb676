"""The source contract: partitions with totally ordered positions, read in batches.

A source guarantees that ``open(partition, position)`` yields exactly the records at and
after ``position``, in order, and that a batch's ``end`` is the position of the next record
after it. A record is never split across batches; an incomplete record at the end of the
input is not yielded until it is complete.

An at-least-once source (a broker after a reconnect or a rebalance) may also deliver again
records below the reader's position, or an earlier batch out of order, as long as it never
skips one. The runtime drops every record below the task's position, by ``locate``, before it
is processed: such a batch costs one comparison, an in-order batch nothing more.

Positions may have gaps (a broker's transaction markers): a batch then starts at the reader's
position and ``locate`` gives each record's own position, so nothing looks skipped.

A reader may also define ``committed(position)``: the runtime calls it once a checkpoint of
its task at ``position`` is durable (a broker records it as advice for other tools; it must
never fail the task). A source may define ``membership()``: the ``Membership`` that decides
which of its partitions this worker runs (a consumer group); the runtime uses it by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Batch", "Source", "SourceReader"]


@dataclass(slots=True)
class Batch:
    """Raw records read from one partition, with the positions around them.

    Attributes:
        items: the raw records, in order.
        start: position of the first record.
        end: position of the next record to read after this batch.
        locate: maps an index in ``items`` to that record's position (only called on the
            failure path, so it may re-scan the batch).
    """

    items: Sequence[Any]
    start: Any
    end: Any
    locate: Callable[[int], Any]


class SourceReader(Protocol):
    """An open partition of a source."""

    position: Any
    """Position of the next record this reader will return."""

    def read(self, max_records: int) -> Batch | None:
        """Up to ``max_records`` records, or ``None`` when nothing is available now."""
        ...

    @property
    def at_end(self) -> bool:
        """True once a bounded input has been read to its end (never while following)."""
        ...

    def close(self) -> None:
        """Release the partition; a crash instead leaves nothing to clean up."""
        ...


class Source(Protocol):
    """A partitioned input. One task runs per partition."""

    name: str

    def partitions(self) -> list[str]:
        """The partitions, fixed when the pipeline starts; fails on unreadable input."""
        ...

    def open(self, partition: str, position: Any | None, *, follow: bool) -> SourceReader:
        """Open a partition at ``position`` (``None``: its beginning)."""
        ...

    def decode(self, raw: Any) -> Any:
        """Turn one raw record into a value; raises on a malformed record."""
        ...
