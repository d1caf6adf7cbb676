"""Simulated schedules with the exactly-once ``KafkaSink`` as output, on a real broker.

``KafkaSchedule`` runs the fault plans of the memory ``Schedule`` on the SQLite backend
(``SQLiteSchedule``: a ``SQLiteStore`` in a temporary directory, each runner a process with
its own store object, JSON-lines dead letters, ``MemorySource`` input), with the output going
to a real Kafka broker through ``KafkaSink`` under exactly-once. Every task writes to a topic
of its own (one partition: the order of the topic is the order of the task's output), and
every schedule uses its own topics and ``id_prefix`` (so its own transactional ids and
published-seq marker groups): schedules never interfere.

Faults, drawn from the plan as for the other backends, and what they mean here:

* crashes at every crash point. A crash at ``sink.finalize.partial`` leaves a Kafka
  transaction open with half of a checkpoint's records in it: the next owner's
  ``init_transactions`` must abort it, and ``recover`` publish the staged checkpoint again;
* takeovers, at every takeover point including ``sink.finalize.partial`` inside the Kafka
  finalize (not inside the JSON-lines dead-letter finalize, which holds its file's lock
  there). The old runner goes on as a zombie on its own store object and its own producer:
  the new owner's ``init_transactions`` fences that producer, so the zombie's finalize must
  fail with ``FencedError`` and add nothing to the topic (counted as ``kafka_fenced``);
* sink failures: a pre-commit or finalize that raises ``UnavailableError`` at the sink's
  boundary, or (half of the drawn finalize failures) a broker failure mid-way: the
  checkpoint's records are produced in the transaction, then sending the marker offset fails
  with a transport error, so the transaction is left open and the producer retired;
* failed, slow and torn store commits, killed compactions, redelivered, reordered and
  stalled input: as on the SQLite backend, except that a checkpoint whose output is already
  published (its marker is at or beyond it) is never torn at rest after a crash: Kafka's
  output cannot be taken back, so losing that checkpoint duplicates it, a documented edge of
  the sink (docs/ARCHITECTURE.md, "Kafka sink"); the simulator shows it when allowed. A record
  torn by the commit that wrote it (the process dies before finalize) is drawn as usual.

Plans are the other backends' exactly-once plans with more crashes and takeovers
(``kafka_plan``), so that a few dozen schedules reach every point. ``KafkaPgSchedule``
(``_kafka_pg_sim``) runs the same on ``PostgresStore``.

The guarantee is exactly-once (the at-least-once Kafka producer's output has no per-commit
byte range the checker could attribute, so its duplicates could not be told from errors).
Input stays the schedule's ``MemorySource``: its redelivery, reordering and stalls are the
input faults, which a real topic could not be made to show on demand.

At the end every task's topic is read with ``read_committed`` and must equal the fault-free
memory reference's output item for item and in order (each record's effect exactly once, in
checkpoint order); the store is read as on the SQLite backend (state before and after a full
compaction, positions, the commit record chain, dead letters), and each task's published-seq
marker must not be beyond its newest checkpoint.
"""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from ..checkpoint import StagedEntry
from ..errors import FencedError
from ..runtime import TaskRunner
from ..sinks import JsonLinesSink, SinkContext, SinkWriter
from ..sinks._kafka import KafkaSink, _KafkaWriter
from ._check import Outcome, compare
from ._kafka_broker import create_topic, read_topic
from ._observe import Violation
from ._plan import FaultPlan
from ._sim import BuildFlow, FaultySink, Schedule
from ._simulate import ScheduleResult, _reference
from ._sink import MemorySink
from ._sqlite_sim import SQLiteBackend, SQLiteSchedule, _FlakySink, _FlakyWriter
from ._workload import workload

if TYPE_CHECKING:
    from ._pg_sim import PostgresSchedule

__all__ = ["KafkaSchedule", "kafka_plan", "run_kafka_seed"]

GUARANTEE = "exactly-once"


class _SimKafkaWriter(_KafkaWriter):
    """The real writer, whose next marker send can be made to fail mid-transaction."""

    fail_midway = False

    def _bounded(self, what: str, call: Callable[[], None]) -> None:
        if self.fail_midway:
            from confluent_kafka import KafkaError, KafkaException

            self.fail_midway = False
            raise KafkaException(KafkaError(KafkaError._TRANSPORT,
                                            "injected: the broker connection dropped"))
        super()._bounded(what, call)


class _TopicPerTask:
    """One ``KafkaSink`` per task, each on a topic of its own."""

    def __init__(self, sinks: dict[str, KafkaSink]) -> None:
        self.sinks = sinks
        self.name = "kafka:" + ",".join(s.topic for s in sinks.values())

    def open(self, ctx: SinkContext) -> SinkWriter:
        sink = self.sinks[ctx.partition]
        writer = _SimKafkaWriter(sink, ctx)  # looked up at each open (tests replace it)
        try:
            writer.check_topics(first=True)
        except BaseException:
            writer.close()
            raise
        return writer


class _Host(Protocol):
    """The schedule a Kafka sink reports to."""

    plan: FaultPlan
    counts: dict[str, int]
    in_kafka_finalize: bool

    def note(self, text: str) -> None: ...


class _KafkaFlakySink(_FlakySink):
    """Boundary failures as ``_FlakySink``; a finalize failure may instead hit mid-way."""

    def __init__(self, inner: _TopicPerTask, schedule: _Host) -> None:
        super().__init__(inner)
        self.schedule = schedule
        self.rng = random.Random(schedule.plan.seed * 7919 + 11)

    def open(self, ctx: SinkContext) -> SinkWriter:
        return _KafkaFlakyWriter(self, self.inner.open(ctx))


class _KafkaFlakyWriter(_FlakyWriter):
    sink: _KafkaFlakySink

    def recover(self, meta: dict[str, Any] | None, staged: Sequence[StagedEntry]) -> None:
        midway = bool(staged) and self._draw()
        self._call(midway, lambda: self.inner.recover(meta, staged))

    def finalize(self, seq: int) -> None:
        midway = self._draw()
        schedule = self.sink.schedule
        schedule.in_kafka_finalize = True
        try:
            self._call(midway, lambda: self.inner.finalize(seq))
        except FencedError:
            # Not the broker's text: it names producer ids, which differ between runs.
            schedule.counts["kafka_fenced"] += 1
            schedule.note(f"Kafka producer fenced at finalize seq {seq}: FencedError")
            raise
        finally:
            schedule.in_kafka_finalize = False

    def _draw(self) -> bool:
        """A drawn finalize failure: raised here at the boundary, or (``True``) armed to hit
        once the records are produced in the transaction."""
        if self.sink.fail_finalizes <= 0:
            return False
        if self.sink.rng.random() < 0.5:
            self.sink.fail("finalize")
        self.sink.fail_finalizes -= 1
        self.sink.schedule.note("armed: the broker fails this publish mid-transaction")
        return True

    def _call(self, midway: bool, call: Callable[[], None]) -> None:
        inner = self.inner
        assert isinstance(inner, _SimKafkaWriter)
        inner.fail_midway = midway
        try:
            call()
        finally:
            inner.fail_midway = False


class _Topics:
    """A schedule's Kafka side: a topic per task (created here), their ``KafkaSink`` s, the
    published-seq markers, reading the output back, deleting the topics."""

    def __init__(self, bootstrap: str, plan: FaultPlan, inputs: dict[str, list[Any]]) -> None:
        if plan.guarantee != GUARANTEE:
            raise ValueError(f"the Kafka schedule runs {GUARANTEE} plans, not "
                             f"{plan.guarantee!r}")
        self.bootstrap = bootstrap
        self.seed = plan.seed
        self.prefix = f"sim{plan.seed}-{secrets.token_hex(4)}"
        self.topics = {p: f"rf-{self.prefix}-{p}" for p in inputs}
        for topic in self.topics.values():
            create_topic(bootstrap, topic)

    def sink(self) -> _TopicPerTask:
        return _TopicPerTask({
            p: KafkaSink(topic, bootstrap=self.bootstrap, id_prefix=self.prefix,
                         op_timeout_s=10.0, retry_budget_s=20.0, retry_backoff_base_s=0.01,
                         retry_backoff_max_s=0.2, rng=random.Random(self.seed))
            for p, topic in self.topics.items()})

    def marker(self, partition: str, task: str) -> int:
        """The published seq of ``task`` (reading ``partition``), as its marker group holds it
        (0: none)."""
        from confluent_kafka import Consumer, TopicPartition

        topic = self.topics[partition]
        group = f"{self.prefix}:{topic}:{task}:out:published"
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group,
                             "enable.auto.commit": False})
        try:
            got = consumer.committed([TopicPartition(topic, 0)], timeout=10.0)
        finally:
            consumer.close()
        return max(0, got[0].offset or 0)

    def read(self, result: Outcome, tasks: dict[str, str], last: dict[str, int], *,
             keyed: bool) -> list[Violation]:
        """Put each task's topic, read with ``read_committed``, in ``result.output``; a
        marker beyond the store's newest checkpoint (``last``) is a violation."""
        found: list[Violation] = []
        for partition, task in tasks.items():
            messages = read_topic(self.bootstrap, self.topics[partition])
            result.output[task] = [[m.key, m.value] if keyed else m.value for m in messages]
            published = self.marker(partition, task)
            if published > last.get(task, 0):
                found.append(Violation(kind="error", task=task, detail=(
                    f"the topic's published-seq marker is {published}, beyond the store's "
                    f"newest checkpoint {last.get(task, 0)}")))
        return found

    def delete(self) -> None:
        """Delete the topics (without waiting)."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        admin.delete_topics(list(self.topics.values()), operation_timeout=10.0)


class KafkaSchedule(SQLiteSchedule):
    """A ``SQLiteSchedule`` whose output is ``KafkaSink`` (a topic per task) on ``bootstrap``;
    call ``cleanup()`` when done.

    Args:
        build_flow, inputs, plan, trace: as for ``Schedule`` (``plan.guarantee`` must be
            exactly-once).
        bootstrap: the broker's address.
    """

    takeover_points = Schedule.takeover_points

    def __init__(self, build_flow: BuildFlow, inputs: dict[str, list[Any]], plan: FaultPlan,
                 *, bootstrap: str, trace: Callable[[str], None] | None = None) -> None:
        self.kafka = _Topics(bootstrap, plan, inputs)
        self.in_kafka_finalize = False
        super().__init__(build_flow, inputs, plan, backend=SQLiteBackend(sink="jsonl"),
                         trace=trace)
        self.counts["kafka_fenced"] = 0

    def describe(self) -> str:
        return "kafka (store sqlite, output KafkaSink exactly-once)"

    def note(self, text: str) -> None:
        """Record an event of the Kafka output."""
        self._event(text)

    def _event(self, text: str) -> None:
        # The prefix is random (topics of one broker are never reused): replays of a seed
        # must give the same fingerprint.
        super()._event(text.replace(self.kafka.prefix, "$PREFIX"))

    def _make_sinks(self, sink_type: type[MemorySink]) -> tuple[FaultySink, FaultySink]:
        dead = JsonLinesSink(self.directory / "dead" / "{partition}.jsonl")
        return _KafkaFlakySink(self.kafka.sink(), self), _FlakySink(dead)

    def _crash_point(self, point: str) -> None:
        if point == "sink.finalize.partial" and not self.in_kafka_finalize:
            # The JSON-lines dead-letter writer holds its file's lock here: no takeover.
            self.takeover_points = Schedule.takeover_points - {point}
            try:
                super()._crash_point(point)
            finally:
                self.takeover_points = Schedule.takeover_points
            return
        super()._crash_point(point)

    def _retire(self, runner: TaskRunner, *, crashed: bool) -> None:
        store = self._stores.get(runner)
        if crashed and store is not None and store.torn is None and \
                store.last_commit is not None and self._published(runner, *store.last_commit):
            store.last_commit = None
        super()._retire(runner, crashed=crashed)

    def _published(self, runner: TaskRunner, task: str, seq: int) -> bool:
        """Whether checkpoint ``seq`` is published: then it is not torn at rest, since
        Kafka's output cannot be taken back and losing that checkpoint duplicates it
        (docs/ARCHITECTURE.md, "Kafka sink", edges)."""
        published = self.kafka.marker(runner.partition, task)
        if published >= seq:
            self._event(f"no tear at rest of {task} seq {seq}: its output is published "
                        f"(marker {published})")
        return published >= seq

    # -- results ---------------------------------------------------------------------------

    def outcome(self) -> tuple[Outcome, list[Violation]]:
        result, found = super().outcome()  # store side; no output files: output is Kafka's
        from ..checkpoint import SQLiteStore

        store = SQLiteStore(self.database, keep_checkpoints=self.plan.keep_checkpoints,
                            create=False)
        try:
            last = {s.task: s.record.seq if s.record else 0 for s in store.tasks()}
        finally:
            store.close()
        found += self.kafka.read(result, self.task_of, last, keyed=self.flow.keyed)
        return result, found

    def cleanup(self) -> None:
        """Remove the directory and delete the schedule's topics (without waiting)."""
        super().cleanup()
        self.kafka.delete()


def kafka_plan(seed: int) -> FaultPlan:
    """The fault plan of ``seed`` for the Kafka schedule: the exactly-once plan the other
    backends draw, with at least 6 faults, crash points at least 8% likely (the highest rate
    the draw gives) and takeovers at least half of the drawn crash points, so that every crash
    point, takeover point and fenced zombie producer appears within a few dozen schedules."""
    plan = FaultPlan.draw(seed, guarantee=GUARANTEE)
    return replace(plan, faults=max(plan.faults, 6), crash_rate=max(plan.crash_rate, 0.08),
                   takeover_rate=max(plan.takeover_rate, 0.5))


def run_kafka_seed(seed: int, bootstrap: str, *, dsn: str | None = None,
                   trace: Callable[[str], None] | None = None) -> ScheduleResult:
    """Run the built-in workload and exactly-once fault plan of ``seed`` with ``KafkaSink``
    output on the broker at ``bootstrap`` and check it against the memory reference; the
    store is SQLite, or ``PostgresStore`` on ``dsn`` when given."""
    started = time.perf_counter()
    _, build, inputs = workload(seed)
    plan = kafka_plan(seed)
    reference = _reference(build, inputs, plan.guarantee, seed)
    schedule: SQLiteSchedule | PostgresSchedule
    if dsn is None:
        schedule = KafkaSchedule(build, inputs, plan, bootstrap=bootstrap, trace=trace)
    else:
        from ._kafka_pg_sim import KafkaPgSchedule  # needs psycopg

        schedule = KafkaPgSchedule(build, inputs, plan, bootstrap=bootstrap, dsn=dsn,
                                   trace=trace)
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
        replay=f"run_kafka_seed({seed}, bootstrap)" if dsn else (
            f"run_kafka_seed({seed}, bootstrap) or `python -m resumeflow.testing replay "
            f"--seed {seed} --backend kafka`"),
        backend=schedule.describe(), wall_seconds=time.perf_counter() - started)
