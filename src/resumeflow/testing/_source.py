"""An in-memory source that behaves like an at-least-once broker when told to.

Each partition is a list of records and a record's position is its index, so the position
after a batch is the index of the next record. ``open(partition, p)`` yields exactly the
records from index ``p`` on, in order, like every source. When ``redeliver_rate`` or
``reorder_rate`` are set it also does what brokers do after a reconnect or a rebalance:
delivers again records it already delivered (a batch that starts below the reader's position,
possibly running on into new records) and delivers a stale batch out of order, after newer
ones. Records are never skipped: every position is delivered at least once, in order of first
delivery. The runtime must drop what lies below its position; the simulator checks it does.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import ConfigurationError
from ..sources import Batch

__all__ = ["MemorySource"]


class MemorySource:
    """Partitions of in-memory records with ``int`` positions.

    Args:
        partitions: records per partition name, or one sequence for a single partition "0".
        name: the source name (part of task ids).
        redeliver_rate: chance that a read delivers again records below the reader's position.
        reorder_rate: chance that a read delivers an earlier batch again, out of order.
        stall_rate: chance that a read finds nothing available (``None``) before the end.
        max_batch: most records one read returns, whatever the caller asks.
        rng: random source of the faults above (seed it for a deterministic run).
        decode: turns a raw record into a value (default: the record itself). Raise in it to
            model a record that cannot be decoded.

    Attributes:
        high_water: per partition, the highest position any reader has been given (the end
            of the furthest batch): how far a crashed task had read.
        redelivered: records delivered again below a reader's position, per partition.
    """

    def __init__(self, partitions: Mapping[str, Sequence[Any]] | Sequence[Any], *,
                 name: str = "memory", redeliver_rate: float = 0.0, reorder_rate: float = 0.0,
                 stall_rate: float = 0.0, max_batch: int | None = None,
                 rng: random.Random | None = None,
                 decode: Callable[[Any], Any] | None = None) -> None:
        if isinstance(partitions, Mapping):
            self.records: dict[str, list[Any]] = {str(p): list(r) for p, r in partitions.items()}
        else:
            self.records = {"0": list(partitions)}
        if not self.records:
            raise ConfigurationError("MemorySource needs at least one partition")
        self.name = name
        self.redeliver_rate = redeliver_rate
        self.reorder_rate = reorder_rate
        self.stall_rate = stall_rate
        self.max_batch = max_batch
        self.rng = rng or random.Random(0)
        self._decode = decode
        self.high_water: dict[str, int] = dict.fromkeys(self.records, 0)
        self.redelivered: dict[str, int] = dict.fromkeys(self.records, 0)

    def partitions(self) -> list[str]:
        return list(self.records)

    def open(self, partition: str, position: Any | None, *, follow: bool) -> _MemoryReader:
        if partition not in self.records:
            raise ConfigurationError(
                f"MemorySource {self.name!r} has no partition {partition!r}; it has "
                f"{sorted(self.records)}"
            )
        start = int(position or 0)
        size = len(self.records[partition])
        if not 0 <= start <= size:
            raise ConfigurationError(
                f"MemorySource {self.name!r} partition {partition!r} holds {size} records but "
                f"the checkpoint resumes at position {start}; rewind the task"
            )
        return _MemoryReader(self, partition, start, follow=follow)

    def decode(self, raw: Any) -> Any:
        return raw if self._decode is None else self._decode(raw)

    def append(self, partition: str, records: Sequence[Any]) -> None:
        """Add records at the end of a partition (for readers opened with ``follow``)."""
        self.records[partition].extend(records)

    @property
    def faulty(self) -> bool:
        """Whether any delivery fault is switched on."""
        return bool(self.redeliver_rate or self.reorder_rate or self.stall_rate)

    def quiet(self) -> None:
        """Switch every delivery fault off (the liveness phase of a simulation)."""
        self.redeliver_rate = self.reorder_rate = self.stall_rate = 0.0

    def __repr__(self) -> str:
        return f"MemorySource({self.name!r}, partitions={len(self.records)})"


class _MemoryReader:
    """One open partition; ``position`` is the index of the next new record."""

    def __init__(self, source: MemorySource, partition: str, position: int, *,
                 follow: bool) -> None:
        self.source = source
        self.partition = partition
        self.position = position
        self._records = source.records[partition]
        self._follow = follow
        self._history: list[tuple[int, int]] = []
        self.closed = False

    @property
    def at_end(self) -> bool:
        return not self._follow and self.position >= len(self._records)

    def read(self, max_records: int) -> Batch | None:
        limit = max_records if self.source.max_batch is None else min(max_records,
                                                                      self.source.max_batch)
        limit = max(1, limit)
        src = self.source
        if src.faulty:
            faulty = self._faulty_range(limit)
            if faulty is not None:
                return self._deliver(*faulty)
            if src.stall_rate and src.rng.random() < src.stall_rate:
                return None
        start = self.position
        end = min(start + limit, len(self._records))
        if end == start:
            return None
        return self._deliver(start, end)

    def _faulty_range(self, limit: int) -> tuple[int, int] | None:
        src, pos = self.source, self.position
        rng = src.rng
        if pos > 0 and src.redeliver_rate and rng.random() < src.redeliver_rate:
            start = rng.randrange(max(0, pos - limit), pos)
            return start, min(start + limit, len(self._records))
        if self._history and src.reorder_rate and rng.random() < src.reorder_rate:
            return self._history[rng.randrange(len(self._history))]
        return None

    def _deliver(self, start: int, end: int) -> Batch:
        if start < self.position:
            self.source.redelivered[self.partition] += min(end, self.position) - start
        if end > self.position:
            self.position = end
        if len(self._history) >= 8:
            self._history.pop(0)
        self._history.append((start, end))
        hw = self.source.high_water
        if end > hw[self.partition]:
            hw[self.partition] = end
        return Batch(items=self._records[start:end], start=start, end=end,
                     locate=lambda i: start + i)

    def close(self) -> None:
        self.closed = True
