"""The seeded simulator with the exactly-once KafkaSink as output, on a real Kafka broker."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

if os.environ.get("CI") != "true":  # under CI a missing extra fails the import below
    pytest.importorskip("confluent_kafka", reason="the kafka extra is not installed: "
                        "pip install -e '.[dev,kafka]'")

from resumeflow.runtime import CRASH_POINTS
from resumeflow.testing import SimReport, _kafka_sim
from resumeflow.testing._kafka_sim import run_kafka_seed

SCHEDULES = 40
"""About a minute and a half on this machine (two seconds per schedule)."""


@pytest.mark.slow
def test_kafka_schedules_keep_every_invariant(kafka: Any) -> None:
    """40 seeded fault schedules with KafkaSink output on a real broker leave every record's
    effect in the topics exactly once and in checkpoint order, and reach every crash point,
    takeovers whose zombie producer is fenced at finalize, and mid-transaction broker
    failures."""
    report = SimReport()
    events: list[str] = []
    started = time.perf_counter()
    for seed in range(SCHEDULES):
        report.add(run_kafka_seed(seed, kafka.bootstrap, trace=events.append))
    report.wall_seconds = time.perf_counter() - started
    print(f"\nkafka simulator: {report.summary()}")
    report.check()
    assert report.totals["crashes"] > SCHEDULES / 2 and report.totals["takeovers"] > 0
    assert report.totals["kafka_fenced"] > 0
    text = "\n".join(events)
    for point in CRASH_POINTS:
        assert f"crash at {point}" in text, point
    for kind in ("Kafka producer fenced at finalize", "fails this publish mid-transaction",
                 "sink finalize fails", "torn commit record", "liveness phase"):
        assert kind in text, kind


class _IgnoresMarker(_kafka_sim._SimKafkaWriter):
    """Recovers as if nothing were published: staged checkpoints are published again."""

    def _read_marker(self) -> int:
        super()._read_marker()
        return 0


def test_the_kafka_simulator_catches_a_sink_that_ignores_its_marker(
        kafka: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KafkaSink whose recovery ignores the published-seq marker fails the simulator with
    duplicated output read back from the topic."""
    monkeypatch.setattr(_kafka_sim, "_SimKafkaWriter", _IgnoresMarker)
    kinds: set[str] = set()
    for seed in range(40):
        result = run_kafka_seed(seed, kafka.bootstrap)
        kinds |= {v.kind for v in result.violations}
        if "duplicated" in kinds:
            assert f"seed {seed}" in result.message()
            assert f"run_kafka_seed({seed}, bootstrap)" in result.message()
            break
    assert "duplicated" in kinds


@pytest.mark.slow
def test_a_kafka_schedule_replays_to_the_same_events(kafka: Any) -> None:
    """Two runs of one seed on the broker, each on topics of its own, give the same event
    fingerprint and counts (a zombie's fencing included), so a printed seed replays."""
    for seed in (0, 4):
        first = run_kafka_seed(seed, kafka.bootstrap)
        again = run_kafka_seed(seed, kafka.bootstrap)
        assert first.counts["kafka_fenced"] > 0
        assert (again.fingerprint, again.counts) == (first.fingerprint, first.counts)


PG_SCHEDULES = 12
"""About half a minute on this machine."""


@pytest.mark.slow
def test_kafka_schedules_on_postgres_keep_every_invariant(kafka: Any, postgres_dsn: str) -> None:
    """12 seeded fault schedules with KafkaSink output and PostgresStore as the store leave
    every record's effect in the topics exactly once and in order, with takeovers and
    fenced zombie producers among them."""
    pytest.importorskip("psycopg", reason="the postgres extra is not installed")
    report = SimReport()
    started = time.perf_counter()
    for seed in range(PG_SCHEDULES):
        result = run_kafka_seed(seed, kafka.bootstrap, dsn=postgres_dsn)
        assert result.backend == "kafka (store postgres, output KafkaSink exactly-once)"
        report.add(result)
    report.wall_seconds = time.perf_counter() - started
    print(f"\nkafka simulator on postgres: {report.summary()}")
    report.check()
    assert report.totals["takeovers"] > 0 and report.totals["kafka_fenced"] > 0
