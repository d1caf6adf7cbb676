"""PostgresLeases against a real PostgreSQL server: fair shares, takeover after expiry, and a
paused holder fenced by the store's epoch."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

if os.environ.get("CI") != "true":  # under CI a missing extra fails the import below
    pytest.importorskip("psycopg", reason="the postgres extra is not installed: "
                        "pip install -e '.[dev,postgres]'")

from resumeflow.checkpoint import GENESIS_DIGEST, make_record
from resumeflow.checkpoint._pg_leases import PostgresLeases
from resumeflow.checkpoint._postgres import PostgresStore
from resumeflow.errors import ConfigurationError, FencedError

PARTITIONS = [f"p{i}" for i in range(6)]


def _settle(workers: list[PostgresLeases], rounds: int = 6) -> dict[str, set[str]]:
    """Poll every worker in turn until nothing changes; returns each one's holdings as told
    by its (gained, lost) reports, starting from what it held."""
    held: dict[str, set[str]] = {w.worker_id: set(w.held) for w in workers}
    for _ in range(rounds):
        changed = False
        for w in workers:
            gained, lost = w.poll()
            changed |= bool(gained or lost)
            held[w.worker_id] |= set(gained)
            held[w.worker_id] -= set(lost)
        if not changed:
            break
    return held


def test_three_workers_split_six_partitions_fairly(postgres_dsn: str) -> None:
    """Three workers joining together end up with two disjoint partitions each."""
    workers = [PostgresLeases(postgres_dsn, worker_id=f"w{i}", lease_s=5.0) for i in range(3)]
    try:
        for w in workers:
            w.join(PARTITIONS)
        held = _settle(workers)
        assert sorted(len(h) for h in held.values()) == [2, 2, 2]
        assert set().union(*held.values()) == set(PARTITIONS)
        assert {w.worker_id: w.held for w in workers} == held
    finally:
        for w in workers:
            w.leave()


def test_a_worker_joining_later_gets_its_share(postgres_dsn: str) -> None:
    """A second worker joining a worker that holds everything gets half once both polled."""
    first = PostgresLeases(postgres_dsn, worker_id="first", lease_s=5.0)
    second = PostgresLeases(postgres_dsn, worker_id="second", lease_s=5.0)
    try:
        first.join(PARTITIONS)
        assert first.poll() == (PARTITIONS, [])
        second.join(PARTITIONS)
        held = _settle([first, second])
        assert held == {"first": set(PARTITIONS[:3]), "second": set(PARTITIONS[3:])}
        assert first.poll() == ([], []) and second.poll() == ([], [])
    finally:
        first.leave()
        second.leave()


def test_expired_leases_are_taken_over(postgres_dsn: str) -> None:
    """Leases a silent worker stops renewing are taken by another after lease_s, and the
    silent one reports them lost when it polls again."""
    silent = PostgresLeases(postgres_dsn, worker_id="silent", lease_s=1.0)
    other = PostgresLeases(postgres_dsn, worker_id="other", lease_s=1.0)
    try:
        silent.join(PARTITIONS)
        other.join(PARTITIONS)
        silent.poll()
        other.poll()
        assert len(silent.held) == 3 and len(other.held) == 3
        gained_all: list[str] = []
        deadline = time.monotonic() + 1.6
        while time.monotonic() < deadline:  # the other one keeps polling, the silent one not
            time.sleep(0.2)
            gained, lost = other.poll()
            assert lost == []
            gained_all += gained
        assert sorted(gained_all) == sorted(silent.held)
        assert other.held == set(PARTITIONS)
        gained, lost = silent.poll()
        assert gained == [] and len(lost) == 3 and silent.held == set()
    finally:
        silent.leave()
        other.leave()


def test_a_paused_holder_loses_its_lease_and_is_fenced(postgres_dsn: str) -> None:
    """A worker paused past its lease loses it to another, whose open_task fences the paused
    worker's next commit (FencedError), and the paused worker's poll reports the loss."""
    old = PostgresLeases(postgres_dsn, worker_id="old", lease_s=1.0)
    new = PostgresLeases(postgres_dsn, worker_id="new", lease_s=1.0)
    old_store, new_store = PostgresStore(postgres_dsn), PostgresStore(postgres_dsn)
    try:
        old.join(["p0"])
        assert old.poll() == (["p0"], [])
        opened = old_store.open_task("flow:src:p0")
        r1 = make_record(task=opened.task, epoch=opened.epoch, seq=1, positions={"p0": 10},
                         sink_txn={}, inflight=[], created_at=1.0, stats={},
                         prev_digest=GENESIS_DIGEST)
        old_store.commit(opened, r1, [(b"k", b"1")], [], [])
        new.join(["p0"])
        assert new.poll() == ([], [])  # held and fresh: nothing to take
        time.sleep(1.3)  # the old worker is paused past its lease
        assert new.poll() == (["p0"], [])
        assert old.held == {"p0"}  # the paused worker still believes it holds the lease
        taken = new_store.open_task("flow:src:p0")
        assert taken.record == r1
        r2 = make_record(task=opened.task, epoch=opened.epoch, seq=2, positions={"p0": 20},
                         sink_txn={}, inflight=[], created_at=2.0, stats={},
                         prev_digest=r1.digest)
        with pytest.raises(FencedError):
            old_store.commit(opened, r2, [(b"k", b"zombie")], [], [])
        assert old.poll() == ([], ["p0"])
        assert new_store.load_state(taken.task_no, b"k") == b"1"
    finally:
        old.leave()
        new.leave()
        old_store.close()
        new_store.close()


def test_leave_releases_leases_at_once(postgres_dsn: str) -> None:
    """A worker that leaves frees its leases for the others without waiting for expiry."""
    a = PostgresLeases(postgres_dsn, worker_id="a", lease_s=30.0)
    b = PostgresLeases(postgres_dsn, worker_id="b", lease_s=30.0)
    try:
        a.join(PARTITIONS)
        b.join(PARTITIONS)
        _settle([a, b])
        a.leave()
        assert _settle([b]) == {"b": set(PARTITIONS)}
    finally:
        b.leave()


def test_lease_configuration_is_checked() -> None:
    """A lease without a duration or a worker id fails at construction."""
    with pytest.raises(ConfigurationError):
        PostgresLeases("host=127.0.0.1", worker_id="w", lease_s=0)
    with pytest.raises(ConfigurationError):
        PostgresLeases("host=127.0.0.1", worker_id="", lease_s=1)


def test_leases_survive_a_short_outage_and_are_lost_after_lease_s(postgres_server: Any,
                                                                  postgres_dsn: str) -> None:
    """With the database down, poll keeps leases renewed less than lease_s ago and reports
    them lost after that, without raising."""
    worker = PostgresLeases(postgres_dsn, worker_id="w", lease_s=1.5)
    try:
        worker.join(["p0", "p1"])
        assert worker.poll() == (["p0", "p1"], [])
        postgres_server.stop()
        try:
            assert worker.poll() == ([], [])
            time.sleep(1.6)
            assert worker.poll() == ([], ["p0", "p1"])
            assert worker.retries >= 1
        finally:
            postgres_server.start()
        gained, lost = worker.poll()
        assert gained == ["p0", "p1"] and lost == []
    finally:
        worker.leave()
