"""One task: a source partition, its keyed state and its sink transactions.

Once ``commit()`` returns, every record before the committed position has its effect in the
store's state and in the sinks' committed output exactly once (at-least-once sinks: at least
once); a crash at any point before that replays from the previous checkpoint, and a crash
after it (during finalize) is completed by the next ``open()``. Records are never read more
than ``replay_max_events`` past the last durable checkpoint.

Pipelined commit: ``commit_async()`` takes the checkpoint's cut on the calling thread (the
state delta encoded, positions and stats copied, each sink's buffer detached) and hands the
writes (sink pre-commit, the store's commit point, finalize) to a ``CommitExecutor`` while
the next batches run. At most one commit is in flight per task: the next cut, a full replay
window and ``commit()`` wait for it, and its failure is raised on the calling thread as the
same exception the synchronous path raises.
"""

from __future__ import annotations

import gc
import logging
import random
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

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

__all__ = [
    "CommitExecutor",
    "DeferredCommitExecutor",
    "InlineCommitExecutor",
    "PendingCommit",
    "Recovery",
    "TaskRunner",
    "ThreadCommitExecutor",
]

log = logging.getLogger("resumeflow.runtime")

OUT = "out"
DEAD = "dead"

_NOT_USER_ERRORS = (UnavailableError, CorruptCheckpointError, FencedError, InternalError)
"""Failures of the store or of resumeflow itself: they restart the task, never dead-letter."""


_TIMINGS_KEPT = 100_000
"""Commit timings a task keeps (the most recent)."""

CommitJob = Callable[[], CommitRecord]
"""The writes of one checkpoint after its cut: sink pre-commit, commit point, finalize."""


class PendingCommit(Protocol):
    """A commit handed to an executor."""

    def done(self) -> bool:
        """True once the commit ended (durable, or failed); never blocks."""
        ...

    def result(self) -> CommitRecord:
        """Wait for the commit; its durable record, or the exception it raised."""
        ...


class CommitExecutor(Protocol):
    """Where a task's commits run. A task submits at most one commit at a time and waits
    for it (``result()``) before it submits the next."""

    def submit(self, job: CommitJob) -> PendingCommit:
        ...

    def close(self) -> None:
        """Release the executor (after the task waited for its last commit)."""
        ...


class _Done:
    """A commit that already ran."""

    def __init__(self, job: CommitJob) -> None:
        self._record: CommitRecord | None = None
        self._error: BaseException | None = None
        try:
            self._record = job()
        except BaseException as exc:  # handed to result(), on the task's thread
            self._error = exc

    def done(self) -> bool:
        return True

    @property
    def failed(self) -> bool:
        return self._error is not None

    def result(self) -> CommitRecord:
        if self._error is not None:
            raise self._error
        assert self._record is not None
        return self._record


class InlineCommitExecutor:
    """Runs each commit at once on the calling thread: the synchronous commit path."""

    def submit(self, job: CommitJob) -> PendingCommit:
        return _Done(job)

    def close(self) -> None:
        return None


class _Deferred:
    def __init__(self, job: CommitJob) -> None:
        self._job: CommitJob | None = job
        self._ran: _Done | None = None

    def run(self) -> None:
        if self._job is not None:
            job, self._job = self._job, None
            self._ran = _Done(job)

    def done(self) -> bool:
        return self._ran is not None

    def result(self) -> CommitRecord:
        self.run()
        assert self._ran is not None
        return self._ran.result()


class DeferredCommitExecutor:
    """Keeps a submitted commit until ``run_pending()`` or until the task waits for it, then
    runs it on the calling thread: deterministic overlap of a commit with the batches read
    after its cut (the seeded simulator's executor)."""

    def __init__(self) -> None:
        self._pending: _Deferred | None = None

    def submit(self, job: CommitJob) -> PendingCommit:
        self._pending = _Deferred(job)
        return self._pending

    def run_pending(self) -> bool:
        """Run the commit kept, if any (its failure is raised when the task waits for it)."""
        pending, self._pending = self._pending, None
        if pending is None or pending.done():
            return False
        pending.run()
        return True

    def close(self) -> None:
        self._pending = None


_T = TypeVar("_T")


class ThreadCommitExecutor:
    """Runs a task's commits on one background thread (created on first use), so their
    fsyncs and the store's write lock overlap the next batches. Also the task's stager:
    the thread that writes a checkpoint's sink output while the cut encodes its state
    delta (``TaskRunner._cut_now``)."""

    def __init__(self, name: str = "resumeflow-commit") -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._jobs: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._wake = threading.Condition()
        self._closed = False

    def submit(self, job: Callable[[], _T]) -> Future[_T]:
        future: Future[_T] = Future()
        with self._wake:
            if self._closed:
                raise InternalError("commit submitted to a closed executor")
            self._jobs.append((job, future))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._wake.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._jobs and not self._closed:
                    self._wake.wait()
                if not self._jobs:
                    return
                job, future = self._jobs.pop(0)
            try:
                record = job()
            except BaseException as exc:  # handed to result(), on the task's thread
                future.set_exception(exc)
            else:
                future.set_result(record)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()


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
                 rng: random.Random | None = None, store_path: Any = None,
                 executor: CommitExecutor | None = None) -> None:
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
        if executor is None:
            executor = (ThreadCommitExecutor(f"resumeflow-commit {self.task_id}")
                        if config.pipelined_commit else InlineCommitExecutor())
        self._executor = executor
        self._stager = (ThreadCommitExecutor(f"resumeflow-stage {self.task_id}")
                        if isinstance(executor, ThreadCommitExecutor) else None)
        """Where a pipelined task's sinks stage a checkpoint's output, beside its delta."""
        self._prepare: Callable[[OpenedTask, int, list[tuple[bytes, bytes | None]]],
                                list[tuple[bytes, bytes | None]]] | None = \
            getattr(store, "prepare_delta", None)
        self._pending: PendingCommit | None = None
        self._inflight_events = 0
        """Records of the commit in flight: read past the last durable checkpoint, too."""
        self.commit_latency_s: deque[float] = deque(maxlen=_TIMINGS_KEPT)
        """Per recent commit, from its cut until it was durable and finalized."""
        self.commit_stall_s: deque[float] = deque(maxlen=_TIMINGS_KEPT)
        self.commits_durable = 0
        """Checkpoints of this runner known to be durable and finalized."""
        """Per recent wait for a commit in flight, how long the task's thread waited."""

    @property
    def executor(self) -> CommitExecutor:
        """Where this task's commits run."""
        return self._executor

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
        self._spill: Callable[[], int] | None = getattr(self.writers[OUT], "spill", None)
        self._spilled_out = 0
        """Output items of the window the sink already encoded (``spill``)."""
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
        # The epoch makes a cold read of a fenced owner fail instead of returning what the
        # new owner committed (which a zombie would fold its records into a second time).
        load = partial(self.store.load_state, self.opened.task_no, epoch=self.opened.epoch)
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
        if self._pending is not None and (
                self._pending.done()
                or self.window_events + self._inflight_events >= self.config.replay_max_events):
            self._join()
        room = self.config.replay_max_events - self.window_events - self._inflight_events
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
        if self._spill is not None:
            self._spilled_out += self._spill()
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
        """Records read since the last cut, or a commit still in flight."""
        return self.window_started is not None or self._pending is not None

    def commit(self) -> CommitRecord:
        """Checkpoint everything read so far and wait until it is durable and finalized;
        returns its commit record (the one in flight, when nothing was read since its cut)."""
        joined = self._join() if self._pending is not None else None
        if joined is not None and self.window_started is None:
            return joined
        self._cut()
        record = self._join()
        assert record is not None
        return record

    def commit_async(self, *, alone: bool = False) -> CommitRecord | None:
        """Cut a checkpoint of everything read so far and hand its writes to the executor;
        first waits for the commit in flight and returns its record (``None`` if there was
        none). Its failure, and a failure of this one, is raised by a later ``step()``,
        ``commit()`` or ``commit_async()``.

        ``alone``: no other task runs on the calling thread. A window that fills the whole
        replay bound then leaves nothing to overlap (the task cannot read a record until
        the commit is durable), so its writes up to the commit point run at once on this
        thread, without the hand-off to the commit thread and the two threads' turns at the
        GIL; its sinks then finalize on the commit thread while the next window is read."""
        joined = self._join() if self._pending is not None else None
        if self.window_started is not None or joined is None:
            inline = (alone and isinstance(self._executor, ThreadCommitExecutor)
                      and self.window_events >= self.config.replay_max_events)
            self._cut(inline=inline)
        return joined

    def _cut(self, *, inline: bool = False) -> None:
        """The synchronous part of a checkpoint: what it contains is fixed here; its writes
        go to the executor (``inline``: they run now, on this thread). The cyclic garbage
        collector waits meanwhile (``collector_paused``)."""
        with collector_paused():
            self._cut_now(inline=inline)

    def _cut_now(self, *, inline: bool) -> None:
        invariant(self._pending is None, f"{self.task_id}: cut with a commit in flight")
        began = self._clock()
        seq = self.seq + 1
        crash_point("commit.before_precommit")
        self.stats["records_out"] = (self.stats.get("records_out", 0) + self._spilled_out
                                     + len(self.writers[OUT].buffer))
        self._spilled_out = 0
        stages: list[tuple[str, Callable[[], Precommit]]] = []
        for sink_id, writer in self.writers.items():
            cut = getattr(writer, "cut", None)
            if cut is not None:
                stages.append((sink_id, cut(seq)))
            else:
                stages.append((sink_id, partial(_ready, writer.precommit(seq))))
        run_stages: Callable[[], dict[str, Precommit]] = partial(_run_stages, stages)
        if self._stager is not None and not all(_is_ready(stage) for _, stage in stages):
            # The sinks stage their output (a staging file's write and fsync) on the stager
            # while this thread takes the delta and the commit's thread encodes it.
            run_stages = self._stager.submit(run_stages).result
        delta = self._take_delta()
        positions = dict(self.positions)
        stats = dict(self.stats)
        self._inflight_events = self.window_events
        self.window_events = 0
        self.window_started = None
        self._cut_at = began
        if inline:
            self._pending = self._write_inline(seq, run_stages, delta, positions, stats)
        else:
            self._pending = self._executor.submit(
                partial(self._write, seq, run_stages, delta, positions, stats))

    def _write_inline(self, seq: int, run_stages: Callable[[], dict[str, Precommit]],
                      delta: list[tuple[bytes, bytes | None]], positions: dict[str, Any],
                      stats: dict[str, int]) -> PendingCommit:
        """A window that filled the replay bound: its checkpoint is made durable here (the
        task may not read a record until it is), then its sinks finalize on the commit
        thread while the next window is read (appending a window's output to a file is
        about a fifth of W1's inline commit)."""
        durable = _Done(partial(self._write_durable, seq, run_stages, delta, positions, stats))
        if durable.failed:
            return durable
        self._inflight_events = 0  # durable: no longer past the last checkpoint
        return self._executor.submit(partial(self._finish, seq, durable.result()))

    def _write(self, seq: int, run_stages: Callable[[], dict[str, Precommit]],
               delta: list[tuple[bytes, bytes | None]], positions: dict[str, Any],
               stats: dict[str, int]) -> CommitRecord:
        """The writes of checkpoint ``seq`` after its cut (on the executor)."""
        return self._finish(seq, self._write_durable(seq, run_stages, delta, positions, stats))

    def _write_durable(self, seq: int, run_stages: Callable[[], dict[str, Precommit]],
                       delta: list[tuple[bytes, bytes | None]], positions: dict[str, Any],
                       stats: dict[str, int]) -> CommitRecord:
        """Checkpoint ``seq`` up to its commit point: once this returns, it is durable."""
        if delta and self._prepare is not None:
            delta = self._prepare(self.opened, seq, delta)  # while the sinks stage
        pre = run_stages()
        crash_point("commit.after_precommit")
        record = make_record(
            task=self.task_id, epoch=self.opened.epoch, seq=seq, positions=positions,
            sink_txn={k: p.meta for k, p in pre.items() if p.meta is not None}, inflight=[],
            created_at=self._wall(), stats=stats, prev_digest=self.digest)
        self._write_commit(record, delta, pre)
        crash_point("commit.after_store")
        return record

    def _finish(self, seq: int, record: CommitRecord) -> CommitRecord:
        """After the commit point: the sinks make checkpoint ``seq``'s output visible."""
        self._finalize(seq)
        crash_point("commit.after_finalize")
        self.commit_latency_s.append(self._clock() - self._cut_at)
        return record

    def _join(self) -> CommitRecord | None:
        """Wait for the commit in flight; raises its failure (the task is then done)."""
        pending = self._pending
        if pending is None:
            return None
        began = self._clock()
        self._pending = None  # its failure is raised once, here
        record = pending.result()
        self.commits_durable += 1
        # Every durable checkpoint goes to the source as advice (a Kafka source commits it
        # to the broker), whichever call joined it: step() joins a finished commit too.
        advise = getattr(self.reader, "committed", None)
        if advise is not None:
            advise(record.positions.get(self.partition))
        self._inflight_events = 0
        self.seq = record.seq
        self.digest = record.digest
        for state in self.states.values():
            state.settle()
            state.evict()
        self.commit_stall_s.append(self._clock() - began)
        return record

    def _take_delta(self) -> list[tuple[bytes, bytes | None]]:
        delta: list[tuple[bytes, bytes | None]] = []
        for name, state in self.states.items():
            delta.extend(state.take_delta())
            self.stats[f"keys:{name}"] = state.keys
        return delta

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

    def _finalize(self, seq: int) -> None:
        for writer in self.writers.values():
            writer.finalize(seq)

    def close(self) -> None:
        """Wait for the commit in flight, then release the source and sinks; uncommitted
        work is replayed by the next owner. A failure of that commit is raised after the
        release (nothing is lost: its records are replayed)."""
        failure: BaseException | None = None
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except BaseException as exc:
                failure = exc
        self._executor.close()
        if self._stager is not None:
            self._stager.close()
        self.reader.close()
        for writer in self.writers.values():
            writer.close()
        if failure is not None:
            raise failure


_collector_lock = threading.Lock()
_collector_pauses = 0
_collector_was_on = False


@contextmanager
def collector_paused() -> Iterator[None]:
    """Hold off Python's cyclic garbage collector for the length of a checkpoint's cut.

    A cut allocates tens of thousands of small containers (the delta's tuples, its pages,
    the output's chunks) that form no cycles and die by reference counting; each of them
    counts towards the next collection, and every collection in the cut walks the window's
    young objects again (W1: its 100,000 output tuples), for several milliseconds per cut.
    Paused, the collector runs once after the cut instead. Pauses on several threads nest;
    a collector the user turned off stays off."""
    global _collector_pauses, _collector_was_on
    with _collector_lock:
        if _collector_pauses == 0:
            _collector_was_on = gc.isenabled()
            gc.disable()
        _collector_pauses += 1
    try:
        yield
    finally:
        with _collector_lock:
            _collector_pauses -= 1
            if _collector_pauses == 0 and _collector_was_on:
                gc.enable()


def _ready(pre: Precommit) -> Precommit:
    return pre


def _is_ready(stage: Callable[[], Precommit]) -> bool:
    """A sink's stage that has nothing left to do (its pre-commit ran at the cut)."""
    return isinstance(stage, partial) and stage.func is _ready


def _run_stages(stages: list[tuple[str, Callable[[], Precommit]]]) -> dict[str, Precommit]:
    """Each sink's stage of a checkpoint, in the order of the sinks."""
    return {sink_id: stage() for sink_id, stage in stages}


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
