"""The example flow on PostgresStore (with PostgresTable or JSON-lines output) through real
failures: SIGKILL at every crash point, SIGKILL at random moments, and restarts of the
database mid-run. After each, the pipeline resumes and its output equals the fault-free
reference exactly: 0 records lost, 0 duplicated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("CI") != "true":  # under CI a missing extra fails the import below
    pytest.importorskip("psycopg", reason="the postgres extra is not installed: "
                        "pip install -e '.[dev,postgres]'")

import psycopg

import resumeflow as rf
from resumeflow.checkpoint._pg_retry import RetryPolicy
from resumeflow.checkpoint._postgres import PostgresStore
from resumeflow.cli._verify import verify_chain
from resumeflow.runtime import CRASH_POINTS
from resumeflow.sinks import PostgresTable

KINDS = ("pg-table", "jsonl")
TASK = "orders:events.jsonl:0"

_SCRIPT = '''\
import logging, sys, time
import resumeflow as rf
from resumeflow.checkpoint import PostgresStore
from resumeflow.sinks import PostgresTable

DSN, EVENTS, KIND, OUT, DEAD, PACE = {dsn!r}, {events!r}, {kind!r}, {out!r}, {dead!r}, {pace!r}
logging.basicConfig(level=logging.INFO, stream=sys.stderr)


def pace(event):
    if PACE and event["id"] % PACE == 0:
        time.sleep(0.01)
    return event


flow = rf.Flow("orders")
stream = (flow.source(rf.sources.JsonLines(EVENTS)).map(pace)
              .key_by(lambda e: e["customer"])
              .reduce(lambda total, e: total + e["amount"], initial=0))
stream.sink(PostgresTable(DSN, table="totals") if KIND == "pg-table"
            else rf.sinks.JsonLinesSink(OUT))
summary = rf.run(flow, PostgresStore(DSN), rf.RunConfig(replay_max_events=300,
                                                        dead_letter_path=DEAD))
print("records_in", summary.records_in, "restarts", summary.restarts, file=sys.stderr)
'''


def _flow(work: Any, events: Any, kind: str, dsn: str, check: Any = None) -> rf.Flow:
    flow = rf.Flow("orders")
    stream = flow.source(rf.sources.JsonLines(events.path))
    if check is not None:
        stream = stream.map(check)
    stream = (stream.key_by(lambda e: e["customer"])
                    .reduce(lambda total, e: total + e["amount"], initial=0))
    stream.sink(PostgresTable(dsn, table="totals") if kind == "pg-table"
                else rf.sinks.JsonLinesSink(work.out))
    return flow


def _table(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        try:
            return {k: v for k, v in conn.execute("SELECT key, value FROM totals")}
        except psycopg.errors.UndefinedTable:
            return {}


def _check_outcome(work: Any, events: Any, kind: str, dsn: str) -> None:
    """0 lost, 0 duplicated against the reference, and a verifying checkpoint chain."""
    if kind == "pg-table":
        assert _table(dsn) == events.totals(), "lost or duplicated effects in the table"
    else:
        got = [json.loads(line) for line in work.out.read_bytes().splitlines()]
        want = events.running_totals()
        assert len(got) == len(want), f"{len(got)} output lines for {len(want)} events"
        assert got == want, "lost, duplicated or reordered output"
    store = PostgresStore(dsn)
    try:
        for status in store.tasks():
            assert verify_chain(status.task, store.records(status.task)) == []
    finally:
        store.close()


def _script(work: Any, events: Any, kind: str, dsn: str, *, pace: int = 0) -> Path:
    path = work.root / "run_pg.py"
    path.write_text(_SCRIPT.format(dsn=dsn, events=str(events.path), kind=kind,
                                   out=str(work.out), dead=str(work.root / "dead.jsonl"),
                                   pace=pace))
    return path


def _run(script: Path, *, crash_at: str | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RESUMEFLOW_CRASH_AT"}
    if crash_at:
        env["RESUMEFLOW_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sigkill_at_crash_point_then_resume(work: Any, postgres_dsn: str, point: str,
                                            kind: str) -> None:
    """SIGKILL at a crash point (a later pass, then the first pass of the restart, often in
    recovery), then a clean run, gives exactly the fault-free output and dead letters."""
    events = work.events(3000, bad_every=400)
    script = _script(work, events, kind, postgres_dsn)
    for n in ((9 if point == "batch.mid" else 3), 1):
        crashed = _run(script, crash_at=f"{point}:{n}")
        assert crashed.returncode == -signal.SIGKILL, \
            f"{point}:{n} was never reached:\n{crashed.stderr[-3000:]}"
    done = _run(script)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_outcome(work, events, kind, postgres_dsn)
    dead = [json.loads(line) for line in (work.root / "dead.jsonl").read_bytes().splitlines()]
    assert [d["position"] for d in dead] == [offset for offset, _ in events.bad], \
        "lost or duplicated dead letters"


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_at_random_moments_then_resume(work: Any, postgres_dsn: str,
                                               kind: str) -> None:
    """Three SIGKILLs at moments mid-run, then a run to the end, lose and duplicate nothing."""
    events = work.events(4000)
    script = _script(work, events, kind, postgres_dsn, pace=10)  # about 4 s of work per run
    for delay in (1.2, 1.7, 0.9):
        proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE,
                                text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    done = _run(script)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_outcome(work, events, kind, postgres_dsn)
    store = PostgresStore(postgres_dsn)
    try:
        assert store.open_task(TASK).epoch == 5  # four runs took the task before this open
    finally:
        store.close()


def _paced(seconds_per_event: float) -> Any:
    def check(event: dict[str, Any]) -> dict[str, Any]:
        time.sleep(seconds_per_event)
        return event
    return check


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_database_restart_mid_run_is_retried(work: Any, postgres_server: Any,
                                             postgres_dsn: str, kind: str) -> None:
    """A database restart mid-run is outlived by the store's retries (counted), and the run
    ends with the exact output."""
    events = work.events(3000)
    store = PostgresStore(postgres_dsn, retry=RetryPolicy(budget_s=30.0))
    restarted = threading.Event()

    def restart() -> None:
        postgres_server.restart(down_s=1.0)
        restarted.set()

    timer = threading.Timer(0.8, restart)
    try:
        timer.start()
        summary = rf.run(_flow(work, events, kind, postgres_dsn, _paced(0.001)), store,
                         rf.RunConfig(replay_max_events=200,
                                      dead_letter_path=str(work.root / "dead.jsonl")))
        timer.join()
        assert restarted.is_set()
        assert summary.records_in >= len(events.events)
        print(f"\ndatabase restart mid-run ({kind}): {store.retries} store retries, "
              f"{store.unknown_commits} commits decided after a lost answer, "
              f"{summary.restarts} task restarts")
        assert store.retries >= 1, "the run never met the restart"
    finally:
        timer.cancel()
        store.close()
    _check_outcome(work, events, kind, postgres_dsn)


@pytest.mark.slow
def test_outage_past_the_retry_budget_restarts_the_task(work: Any, postgres_server: Any,
                                                       postgres_dsn: str) -> None:
    """An outage longer than the store's retry budget makes the runtime restart the task from
    its checkpoint (counted), and the output is still exact."""
    events = work.events(3000)
    store = PostgresStore(postgres_dsn, retry=RetryPolicy(budget_s=0.3, backoff_base_s=0.05,
                                                          backoff_max_s=0.2))
    timer = threading.Timer(0.8, lambda: postgres_server.restart(down_s=2.0))
    try:
        timer.start()
        summary = rf.run(_flow(work, events, "pg-table", postgres_dsn, _paced(0.001)), store,
                         rf.RunConfig(replay_max_events=200, restart_backoff_base_s=0.2,
                                      restart_backoff_max_s=1.0, restart_budget=20,
                                      dead_letter_path=str(work.root / "dead.jsonl")))
        timer.join()
        print(f"\noutage past the retry budget: {store.retries} store retries, "
              f"{summary.restarts} task restarts")
        assert summary.restarts >= 1
    finally:
        timer.cancel()
        store.close()
    _check_outcome(work, events, "pg-table", postgres_dsn)
