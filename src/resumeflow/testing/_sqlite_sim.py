"""Simulated schedules on the real embedded backends: ``SQLiteStore`` and the file and table sinks.

``SQLiteSchedule`` runs the fault plans of the memory ``Schedule`` against a ``SQLiteStore``
in a temporary directory, with a ``JsonLinesSink`` (exactly-once or at-least-once) or a
``SQLiteTable`` (in the store's database: one transaction; or in a database of its own:
staged, applied after the commit point) for output, a ``JsonLinesSink`` for dead letters and
a ``MemorySource`` for input. Every runner stands for a process: it opens its own
``SQLiteStore`` object on the database file; when it crashes it is dropped with that object
and never used again, and the restarted task opens a new one. A takeover opens a second
runner on a second store object while the first goes on as a zombie: the store must refuse
its commits with ``FencedError``, and its late finalize must add no output.

Faults, drawn from the plan as for the memory backends:

* crashes at every crash point (the installed hook raises ``SimulatedCrash``) and in user
  code. The dead process's store object is then closed (its compactor finishes what it
  committed), abandoned (no compaction is started), or killed in a compaction run after its
  first transaction (the next open must roll the run back): recovery must not depend on
  which;
* failed store writes (the commit's transaction fails after its rows are written and is
  rolled back) and slow ones (the fake clock moves);
* a torn newest commit record: the commit lands, the process dies, and between runs the
  bytes of the newest row of ``commits`` are edited (cut short, a byte made invalid, or a
  digit of the digest changed); the next open must fall back to the record before. Also
  when a task's owner crashes later (its checkpoint's output may be finalized by then): its
  newest record, if it wrote it, is torn before the task restarts;
* sink pre-commit and finalize failures (``UnavailableError`` at the sink's boundary);
* redelivered, reordered and stalled input.

No takeover is drawn at ``sink.finalize.partial``: the JSON-lines writer holds its file's
lock there, so a new owner would wait for the append to complete (a takeover there is one
at ``commit.after_finalize``, which is drawn).

Determinism: the events and the outcome of a seed must not depend on when the store's
background compactor runs. ``SQLiteBackend(compaction="eager")`` compacts after every commit
in the committing thread instead; the test suite checks both give the same fingerprints.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast

from ..checkpoint import CommitRecord, OpenedTask, SQLiteStore, StagedEntry
from ..checkpoint._sqlite_state import compact
from ..checkpoint._store import InStoreWrite
from ..errors import ConfigurationError, UnavailableError
from ..runtime import TaskRunner
from ..runtime._task import DeferredCommitExecutor
from ..sinks import JsonLinesSink, Precommit, Sink, SinkContext, SinkWriter, SQLiteTable
from ._check import Outcome
from ._clock import FakeClock
from ._crash import SimulatedCrash
from ._observe import Violation
from ._plan import FaultPlan
from ._sim import BuildFlow, FaultySink, FaultyStore, Schedule
from ._sink import MemorySink
from ._source import MemorySource
from ._sqlite_read import expected_rows, read_outcome
from ._store import MemoryStore

__all__ = ["SINK_KINDS", "SQLiteBackend", "SQLiteSchedule"]

SinkKind = Literal["jsonl", "table", "table-other-db"]

SINK_KINDS: tuple[SinkKind, ...] = ("jsonl", "table", "table-other-db")
"""Output sinks of the SQLite backend: ``JsonLinesSink`` (one file per task), ``SQLiteTable``
in the store's database, ``SQLiteTable`` in a database of its own (one table per task)."""


@dataclass(frozen=True, kw_only=True)
class SQLiteBackend:
    """Run simulated schedules on ``SQLiteStore`` and real sinks in a temporary directory.

    Attributes:
        sink: the output sink (one of ``SINK_KINDS``); ``None``: drawn from each seed among
            those the flow can use (tables need a keyed stream).
        compaction: ``"thread"``: the store's background compactor, as in production;
            ``"eager"``: also compact after every commit in the committing thread (a timing
            the thread may produce; events and outcome must be the same).
        directory: where each schedule makes its temporary directory (default: ``/dev/shm``
            when there is one, so fsyncs cost nothing; else the system's temporary directory).
        keep_files: leave each schedule's directory in place (to inspect a replay).
    """

    sink: SinkKind | None = None
    compaction: Literal["thread", "eager"] = "thread"
    directory: str | None = None
    keep_files: bool = False

    def resolve(self, seed: int, build_flow: BuildFlow) -> SQLiteBackend:
        """This backend with its sink drawn from ``seed`` if not set; fails at once on a table
        sink for a flow that is not keyed."""
        keyed = build_flow(MemorySource({"0": []}), MemorySink()).keyed
        if self.sink is None:
            kinds = SINK_KINDS if keyed else SINK_KINDS[:1]
            return replace(self, sink=random.Random(seed * 7919 + 3).choice(kinds))
        if self.sink not in SINK_KINDS:
            raise ConfigurationError(f"sink {self.sink!r} is unknown; use one of {SINK_KINDS}")
        if self.sink != "jsonl" and not keyed:
            raise ConfigurationError(
                f"sink {self.sink!r} upserts by key but the flow is not keyed; use 'jsonl'")
        return self

    def describe(self) -> str:
        """``sqlite`` with the sink and compaction, e.g. ``sqlite (sink jsonl, thread)``."""
        return f"sqlite (sink {self.sink or 'drawn'}, compaction {self.compaction})"


def _default_directory() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


class _SimStore(SQLiteStore):
    """One process's own ``SQLiteStore`` object on the shared file, with injectable faults.

    Attributes:
        fail_writes: the next this-many commits fail inside their transaction (rolled back).
        slow_write_s: simulated seconds each commit takes.
        tear_next: the next commit lands, then the process dies and its record is torn.
        torn: ``(task, seq)`` of the record the simulator must tear before the next open.
        last_commit: ``(task, seq)`` of the last commit this object made.
    """

    def __init__(self, path: Path, *, keep_checkpoints: int, clock: FakeClock,
                 eager: bool) -> None:
        super().__init__(path, keep_checkpoints=keep_checkpoints, compactor="thread")
        self.clock = clock
        self.fail_writes = 0
        self.slow_write_s = 0.0
        self.tear_next = False
        self.torn: tuple[str, int] | None = None
        self.last_commit: tuple[str, int] | None = None
        self._eager = eager
        self._committed: dict[int, int] = {}
        """Epoch of each task this object committed (``die_compacting`` compacts them)."""

    def commit(self, opened: OpenedTask, record: CommitRecord,
               delta: Sequence[tuple[bytes, bytes | None]], staged: Sequence[StagedEntry],
               release: Sequence[tuple[str, int]], in_store: Sequence[InStoreWrite] = ()) -> None:
        if self.slow_write_s:
            self.clock.advance(self.slow_write_s)
        tear, self.tear_next = self.tear_next, False
        super().commit(opened, record, delta, staged, release, in_store)
        self._committed[opened.task_no] = opened.epoch
        self.last_commit = (opened.task, record.seq)
        if self._eager:
            self.compact(opened.task)
        if tear:
            self.torn = (opened.task, record.seq)
            raise SimulatedCrash(f"died after commit seq {record.seq} of {opened.task!r}; its "
                                 "record will be torn")

    def _write(self, db: sqlite3.Connection, *args: Any, **kwargs: Any) -> None:
        super()._write(db, *args, **kwargs)
        if self.fail_writes > 0:
            self.fail_writes -= 1
            raise UnavailableError("injected: the disk failed the commit's write (rolled "
                                   "back); retry")

    def abandon(self) -> None:
        """Close as a killed process would leave it: start no compaction (one running ends;
        a clean close starts none either)."""
        self._committed.clear()
        self.close()

    def die_compacting(self) -> None:
        """Close as a process killed inside a compaction run: let the compactor finish what
        it has, then start a run of each task this object committed and kill it after the
        run's first transaction (its undo images and rows are written, not its end)."""
        committed = dict(self._committed)
        self._committed.clear()
        self._compactor.close()
        for task_no, epoch in committed.items():
            db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            try:
                compact(db, task_no, epoch, self._recent,
                        cast(threading.Lock, _DiesAfterOneWrite()))
            except SimulatedCrash:
                pass
            finally:
                db.close()
        self.close()


class _DiesAfterOneWrite:
    """The write lock of a compaction run that kills the process at its second write
    transaction (before the run's end when it has one chunk of keys)."""

    def __init__(self) -> None:
        self.writes_left = 1

    def __enter__(self) -> None:
        if self.writes_left <= 0:
            raise SimulatedCrash("killed inside a compaction run")
        self.writes_left -= 1

    def __exit__(self, *exc: object) -> None:
        return None


class _FlakySink:
    """A real sink whose next pre-commits and finalizes can be made to fail (transiently)."""

    def __init__(self, inner: Sink) -> None:
        self.inner = inner
        self.name = inner.name
        self.fail_precommits = 0
        self.fail_finalizes = 0

    def open(self, ctx: SinkContext) -> SinkWriter:
        return _FlakyWriter(self, self.inner.open(ctx))

    def fail(self, what: str) -> None:
        if what == "precommit" and self.fail_precommits > 0:
            self.fail_precommits -= 1
        elif what == "finalize" and self.fail_finalizes > 0:
            self.fail_finalizes -= 1
        else:
            return
        raise UnavailableError(f"sink {self.name!r}: injected {what} failure; retry")


class _FlakyWriter:
    def __init__(self, sink: _FlakySink, inner: SinkWriter) -> None:
        self.sink = sink
        self.inner = inner
        self.buffer = inner.buffer

    def recover(self, meta: dict[str, Any] | None, staged: Sequence[StagedEntry]) -> None:
        if staged:
            self.sink.fail("finalize")
        self.inner.recover(meta, staged)

    def spill(self) -> int:
        spill = getattr(self.inner, "spill", None)
        return int(spill()) if spill is not None else 0

    def precommit(self, seq: int) -> Precommit:
        self.sink.fail("precommit")
        return self.inner.precommit(seq)

    def cut(self, seq: int) -> Callable[[], Precommit]:
        cut = getattr(self.inner, "cut", None)
        if cut is None:
            pre = self.precommit(seq)
            return lambda: pre
        stage = cut(seq)

        def precommit() -> Precommit:
            self.sink.fail("precommit")
            return cast(Precommit, stage())
        return precommit

    def finalize(self, seq: int) -> None:
        self.sink.fail("finalize")
        self.inner.finalize(seq)

    def releasable(self) -> int | None:
        return self.inner.releasable()

    def close(self) -> None:
        self.inner.close()


def table_name(partition: str) -> str:
    """The output table of the task that reads ``partition``."""
    return "out_" + re.sub(r"[^A-Za-z0-9_]", "_", partition)


class _TablePerTask:
    """``SQLiteTable`` with one table per task (tasks of one table would race on its keys)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"sqlite:{path}:out_*"

    def open(self, ctx: SinkContext) -> SinkWriter:
        return SQLiteTable(self.path, table=table_name(ctx.partition)).open(ctx)


class SQLiteSchedule(Schedule):
    """A ``Schedule`` on ``SQLiteStore`` and real sinks; call ``cleanup()`` when done.

    Args:
        build_flow: builds the flow on the given source and sink.
        inputs: records per partition.
        plan: what to inject.
        backend: the sink and compaction timing (``backend.sink`` drawn from the seed when
            ``None``).
        trace: called with one line per event.
    """

    takeover_points = Schedule.takeover_points - {"sink.finalize.partial"}

    def __init__(self, build_flow: BuildFlow, inputs: dict[str, list[Any]], plan: FaultPlan,
                 *, backend: SQLiteBackend, trace: Callable[[str], None] | None = None) -> None:
        self.backend = backend.resolve(plan.seed, build_flow)
        self.directory = Path(tempfile.mkdtemp(prefix=f"resumeflow-sim-{plan.seed}-",
                                               dir=backend.directory or _default_directory()))
        self.database = self.directory / "store.db"
        self._stores: dict[TaskRunner, _SimStore] = {}
        try:
            super().__init__(build_flow, inputs, plan, trace=trace)
        except BaseException:
            self.cleanup()
            raise
        self._redact = str(self.directory)

    # -- backends --------------------------------------------------------------------------

    def _make_sinks(self, sink_type: type[MemorySink]) -> tuple[FaultySink, FaultySink]:
        out: Sink
        if self.backend.sink == "jsonl":
            # Odd seeds stage every checkpoint's output in a staging file, even ones in the
            # store's transaction (when small, the default).
            out = JsonLinesSink(self.directory / "out" / "{partition}.jsonl",
                                stage_in_store_max=0 if self.plan.seed % 2 else 64 * 1024)
        elif self.backend.sink == "table":
            out = _TablePerTask(self.database)
        else:
            out = _TablePerTask(self.directory / "sink.db")
        dead = JsonLinesSink(self.directory / "dead" / "{partition}.jsonl")
        return _FlakySink(out), _FlakySink(dead)

    def _make_store(self, store_type: type[MemoryStore]) -> SQLiteStore:
        # Creates the database; closed at once, so any use of the observer's own handle
        # (instead of a runner's) fails loudly.
        store = SQLiteStore(self.database, keep_checkpoints=self.plan.keep_checkpoints)
        store.close()
        return store

    def _new_runner(self, partition: str) -> TaskRunner:
        store = _SimStore(self.database, keep_checkpoints=self.plan.keep_checkpoints,
                          clock=self.clock, eager=self.backend.compaction == "eager")
        runner = TaskRunner(
            flow=self.flow, partition=partition, partitions=len(self.partitions),
            store=self.observed.over(store), config=self.config, dead_letters=self.dead,
            clock=self.clock.monotonic, wall=self.clock.time, sleep=self.clock.sleep,
            rng=random.Random(self.plan.seed), store_path=store.database_path,
            executor=DeferredCommitExecutor())
        self._stores[runner] = store
        return runner

    def _fault_stores(self, runner: TaskRunner | None) -> list[FaultyStore]:
        if runner is None:
            return list(self._stores.values())
        store = self._stores.get(runner)
        return [] if store is None else [store]

    def _retire(self, runner: TaskRunner, *, crashed: bool) -> None:
        store = self._stores.pop(runner, None)
        if store is None:
            return
        _release(runner)
        draw = self.rng.random() if crashed else 1.0
        if draw < 1 / 3:
            store.abandon()
            self._event(f"store object of {runner.task_id} abandoned")
        elif draw < 2 / 3:
            store.die_compacting()
            self._event(f"store object of {runner.task_id} killed compacting")
        else:
            store.close()
        if store.torn is not None:
            self._tear(*store.torn)
        elif (crashed and store.last_commit is not None
              and self.faulting and self.faults_left > 0
              and self.owners.get(runner.partition) is None
              and self.rng.random() < self.plan.tear_rate):
            # Nobody runs the task now (a zombie cannot commit): the record is torn at rest.
            # Seq 1 included: the task then restarts from the beginning and its sinks from
            # scratch.
            self._spend(f"torn commit record of {runner.task_id} after a crash")
            self._tear(*store.last_commit, newest_only=True)

    def _tear(self, task: str, seq: int, *, newest_only: bool = False) -> None:
        """Edit the bytes of the newest commit record of ``task``, which must be ``seq``
        (``newest_only``: else leave it)."""
        db = sqlite3.connect(self.database, isolation_level=None, timeout=30.0)
        try:
            row = db.execute(
                "SELECT c.task_no, c.seq, c.record FROM commits c JOIN tasks t ON "
                "t.task_no = c.task_no WHERE t.task = ? ORDER BY c.seq DESC LIMIT 1",
                (task,)).fetchone()
            if (row is None or row[1] != seq) and newest_only:
                return
            if row is None or row[1] != seq:
                self.violations.append(Violation(kind="error", task=task, detail=(
                    f"commit seq {seq} landed but the newest record is "
                    f"{'none' if row is None else row[1]}")))
                return
            torn, how = _damage(bytes(row[2]), self.rng)
            db.execute("UPDATE commits SET record = ? WHERE task_no = ? AND seq = ?",
                       (torn, row[0], seq))
        finally:
            db.close()
        self._event(f"tore commit record seq {seq} of {task}: {how}")

    # -- results ---------------------------------------------------------------------------

    def outcome(self) -> tuple[Outcome, list[Violation]]:
        out: Path | tuple[Path, Callable[[str], str]] = self.directory / "out"
        if self.backend.sink == "table":
            out = (self.database, table_name)
        elif self.backend.sink == "table-other-db":
            out = (self.directory / "sink.db", table_name)
        return read_outcome(
            database=self.database, tasks=self.task_of, guarantee=self.plan.guarantee,
            keyed=self.flow.keyed, observed=self.observed,
            keep_checkpoints=self.plan.keep_checkpoints, out=out,
            dead_files=self.directory / "dead")

    def expected(self, reference: Outcome) -> Outcome:
        if self.backend.sink == "jsonl":
            return reference
        return replace(reference, output={task: expected_rows(items)
                                          for task, items in reference.output.items()})

    def cleanup(self) -> None:
        """Remove the schedule's directory (unless the backend keeps files)."""
        for runner in list(self._stores):
            self._retire(runner, crashed=False)
        if not self.backend.keep_files:
            shutil.rmtree(self.directory, ignore_errors=True)


def _release(runner: TaskRunner) -> None:
    """Close the files and connections a runner's process held, as the OS does at its end."""
    reader = getattr(runner, "reader", None)
    if reader is not None:
        reader.close()
    for writer in getattr(runner, "writers", {}).values():
        writer.close()


def _damage(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """``raw`` damaged so that it can never verify, and how."""
    how = rng.choice(["cut", "byte", "digest"])
    at = raw.find(b'"digest":"')
    if how == "digest" and at >= 0:
        i = at + len(b'"digest":"') + rng.randrange(64)
        old = raw[i:i + 1]
        new = b"0" if old != b"0" else b"1"
        return raw[:i] + new + raw[i + 1:], f"digit {i} of its digest changed"
    if how == "byte":
        i = rng.randrange(len(raw))
        return raw[:i] + b"\xff" + raw[i + 1:], f"byte {i} of {len(raw)} made 0xff"
    cut = rng.randrange(len(raw))
    return raw[:cut], f"cut to {cut} of {len(raw)} bytes"
