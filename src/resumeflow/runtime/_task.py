"""One task: a source partition, its keyed state and its sink transactions.

Once ``commit()`` returns, every record before the committed position has its effect in the
store's state and in the sinks' committed output exactly once (at-least-once sinks: at least
once); a crash at any point before that replays from the previous checkpoint, and a crash
after it (during finalize) is completed by the next ``open()``. Records are never read more
than ``replay_max_events`` past the last checkpoint.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from .._faults import crash_point
from ..checkpoint import GENESIS_DIGEST, CommitRecord, OpenedTask, StagedEntry, Store, make_record
from ..errors import (
    CorruptCheckpointError,
    FencedError,
    InternalError,
    UnavailableError,
    invariant,
)
from ..flow import Flow, build_chain, rollback
from ..flow._compile import Undo
from ..sinks import Precommit, Sink, SinkContext, SinkWriter
from ..sources import Batch, SourceReader
from ..state import KeyedState
from ._config import RunConfig
from ._progress import ProgressMarks

__all__ = ["Recovery", "TaskRunner"]

log = logging.getLogger("resumeflow.runtime")

OUT = "out"
DEAD = "dead"

_NOT_USER_ERRORS = (UnavailableError, CorruptCheckpointError, FencedError, InternalError)
"""Failures of the store or of resumeflow itself: they restart the task, never dead-letter."""


@dataclass(frozen=True, kw_only=True)
class Recovery:
    """What opening a task found and did; logged as one line per task."""

    task: str
    epoch: int
    seq: int
    age_s: float | None
    positions: dict[str, Any]
    state_keys: int
    replay_bound: int | float
    to_replay: int | None
    discarded_seqs: tuple[int, ...]
    open_s: float

    def line(self) -> str:
        if self.seq == 0:
            origin = "no checkpoint: starting from the beginning"
        else:
            origin = f"checkpoint seq {self.seq} (age {self.age_s:.1f} s)"
        if self.discarded_seqs:
            origin += f", after discarding corrupt seq {list(self.discarded_seqs)}"
        replay = "unknown" if self.to_replay is None else str(self.to_replay)
        return (
            f"recovered task {self.task} epoch {self.epoch} from {origin}; positions "
            f"{self.positions}; replay bound {self.replay_bound} records, replaying {replay}; "
            f"{self.state_keys} state keys (opened lazily); ready in {self.open_s * 1e3:.1f} ms"
        )


class TaskRunner:
    """Runs one partition through the flow and checkpoints it."""

    def __init__(self, *, flow: Flow, partition: str, partitions: int, store: Store,
                 config: RunConfig, dead_letters: Sink, marks: ProgressMarks | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None, store_path: Any = None) -> None:
        self.flow = flow
        self.source = flow.source_
        self.partition = partition
        self.task_id = f"{flow.name}:{self.source.name}:{partition}"
        self._partitions = partitions
        self.store = store
        self.config = config
        self._dead_sink = dead_letters
        self._marks = marks
        self._clock = clock
        self._wall = wall
        self._sleep = sleep
        self._rng = rng or random.Random(config.seed)
        self._store_path = store_path
        self._undo: Undo = []
        self.window_events = 0
        self.window_started: float | None = None
        self.records_replayed = 0
        self.records_redelivered = 0
        """Records the source delivered again below the position, dropped unprocessed."""
        self.first_record_s: float | None = None
        self._opened_at = 0.0
        self._batch_size = min(256, config.batch_max_records)

    # -- RECOVERING ------------------------------------------------------------------------

    def open(self) -> Recovery:
        """Take the task, finalize its last checkpoint again and seek to its positions."""
        started = self._clock()
        self._opened_at = started
        self.opened: OpenedTask = self.store.open_task(self.task_id)
        record = self.opened.record
        self.seq = record.seq if record else 0
        self.digest = record.digest if record else GENESIS_DIGEST
        self.stats: dict[str, int] = dict(record.stats) if record else {}
        self.positions: dict[str, Any] = dict(record.positions) if record else {}
        self.states = self._open_states()
        self.writers = self._open_sinks(record)
        self.reader: SourceReader = self.source.open(
            self.partition, self.positions.get(self.partition), follow=self.config.follow)
        self._next_position = self.reader.position
        emit = self.writers[OUT].buffer.append
        self._chain = build_chain(self.flow.operators, emit, self.states, self._undo,
                                  emit_can_fail=False)
        self._replay_until = self._replay_mark()
        to_replay: int | None = None
        if self._marks is not None:
            to_replay = 0 if self._replay_until is None else self._count_replay_ahead()
        recovery = Recovery(
            task=self.task_id, epoch=self.opened.epoch, seq=self.seq,
            age_s=(self._wall() - record.created_at) if record else None,
            positions=dict(self.positions), state_keys=sum(s.keys for s in self.states.values()),
            replay_bound=self.config.replay_max_events,
            to_replay=to_replay,
            discarded_seqs=self.opened.discarded_seqs, open_s=self._clock() - started)
        return recovery

    def _open_states(self) -> dict[str, KeyedState]:
        load = partial(self.store.load_state, self.opened.task_no)
        return {
            op.name: KeyedState(load, namespace=op.name, max_hot_keys=self.config.max_hot_keys,
                                keys_committed=self.stats.get(f"keys:{op.name}", 0),
                                known_empty=self.opened.record is None
                                or self.stats.get(f"keys:{op.name}", -1) == 0)
            for op in self.flow.operators if op.stateful
        }

    def _open_sinks(self, record: CommitRecord | None) -> dict[str, SinkWriter]:
        writers: dict[str, SinkWriter] = {}
        for sink_id, sink, keyed in ((OUT, self.flow.sink_, self.flow.keyed),
                                     (DEAD, self._dead_sink, False)):
            ctx = SinkContext(sink_id=sink_id, task=self.task_id, partition=self.partition,
                              partitions=self._partitions, keyed=keyed,
                              guarantee=self.config.guarantee, store_path=self._store_path,
                              epoch=self.opened.epoch,
                              from_scratch=record is None and bool(self.opened.discarded_seqs))
            writer = sink.open(ctx)
            meta = record.sink_txn.get(sink_id) if record else None
            writer.recover(meta, [e for e in self.opened.staged if e.sink == sink_id])
            writers[sink_id] = writer
        return writers

    def _replay_mark(self) -> int | None:
        if self._marks is None:
            return None
        mark = self._marks.read(self.opened.task_no)
        committed = self.positions.get(self.partition) or 0
        if not isinstance(mark, dict):
            return None
        reached = mark.get(self.partition)
        if isinstance(reached, int) and isinstance(committed, int) and reached > committed:
            return reached
        return None

    def _count_replay_ahead(self) -> int:
        """Records between the checkpoint and the crashed run's progress mark."""
        limit = self._replay_until
        if limit is None:
            return 0
        count = 0
        probe = self.source.open(self.partition, self.positions.get(self.partition),
                                 follow=True)
        try:
            while True:
                batch = probe.read(self.config.batch_max_records)
                if batch is None:
                    break
                if batch.end <= limit:
                    count += len(batch.items)
                    if batch.end == limit:
                        break
                    continue
                count += _count_before(batch, limit)
                break
        finally:
            probe.close()
        return count

    # -- RUNNING ---------------------------------------------------------------------------

    @property
    def at_end(self) -> bool:
        return self.reader.at_end

    def step(self) -> int:
        """Read and process one batch; returns the number of records read."""
        room = self.config.replay_max_events - self.window_events
        invariant(room > 0, f"{self.task_id}: replay window full without a commit")
        batch = self.reader.read(int(min(self._batch_size, room)))
        if batch is None:
            return 0
        if batch.start < self._next_position:
            batch = self._drop_redelivered(batch)
            if batch is None:
                return 0
        began = self._clock()
        if self.window_started is None:
            self.window_started = began
        self._process(batch)
        n = len(batch.items)
        self.window_events += n
        self.stats["records_in"] = self.stats.get("records_in", 0) + n
        self._count_replayed(batch)
        self.positions[self.partition] = batch.end
        self._next_position = batch.end
        if self._marks is not None:
            self._marks.write(self.opened.task_no, self.positions)
        now = self._clock()
        if self.first_record_s is None and n:
            self.first_record_s = now - self._opened_at
        self._adapt_batch(n, now - began)
        crash_point("batch.mid")
        return n

    def _drop_redelivered(self, batch: Batch) -> Batch | None:
        """Drop the records of ``batch`` below the task's position (an at-least-once source
        delivered them again, or out of order); ``None`` when nothing new is left."""
        items, expected = batch.items, self._next_position
        if batch.end <= expected:
            self.records_redelivered += len(items)
            return None
        skip = _count_before(batch, expected)
        self.records_redelivered += skip
        locate = batch.locate
        return Batch(items=items[skip:], start=locate(skip) if skip < len(items) else batch.end,
                     end=batch.end, locate=lambda i: locate(i + skip))

    def _adapt_batch(self, n: int, spent: float) -> None:
        """Keep one batch well inside the time bound, whatever a record costs."""
        if n == 0:
            return
        per_record = spent / n
        budget = self.config.replay_max_seconds / 4
        if per_record <= 0 or budget / per_record >= self.config.batch_max_records:
            size = self.config.batch_max_records
        else:
            size = int(budget / per_record)
        self._batch_size = max(1, min(self.config.batch_max_records, size))

    def _count_replayed(self, batch: Batch) -> None:
        limit = self._replay_until
        if limit is None:
            return
        if batch.end <= limit:
            self.records_replayed += len(batch.items)
        else:
            self.records_replayed += _count_before(batch, limit)
        if batch.end >= limit:
            self._replay_until = None

    def _process(self, batch: Batch) -> None:
        items = batch.items
        i, n = 0, len(items)
        while i < n:
            i, failure = self._run(items, i)
            if failure is not None:
                self._recover_record(batch, i, failure)
                i += 1

    def _run(self, items: Any, start: int) -> tuple[int, BaseException | None]:
        decode = self.source.decode
        chain = self._chain
        undo = self._undo
        buffer = self.writers[OUT].buffer
        i = start
        mark = len(buffer)
        try:
            for raw in (items[start:] if start else items):
                mark = len(buffer)
                chain(decode(raw))
                if undo:
                    undo.clear()
                i += 1
        except _NOT_USER_ERRORS:
            raise
        except Exception as exc:
            rollback(undo)
            del buffer[mark:]
            return i, exc
        return i, None

    def _recover_record(self, batch: Batch, index: int, failure: BaseException) -> None:
        """Retry a failed record with backoff, then dead-letter it."""
        raw = batch.items[index]
        try:
            self.source.decode(raw)
        except Exception as exc:
            self._dead_letter(batch, index, exc, attempts=1, kind="bad-record")
            return
        buffer = self.writers[OUT].buffer
        attempts = 1
        while attempts < self.config.max_attempts:
            self._sleep(self._backoff(attempts))
            attempts += 1
            mark = len(buffer)
            try:
                self._chain(self.source.decode(raw))
                self._undo.clear()
                return
            except _NOT_USER_ERRORS:
                raise
            except Exception as exc:
                rollback(self._undo)
                del buffer[mark:]
                failure = exc
        self._dead_letter(batch, index, failure, attempts=attempts, kind="poison")

    def _backoff(self, attempt: int) -> float:
        cap = min(self.config.retry_backoff_max_s,
                  self.config.retry_backoff_base_s * (2 ** (attempt - 1)))
        return self._rng.uniform(0, cap)

    def _dead_letter(self, batch: Batch, index: int, exc: BaseException, *, attempts: int,
                     kind: str) -> None:
        raw = batch.items[index]
        position = batch.locate(index)
        record = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else repr(raw)
        entry = {
            "task": self.task_id, "source": self.source.name, "partition": self.partition,
            "position": position, "kind": kind, "attempts": attempts,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(traceback.format_exception(exc)), "record": record,
            "at": self._wall(),
        }
        self.writers[DEAD].buffer.append(entry)
        self.stats["dead_letters"] = self.stats.get("dead_letters", 0) + 1
        log.error("dead-lettered record of source %r partition %r at position %r after %d "
                  "attempt(s): %s: %s", self.source.name, self.partition, position, attempts,
                  type(exc).__name__, exc)

    # -- PRECOMMIT -> COMMITTED -> FINALIZED -------------------------------------------------

    def commit_due(self) -> bool:
        """True when the replay window reached its event or time bound."""
        if self.window_events >= self.config.replay_max_events:
            return True
        started = self.window_started
        return started is not None and \
            self._clock() - started >= self.config.replay_max_seconds

    def has_uncommitted(self) -> bool:
        return self.window_started is not None

    def commit(self) -> CommitRecord:
        """Checkpoint everything read so far; returns the durable commit record."""
        seq = self.seq + 1
        crash_point("commit.before_precommit")
        pre = self._precommit_sinks(seq)
        crash_point("commit.after_precommit")
        delta = self._take_delta()
        record = self._make_record(seq, pre)
        self._write_commit(record, delta, pre)
        crash_point("commit.after_store")
        self._finalize(seq)
        crash_point("commit.after_finalize")
        for state in self.states.values():
            state.evict()
        return record

    def _precommit_sinks(self, seq: int) -> dict[str, Precommit]:
        self.stats["records_out"] = (self.stats.get("records_out", 0)
                                     + len(self.writers[OUT].buffer))
        return {sink_id: writer.precommit(seq) for sink_id, writer in self.writers.items()}

    def _take_delta(self) -> list[tuple[bytes, bytes | None]]:
        delta: list[tuple[bytes, bytes | None]] = []
        for name, state in self.states.items():
            delta.extend(state.take_delta())
            self.stats[f"keys:{name}"] = state.keys
        return delta

    def _make_record(self, seq: int, pre: dict[str, Precommit]) -> CommitRecord:
        return make_record(
            task=self.task_id, epoch=self.opened.epoch, seq=seq, positions=dict(self.positions),
            sink_txn={k: p.meta for k, p in pre.items() if p.meta is not None}, inflight=[],
            created_at=self._wall(), stats=dict(self.stats), prev_digest=self.digest)

    def _write_commit(self, record: CommitRecord, delta: list[tuple[bytes, bytes | None]],
                      pre: dict[str, Precommit]) -> None:
        """The commit point: one atomic, epoch-checked write of the store."""
        staged: list[StagedEntry] = [p.staged for p in pre.values() if p.staged is not None]
        in_store = [p.in_store for p in pre.values() if p.in_store is not None]
        release: list[tuple[str, int]] = []
        for sink_id, writer in self.writers.items():
            done = writer.releasable()
            if done is not None:
                release.append((sink_id, done))
        self.store.commit(self.opened, record, delta, staged, release, in_store)
        self.seq = record.seq
        self.digest = record.digest
        self.window_events = 0
        self.window_started = None

    def _finalize(self, seq: int) -> None:
        for writer in self.writers.values():
            writer.finalize(seq)

    def close(self) -> None:
        """Release the source and sinks; uncommitted work is replayed by the next owner."""
        self.reader.close()
        for writer in self.writers.values():
            writer.close()


def _count_before(batch: Batch, limit: Any) -> int:
    """How many records of ``batch`` start before position ``limit`` (binary search)."""
    lo, hi = 0, len(batch.items)
    while lo < hi:
        mid = (lo + hi) // 2
        if batch.locate(mid) < limit:
            lo = mid + 1
        else:
            hi = mid
    return lo
