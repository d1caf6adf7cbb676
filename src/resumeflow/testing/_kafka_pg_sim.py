"""The Kafka schedule on ``PostgresStore``: ``KafkaSink`` output on a real broker, the store
in a schema of its own on a real PostgreSQL server (see ``_kafka_sim`` for the faults and the
checks; dead letters go to a ``MemorySink`` here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..checkpoint._postgres import PostgresStore
from ..runtime import TaskRunner
from ._check import Outcome
from ._kafka_sim import _KafkaFlakySink, _Topics
from ._observe import Violation
from ._pg_sim import PostgresSchedule
from ._plan import FaultPlan
from ._sim import BuildFlow, FaultySink, Schedule
from ._sink import MemorySink

__all__ = ["KafkaPgSchedule"]


class KafkaPgSchedule(PostgresSchedule):
    """The Kafka schedule on ``PostgresStore`` (a schema of its own on ``dsn``) instead of
    SQLite; dead letters go to a ``MemorySink``. Call ``cleanup()`` when done."""

    takeover_points = Schedule.takeover_points  # no sink lock is held in a finalize here

    def __init__(self, build_flow: BuildFlow, inputs: dict[str, list[Any]], plan: FaultPlan,
                 *, bootstrap: str, dsn: str, trace: Callable[[str], None] | None = None) -> None:
        self.kafka = _Topics(bootstrap, plan, inputs)
        self.in_kafka_finalize = False
        # ``append``: the base class reads no table of output (none exists); Kafka's is read.
        super().__init__(build_flow, inputs, plan, dsn=dsn, sink="append", trace=trace)
        self.counts["kafka_fenced"] = 0

    def describe(self) -> str:
        return "kafka (store postgres, output KafkaSink exactly-once)"

    def note(self, text: str) -> None:
        """Record an event of the Kafka output."""
        self._event(text)

    def _event(self, text: str) -> None:
        super()._event(text.replace(self.kafka.prefix, "$PREFIX"))

    def _make_sinks(self, sink_type: type[MemorySink]) -> tuple[FaultySink, FaultySink]:
        return _KafkaFlakySink(self.kafka.sink(), self), MemorySink("dead-letters")

    def _retire(self, runner: TaskRunner, *, crashed: bool) -> None:
        store = self._stores.get(runner)
        if crashed and store is not None and store.torn is None and \
                store.last_commit is not None and self._published(runner, *store.last_commit):
            store.last_commit = None
        super()._retire(runner, crashed=crashed)

    def _published(self, runner: TaskRunner, task: str, seq: int) -> bool:
        published = self.kafka.marker(runner.partition, task)
        if published >= seq:
            self._event(f"no tear at rest of {task} seq {seq}: its output is published "
                        f"(marker {published})")
        return published >= seq

    def outcome(self) -> tuple[Outcome, list[Violation]]:
        result, found = super().outcome()
        store = PostgresStore(self.dsn, schema=self.schema,
                              keep_checkpoints=self.plan.keep_checkpoints)
        try:
            last = {s.task: s.record.seq if s.record else 0 for s in store.tasks()}
        finally:
            store.close()
        found += self.kafka.read(result, self.task_of, last, keyed=self.flow.keyed)
        return result, found

    def expected(self, reference: Outcome) -> Outcome:
        return reference

    def cleanup(self) -> None:
        """Drop the schema and delete the schedule's topics (without waiting)."""
        super().cleanup()
        self.kafka.delete()
