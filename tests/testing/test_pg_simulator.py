"""The seeded simulator on PostgreSQL: PostgresStore with two-phase memory output or
PostgresTable output, against the memory reference, on a real server."""

from __future__ import annotations

import os
import re
import time
from typing import Any

import pytest

if os.environ.get("CI") != "true":  # under CI a missing extra fails the import below
    pytest.importorskip("psycopg", reason="the postgres extra is not installed: "
                        "pip install -e '.[dev,postgres]'")

from resumeflow.runtime import CRASH_POINTS
from resumeflow.testing import SimReport, _pg_sim
from resumeflow.testing._pg_sim import run_pg_seed

SCHEDULES = 200
"""About a minute on this machine (a third of a second per schedule)."""


@pytest.mark.slow
def test_postgres_schedules_keep_every_invariant(postgres_dsn: str) -> None:
    """200 seeded fault schedules on PostgresStore (memory and PostgresTable output) break no
    invariant, and reach every crash point, takeovers, fenced zombies, torn records and their
    fallback, failed writes and sink failures."""
    report = SimReport()
    events: list[str] = []
    backends: set[str] = set()
    started = time.perf_counter()
    for seed in range(SCHEDULES):
        result = run_pg_seed(seed, postgres_dsn, trace=events.append)
        backends.add(result.backend)
        report.add(result)
    report.wall_seconds = time.perf_counter() - started
    print(f"\npostgres simulator: {report.summary()}")
    report.check()
    assert backends == {"postgres (sink memory)", "postgres (sink table)"}
    assert report.totals["crashes"] > SCHEDULES / 2 and report.totals["takeovers"] > 0
    assert report.totals["fenced"] > 0
    text = "\n".join(events)
    for point in CRASH_POINTS:
        assert f"crash at {point}" in text, point
    for kind in ("store write fails", "torn commit record", "tore commit record",
                 "sink pre-commit fails", "sink finalize fails", "fenced (zombie)",
                 "liveness phase"):
        assert kind in text, kind
    assert re.search(r"discarded \[\d", text), "no fallback from a torn record"


class _LosesStaging(_pg_sim._SimPgStore):
    """Commits without the staged sink output: a crash before finalize then loses output."""

    def _commit_tx(self, conn: Any, opened: Any, record: Any, raw: Any, keys: Any,
                   values: Any, staged_rows: Any, *args: Any, **kwargs: Any) -> None:
        super()._commit_tx(conn, opened, record, raw, keys, values, [], *args, **kwargs)


def test_the_postgres_simulator_catches_a_store_that_loses_staging(
        postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL store that drops staged output fails the simulator with lost output."""
    monkeypatch.setattr(_pg_sim, "_SimPgStore", _LosesStaging)
    kinds: set[str] = set()
    for seed in range(40):
        result = run_pg_seed(seed, postgres_dsn, sink="memory")
        kinds |= {v.kind for v in result.violations}
        if "lost" in kinds:
            break
    assert "lost" in kinds
