"""``check_source``: the contract every source must pass, as one function.

It reads every partition of a fresh source several ways and raises ``AssertionError`` with
the rule that broke: partitions are stable; a batch's positions increase from ``start`` (a
batch may begin with skipped filler, such as blank lines) and stay below ``end``; ``end`` of
the last batch is the reader's ``position``; records are never skipped (a redelivering
source may repeat records below the position, which are ignored as the runtime ignores
them); ``open(partition, p)`` at any position a batch reported yields exactly the records
from there; a bounded read reaches ``at_end``; every record decodes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..sources import Batch, Source

__all__ = ["check_source"]

_MAX_READS = 100_000


def _fail(message: str) -> None:
    raise AssertionError(f"check_source: {message}")


def check_source(make_source: Callable[[], Source]) -> None:
    """Check that sources made by ``make_source`` keep the source contract.

    Args:
        make_source: returns a fresh source over the same fixed, bounded input each call
            (at least one partition; give some partition a few records so resuming in the
            middle is exercised).
    """
    source = make_source()
    partitions = source.partitions()
    if not partitions or not all(isinstance(p, str) for p in partitions):
        _fail(f"partitions() must be a non-empty list of str, got {partitions!r}")
    if make_source().partitions() != partitions or source.partitions() != partitions:
        _fail("partitions() differ between calls or between two sources of the same input")
    if not isinstance(source.name, str) or not source.name:
        _fail(f"source.name must be a non-empty str, got {source.name!r}")
    for partition in partitions:
        _check_partition(make_source, partition)


def _check_partition(make_source: Callable[[], Source], partition: str) -> None:
    source = make_source()
    records, end = _read_all(source, partition, None, max_records=3)
    for size in (1, 1000):
        again, again_end = _read_all(make_source(), partition, None, max_records=size)
        if again != records or again_end != end:
            _fail(f"partition {partition!r}: reading {size} record(s) at a time gave "
                  f"{_show(again)} ending at {again_end!r}, reading 3 at a time gave "
                  f"{_show(records)} ending at {end!r}")
    for position, raw in records:
        try:
            source.decode(raw)
        except Exception as exc:
            _fail(f"partition {partition!r}: record at position {position!r} does not "
                  f"decode: {type(exc).__name__}: {exc}")
    for k in sorted({0, len(records) // 2, max(len(records) - 1, 0)}):
        if k >= len(records):
            continue
        position = records[k][0]
        tail, tail_end = _read_all(make_source(), partition, position, max_records=2)
        if tail != records[k:] or tail_end != end:
            _fail(f"partition {partition!r}: open at position {position!r} yielded "
                  f"{_show(tail)}, but the full read had {_show(records[k:])} from there")
    rest, rest_end = _read_all(make_source(), partition, end, max_records=5)
    if rest or rest_end != end:
        _fail(f"partition {partition!r}: open at the end position {end!r} yielded "
              f"{_show(rest)}; expected nothing")


def _read_all(source: Source, partition: str, position: Any,
              *, max_records: int) -> tuple[list[tuple[Any, Any]], Any]:
    reader = source.open(partition, position, follow=False)
    expected = reader.position
    if position is not None and expected != position:
        _fail(f"partition {partition!r}: open at {position!r} gives a reader at "
              f"{expected!r}")
    out: list[tuple[Any, Any]] = []
    try:
        for _ in range(_MAX_READS):
            batch = reader.read(max_records)
            if batch is None:
                if reader.at_end:
                    break
                continue
            expected = _take(batch, partition, expected, max_records, out)
            if reader.position != expected:
                _fail(f"partition {partition!r}: reader.position is {reader.position!r} "
                      f"after a batch that ends at {expected!r}")
        else:
            _fail(f"partition {partition!r}: not at_end after {_MAX_READS} reads of a "
                  "bounded input")
        if reader.read(max_records) is not None and not reader.at_end:
            _fail(f"partition {partition!r}: read() returned a batch after at_end")
    finally:
        reader.close()
    return out, expected


def _take(batch: Batch, partition: str, expected: Any, max_records: int,
          out: list[tuple[Any, Any]]) -> Any:
    """Check one batch and append its new records; returns the next expected position."""
    n = len(batch.items)
    if n > max_records:
        _fail(f"partition {partition!r}: read({max_records}) returned {n} records")
    if n and batch.locate(0) < batch.start:
        _fail(f"partition {partition!r}: locate(0) is {batch.locate(0)!r}, before the batch "
              f"start {batch.start!r}")
    if not batch.start < batch.end and not (n == 0 and batch.start == batch.end):
        _fail(f"partition {partition!r}: batch start {batch.start!r} is not before its end "
              f"{batch.end!r}")
    if batch.end <= expected:
        return expected
    if batch.start > expected:
        _fail(f"partition {partition!r}: batch starts at {batch.start!r}, after the "
              f"reader's position {expected!r}: records were skipped")
    previous = None
    for i, raw in enumerate(batch.items):
        position = batch.locate(i)
        if previous is not None and not previous < position:
            _fail(f"partition {partition!r}: positions in a batch do not increase: "
                  f"{previous!r} then {position!r}")
        if not position < batch.end:
            _fail(f"partition {partition!r}: record at {position!r} is not before the "
                  f"batch end {batch.end!r}")
        previous = position
        if position >= expected:
            out.append((position, raw))
    return batch.end


def _show(records: list[tuple[Any, Any]]) -> str:
    head = ", ".join(f"{p!r}" for p, _ in records[:6])
    more = f", ... ({len(records)} in all)" if len(records) > 6 else ""
    return f"records at positions [{head}{more}]"
