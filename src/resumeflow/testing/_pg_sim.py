"""Simulated schedules on PostgreSQL: ``PostgresStore``, with memory or ``PostgresTable`` output.

``PostgresSchedule`` runs the fault plans of the memory ``Schedule`` against a
``PostgresStore`` in a schema of its own (dropped by ``cleanup()``), on a real server. Output
goes to a ``MemorySink`` (two-phase: its staged output lives in the PostgreSQL store's
``staged`` table until finalized) or to a ``PostgresTable`` per task (its rows are written
inside the store's commit transaction). Dead letters go to a ``MemorySink``. As on SQLite,
every runner stands for a process with its own store object (its own connections); a crashed
one is closed and never used again, and a takeover leaves the old runner as a zombie on its
own object, whose commits the store must refuse with ``FencedError``.

Faults, drawn from the plan as for the other backends: crashes at every crash point and in
user code; failed store writes (the commit transaction fails after its rows are written and
is rolled back); slow ones; torn commit records (the commit lands, the process dies, and the
newest row of ``commits`` is damaged before the next open, which must fall back); sink
failures; redelivered, reordered and stalled input.

What the run left is read back from the database (state at each task's newest checkpoint,
read in bulk and again key by key through ``load_state``: both must agree; positions; the
commit record chain; table rows) and compared with the fault-free memory reference.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

import psycopg

from .._codec import encode
from ..checkpoint import CommitRecord, OpenedTask, StagedEntry
from ..checkpoint._postgres import PostgresStore
from ..checkpoint._store import InStoreWrite
from ..errors import ConfigurationError, UnavailableError
from ..runtime import TaskRunner
from ..sinks import SinkContext, SinkWriter
from ..sinks._postgres import PostgresTable
from ._check import Outcome, _committed, compare
from ._clock import FakeClock
from ._crash import SimulatedCrash
from ._observe import Violation
from ._plan import FaultPlan
from ._sim import BuildFlow, FaultySink, FaultyStore, Schedule
from ._simulate import ScheduleResult, _reference
from ._sink import MemorySink
from ._source import MemorySource
from ._sqlite_read import _check_chain
from ._sqlite_sim import _damage, _FlakySink
from ._store import MemoryStore
from ._workload import workload

__all__ = ["PG_SINK_KINDS", "PostgresSchedule", "run_pg_seed"]

PgSinkKind = Literal["memory", "table"]

PG_SINK_KINDS: tuple[PgSinkKind, ...] = ("memory", "table")
"""``memory``: a two-phase ``MemorySink`` staging through the store; ``table``: a
``PostgresTable`` per task, written in the store's transaction."""

_schemas = iter(range(1, 1 << 62))


class _SimPgStore(PostgresStore):
    """One simulated process's store object, with the plan's store faults."""

    def __init__(self, dsn: str, *, schema: str, keep_checkpoints: int,
                 clock: FakeClock) -> None:
        super().__init__(dsn, schema=schema, keep_checkpoints=keep_checkpoints)
        self.clock = clock
        self.fail_writes = 0
        self.slow_write_s = 0.0
        self.tear_next = False
        self.torn: tuple[str, int] | None = None
        self.last_commit: tuple[str, int] | None = None

    def commit(self, opened: OpenedTask, record: CommitRecord,
               delta: Sequence[tuple[bytes, bytes | None]], staged: Sequence[StagedEntry],
               release: Sequence[tuple[str, int]], in_store: Sequence[InStoreWrite] = ()) -> None:
        if self.slow_write_s:
            self.clock.advance(self.slow_write_s)
        tear, self.tear_next = self.tear_next, False
        super().commit(opened, record, delta, staged, release, in_store)
        self.last_commit = (opened.task, record.seq)
        if tear:
            self.torn = (opened.task, record.seq)
            raise SimulatedCrash(f"died after commit seq {record.seq} of {opened.task!r}; its "
                                 "record will be torn")

    def _prune(self, conn: psycopg.Connection[Any], task_no: int, seq: int) -> None:
        super()._prune(conn, task_no, seq)  # the last write of the commit transaction
        if self.fail_writes > 0:
            self.fail_writes -= 1
            raise UnavailableError("injected: the database failed the commit's write (rolled "
                                   "back); retry")


def _table(schema: str, partition: str) -> str:
    return f"{schema}.out_" + re.sub(r"[^A-Za-z0-9_]", "_", partition)


class _TablePerTask:
    """``PostgresTable`` with one table per task (tasks of one table would race on keys)."""

    def __init__(self, dsn: str, schema: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.name = f"postgres:{schema}.out_*"

    def open(self, ctx: SinkContext) -> SinkWriter:
        return PostgresTable(self.dsn, table=_table(self.schema, ctx.partition)).open(ctx)


class PostgresSchedule(Schedule):
    """A ``Schedule`` on ``PostgresStore``; call ``cleanup()`` when done.

    Args:
        build_flow, inputs, plan, trace: as for ``Schedule``.
        dsn: the database (a schema of its own is made in it and dropped by ``cleanup``).
        sink: ``memory`` or ``table`` (``table`` needs a keyed flow).
    """

    takeover_points = Schedule.takeover_points

    def __init__(self, build_flow: BuildFlow, inputs: dict[str, list[Any]], plan: FaultPlan,
                 *, dsn: str, sink: PgSinkKind = "memory",
                 trace: Callable[[str], None] | None = None) -> None:
        if sink not in PG_SINK_KINDS:
            raise ConfigurationError(f"sink {sink!r} is unknown; use one of {PG_SINK_KINDS}")
        self.dsn = dsn
        self.sink_kind = sink
        self.schema = f"sim_{plan.seed}_{next(_schemas)}"
        self._stores: dict[TaskRunner, _SimPgStore] = {}
        try:
            super().__init__(build_flow, inputs, plan, trace=trace)
        except BaseException:
            self.cleanup()
            raise

    def describe(self) -> str:
        return f"postgres (sink {self.sink_kind})"

    # -- backends --------------------------------------------------------------------------

    def _make_sinks(self, sink_type: type[MemorySink]) -> tuple[FaultySink, FaultySink]:
        out: FaultySink = MemorySink("out")
        if self.sink_kind == "table":
            out = _FlakySink(_TablePerTask(self.dsn, self.schema))
        return out, MemorySink("dead-letters")

    def _make_store(self, store_type: type[MemoryStore]) -> PostgresStore:
        # Creates the schema; closed at once, so any use of the observer's own handle
        # (instead of a runner's) fails loudly.
        store = PostgresStore(self.dsn, schema=self.schema,
                              keep_checkpoints=self.plan.keep_checkpoints)
        store.close()
        return store

    def _new_runner(self, partition: str) -> TaskRunner:
        store = _SimPgStore(self.dsn, schema=self.schema,
                            keep_checkpoints=self.plan.keep_checkpoints, clock=self.clock)
        runner = TaskRunner(
            flow=self.flow, partition=partition, partitions=len(self.partitions),
            store=self.observed.over(store), config=self.config, dead_letters=self.dead,
            clock=self.clock.monotonic, wall=self.clock.time, sleep=self.clock.sleep,
            rng=random.Random(self.plan.seed), store_path=None)
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
        store.close()
        if store.torn is not None:
            self._tear(*store.torn)
        elif (crashed and store.last_commit is not None and self.faulting
              and self.faults_left > 0 and self.owners.get(runner.partition) is None
              and self.rng.random() < self.plan.tear_rate):
            self._spend(f"torn commit record of {runner.task_id} after a crash")
            self._tear(*store.last_commit, newest_only=True)

    def _tear(self, task: str, seq: int, *, newest_only: bool = False) -> None:
        s = self.schema
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute(
                f"SELECT c.task_no, c.seq, c.record FROM {s}.commits c JOIN {s}.tasks t ON "
                "t.task_no = c.task_no WHERE t.task = %s ORDER BY c.seq DESC LIMIT 1",
                (task,)).fetchone()
            if row is None or row[1] != seq:
                if not newest_only:
                    self.violations.append(Violation(kind="error", task=task, detail=(
                        f"commit seq {seq} landed but the newest record is "
                        f"{'none' if row is None else row[1]}")))
                return
            torn, how = _damage(bytes(row[2]), self.rng)
            conn.execute(f"UPDATE {s}.commits SET record = %s WHERE task_no = %s AND seq = %s",
                         (torn, row[0], seq))
        self._event(f"tore commit record seq {seq} of {task}: {how}")

    # -- results ---------------------------------------------------------------------------

    def outcome(self) -> tuple[Outcome, list[Violation]]:
        result, found = Outcome(), []
        store = PostgresStore(self.dsn, schema=self.schema,
                              keep_checkpoints=self.plan.keep_checkpoints)
        try:
            status = {st.task: st for st in store.tasks()}
            for partition, task in self.task_of.items():
                record = status[task].record if task in status else None
                result.positions[task] = int(record.positions.get(partition) or 0) \
                    if record else 0
                found += _check_chain(task, store.records(task))
                state, problems = self._state(store, task)
                result.state[task] = state
                found += problems
                accepted = self.observed.accepted(task)
                if self.sink_kind == "table":
                    result.output[task] = self._rows(partition)
                else:
                    assert isinstance(self.sink, MemorySink)
                    result.output[task] = _committed(self.sink, "out", task,
                                                     self.plan.guarantee, accepted, result)
                assert isinstance(self.dead, MemorySink)
                letters = _committed(self.dead, "dead", task, self.plan.guarantee, accepted,
                                     result)
                result.dead[task] = [(e["position"], e["kind"], e["record"]) for e in letters]
        finally:
            store.close()
        return result, found

    def _state(self, store: PostgresStore, task: str) -> tuple[dict[bytes, bytes],
                                                                list[Violation]]:
        """State at the task's newest checkpoint, in bulk; each key read again through
        ``load_state`` must agree."""
        s = self.schema
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute(f"SELECT task_no, last_seq FROM {s}.tasks WHERE task = %s",
                               (task,)).fetchone()
            if row is None:
                return {}, []
            rows = conn.execute(
                f"SELECT DISTINCT ON (key) key, value FROM {s}.state WHERE task_no = %s AND "
                "seq <= %s ORDER BY key, seq DESC", (row[0], row[1])).fetchall()
        state = {bytes(k): bytes(v) for k, v in rows if v is not None}
        seen = {bytes(k): store.load_state(row[0], bytes(k)) for k, _ in rows}
        wrong = [k for k, v in seen.items() if v != state.get(k)]
        if wrong:
            return state, [Violation(kind="state_mismatch", task=task, detail=(
                f"{len(wrong)} key(s) read differently in bulk and by load_state, e.g. "
                f"{wrong[:3]!r}"))]
        return state, []

    def _rows(self, partition: str) -> list[Any]:
        with psycopg.connect(self.dsn) as conn:
            try:
                rows = [[k, v] for k, v in conn.execute(
                    f"SELECT key, value FROM {_table(self.schema, partition)}")]
            except psycopg.errors.UndefinedTable:
                return []
        return sorted(rows, key=encode)

    def expected(self, reference: Outcome) -> Outcome:
        if self.sink_kind == "memory":
            return reference
        return replace(reference, output={task: _expected_rows(items)
                                          for task, items in reference.output.items()})

    def cleanup(self) -> None:
        """Close every store object and drop the schedule's schema."""
        for runner in list(self._stores):
            store = self._stores.pop(runner)
            store.close()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


def _expected_rows(items: list[Any]) -> list[Any]:
    """The rows ``PostgresTable`` holds after upserting ``items``: the latest value per key;
    string keys as they are, others as JSON text."""
    latest: dict[str, Any] = {}
    for key, value in items:
        column = key if isinstance(key, str) else encode(key).decode()
        latest[column] = [column, value]
    return sorted(latest.values(), key=encode)


def run_pg_seed(seed: int, dsn: str, *, sink: PgSinkKind | None = None,
                guarantee: str | None = None,
                trace: Callable[[str], None] | None = None) -> ScheduleResult:
    """Run the built-in workload and fault plan of ``seed`` on PostgreSQL and check it against
    the memory reference (``sink``: drawn from the seed among those the flow can use)."""
    started = time.perf_counter()
    _, build, inputs = workload(seed)
    plan = FaultPlan.draw(seed, guarantee=guarantee)
    keyed = build(MemorySource({"0": []}), MemorySink()).keyed
    kind: PgSinkKind = "memory"
    if keyed and (sink == "table" or
                  (sink is None and random.Random(seed * 7919 + 5).random() < 0.5)):
        kind = "table"
    reference = _reference(build, inputs, plan.guarantee, seed)
    schedule = PostgresSchedule(build, inputs, plan, dsn=dsn, sink=kind, trace=trace)
    try:
        violations = schedule.run()
        try:
            result, problems = schedule.outcome()
        except Exception as exc:
            result, problems = Outcome(), [Violation(
                kind="error", task="", detail=f"reading the outcome raised "
                f"{type(exc).__name__}: {exc}")]
    finally:
        schedule.cleanup()
    violations += problems
    if not any(v.kind == "error" for v in violations):
        ends = {schedule.task_of[p]: len(records) for p, records in inputs.items()}
        violations += compare(schedule.expected(reference), result, ends)
    return ScheduleResult(
        plan=plan, violations=violations, sim_seconds=schedule.clock.monotonic(),
        counts=dict(schedule.counts), duplicates=result.duplicates,
        replays=list(schedule.observed.replays), fingerprint=schedule.fingerprint,
        replay=f"run_pg_seed({seed}, dsn, sink={kind!r}, guarantee={guarantee!r})",
        backend=schedule.describe(), wall_seconds=time.perf_counter() - started)
