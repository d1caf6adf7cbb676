"""The contract suites pass on every backend and fail on broken ones."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from resumeflow import SQLiteStore
from resumeflow.checkpoint import CommitRecord
from resumeflow.sinks import JsonLinesSink, SQLiteTable, Stdout
from resumeflow.sources import Batch, JsonLines, JsonLinesDir
from resumeflow.testing import (
    MemorySink,
    MemorySource,
    MemoryStore,
    SinkFixture,
    check_sink,
    check_source,
    check_store,
)

from .conftest import read_jsonl, read_table, sqlite_corrupt_latest

# -- stores ------------------------------------------------------------------------------


def test_memory_store_passes_check_store() -> None:
    """MemoryStore keeps the store contract, fallback from a corrupt newest record included."""
    check_store(lambda: MemoryStore(keep_checkpoints=3),
                corrupt_latest=lambda store, task: store.corrupt_latest(task))  # type: ignore[attr-defined]


@pytest.mark.parametrize("keep", [2, 10])
def test_sqlite_store_passes_check_store(fresh_path: Callable[[str], Path], keep: int) -> None:
    """SQLiteStore keeps the store contract, fallback from a corrupt newest record included."""
    check_store(lambda: SQLiteStore(fresh_path(".db"), keep_checkpoints=keep),
                corrupt_latest=sqlite_corrupt_latest)


class _NoFencing(MemoryStore):
    def _check_owner(self, row: Any, record: CommitRecord) -> None:
        return None


class _StaleReads(MemoryStore):
    def load_state(self, task_no: int, key: bytes, epoch: int | None = None) -> bytes | None:
        return super().load_state(task_no, key)  # ignores the reader's epoch


class _LosesStaging(MemoryStore):
    def open_task(self, task: str) -> Any:
        opened = super().open_task(task)
        return type(opened)(task=opened.task, task_no=opened.task_no, epoch=opened.epoch,
                            record=opened.record, discarded_seqs=opened.discarded_seqs)


class _NotAtomic(MemoryStore):
    def commit(self, opened: Any, record: Any, delta: Any, staged: Any, release: Any,
               in_store: Any = ()) -> None:
        row = self._task(opened.task, create=False)
        for key, value in delta:  # state written before the commit point
            row.versions.setdefault(key, []).append((record.seq, value))
        super().commit(opened, record, delta, staged, release, in_store)


@pytest.mark.parametrize(("broken", "rule"), [
    (_NoFencing, "stale epoch"),
    (_LosesStaging, "staged"),
    (_StaleReads, "read with a stale epoch"),
    (_NotAtomic, "refused stale-epoch commit|crash inside commit"),
])
def test_check_store_catches_broken_stores(broken: type[MemoryStore], rule: str) -> None:
    """check_store fails, naming the rule, on a store without fencing (of commits or of
    reads), staging or atomicity."""
    with pytest.raises(AssertionError, match=rule):
        check_store(broken)


# -- sources -----------------------------------------------------------------------------


def _lines(path: Path, n: int, *, blank_every: int = 0) -> Path:
    text = ""
    for i in range(n):
        text += json.dumps({"i": i}) + "\n"
        if blank_every and i % blank_every == 0:
            text += "\n"
    path.write_text(text)
    return path


def test_memory_source_passes_check_source() -> None:
    """MemorySource keeps the source contract, also while redelivering and reordering."""
    check_source(lambda: MemorySource({"a": list(range(12)), "b": [], "c": ["x"]}))
    check_source(lambda: MemorySource({"a": list(range(40))}, redeliver_rate=0.4,
                                      reorder_rate=0.3, stall_rate=0.2,
                                      rng=random.Random(7)))


def test_jsonlines_sources_pass_check_source(tmp_path: Path) -> None:
    """JsonLines and JsonLinesDir keep the source contract, blank lines and a partial line
    included."""
    single = _lines(tmp_path / "one.jsonl", 9, blank_every=4)
    with single.open("a") as f:
        f.write('{"partial": ')
    check_source(lambda: JsonLines(single))
    folder = tmp_path / "dir"
    folder.mkdir()
    for n in (0, 1, 7):
        _lines(folder / f"part{n}.jsonl", n)
    check_source(lambda: JsonLinesDir(str(folder / "*.jsonl")))


class _Skipping(MemorySource):
    """Never delivers the record at position 3."""

    def open(self, partition: str, position: Any, *, follow: bool) -> Any:
        reader = super().open(partition, position, follow=follow)
        real = reader.read

        def read(max_records: int) -> Batch | None:
            if reader.position == 3:
                reader.position = 4
            return real(max_records)

        reader.read = read  # type: ignore[method-assign]
        return reader


def test_check_source_catches_a_source_that_skips_records() -> None:
    """check_source fails on a source whose batches skip a record."""
    with pytest.raises(AssertionError, match="records were skipped"):
        check_source(lambda: _Skipping({"a": list(range(10))}, max_batch=1))


# -- sinks -------------------------------------------------------------------------------


@pytest.mark.parametrize("guarantee", ["exactly-once", "at-least-once"])
def test_memory_sink_passes_check_sink(guarantee: Any) -> None:
    """MemorySink keeps the sink contract under both guarantees."""
    def make() -> SinkFixture:
        sink = MemorySink()
        return SinkFixture(sink=sink, read=lambda: sink.output() if sink.tasks() else [],
                           guarantee=guarantee)
    check_sink(make)


@pytest.mark.parametrize("guarantee", ["exactly-once", "at-least-once"])
def test_jsonlines_sink_passes_check_sink(fresh_path: Callable[[str], Path],
                                          guarantee: Any) -> None:
    """JsonLinesSink keeps the sink contract under both guarantees."""
    def make() -> SinkFixture:
        path = fresh_path(".jsonl")
        return SinkFixture(sink=JsonLinesSink(path), read=lambda: read_jsonl(path),
                           guarantee=guarantee)
    check_sink(make)


def test_jsonlines_sink_unkeyed_passes_check_sink(fresh_path: Callable[[str], Path]) -> None:
    """JsonLinesSink keeps the sink contract on a stream without keys."""
    def make() -> SinkFixture:
        path = fresh_path(".jsonl")
        return SinkFixture(sink=JsonLinesSink(path), read=lambda: read_jsonl(path, keyed=False),
                           keyed=False)
    check_sink(make)


@pytest.mark.parametrize("same_db", [False, True])
def test_sqlite_table_passes_check_sink(fresh_path: Callable[[str], Path],
                                        same_db: bool) -> None:
    """SQLiteTable keeps the sink contract in its own database and in the store's."""
    def make() -> SinkFixture:
        path = fresh_path(".db")
        store = SQLiteStore(path) if same_db else MemoryStore()
        return SinkFixture(sink=SQLiteTable(path, table="totals"),
                           read=lambda: read_table(path, "totals"), store=store)
    check_sink(make)


def test_stdout_passes_check_sink_at_least_once() -> None:
    """Stdout keeps the at-least-once sink contract: nothing committed is lost."""
    def make() -> SinkFixture:
        stream = io.StringIO()

        def read() -> list[Any]:
            return [[d["key"], d["value"]] for d in map(json.loads, stream.getvalue().split())]

        return SinkFixture(sink=Stdout(stream), read=read, guarantee="at-least-once")
    check_sink(make)


class _AppendingSink(MemorySink):
    """Finalize appends a new slot each time: not idempotent."""

    def _apply(self, task: str, seq: int, payload: bytes) -> None:
        slots = self._visible[task]
        super()._apply(task, seq + 1000 * len(slots), payload)


def test_check_sink_catches_a_finalize_that_is_not_idempotent() -> None:
    """check_sink fails on a sink whose finalize appends again when redone."""
    def make() -> SinkFixture:
        sink = _AppendingSink()
        return SinkFixture(sink=sink, read=lambda: sink.output() if sink.tasks() else [])
    with pytest.raises(AssertionError, match="each once"):
        check_sink(make)


class _EagerSink(MemorySink):
    """Makes output visible at pre-commit, before the commit point."""

    def open(self, ctx: Any) -> Any:
        writer = super().open(ctx)
        real = writer.precommit

        def precommit(seq: int) -> Any:
            pre = real(seq)
            if pre.staged is not None:
                self._apply(ctx.task, seq, pre.staged.payload)
            return pre

        writer.precommit = precommit  # type: ignore[method-assign]
        return writer


def test_check_sink_catches_output_visible_before_the_commit_point() -> None:
    """check_sink fails on an exactly-once sink that shows output before its commit point."""
    def make() -> SinkFixture:
        sink = _EagerSink()
        return SinkFixture(sink=sink, read=lambda: sink.output() if sink.tasks() else [])
    with pytest.raises(AssertionError, match="before its commit point"):
        check_sink(make)
