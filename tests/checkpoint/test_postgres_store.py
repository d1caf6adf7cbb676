"""PostgresStore against a real PostgreSQL server: the store contract, fencing, lazy and
set-based state, retries across a database restart, and commits whose outcome was lost."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

if os.environ.get("CI") != "true":  # under CI a missing extra fails the import below
    pytest.importorskip("psycopg", reason="the postgres extra is not installed: "
                        "pip install -e '.[dev,postgres]'")

import psycopg

from resumeflow.checkpoint import GENESIS_DIGEST, CommitRecord, OpenedTask, Store, make_record
from resumeflow.checkpoint._pg_retry import RetryPolicy
from resumeflow.checkpoint._postgres import PostgresStore
from resumeflow.errors import ConfigurationError, FencedError, UnavailableError
from resumeflow.testing import check_store

TASK = "flow:src:0"


def _record(opened: OpenedTask, seq: int, prev: CommitRecord | None) -> CommitRecord:
    return make_record(task=opened.task, epoch=opened.epoch, seq=seq, positions={"0": seq},
                       sink_txn={}, inflight=[], created_at=float(seq), stats={},
                       prev_digest=prev.digest if prev else GENESIS_DIGEST)


def _corrupt_latest(dsn: str) -> Any:
    def corrupt(store: Store, task: str) -> None:
        assert isinstance(store, PostgresStore)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                f"UPDATE {store.schema}.commits SET record = substring(record from 1 for 20) "
                f"WHERE task_no = (SELECT task_no FROM {store.schema}.tasks WHERE task = %s) "
                f"AND seq = (SELECT max(seq) FROM {store.schema}.commits c JOIN "
                f"{store.schema}.tasks t USING (task_no) WHERE t.task = %s)", (task, task))
    return corrupt


@pytest.mark.parametrize("keep", [2, 10])
def test_postgres_store_passes_check_store(postgres_dsn: str, keep: int) -> None:
    """PostgresStore keeps the store contract, fallback from a corrupt newest record included."""
    schemas = iter(range(100))
    check_store(lambda: PostgresStore(postgres_dsn, keep_checkpoints=keep,
                                      schema=f"s{next(schemas)}"),
                corrupt_latest=_corrupt_latest(postgres_dsn))


def test_two_store_objects_fence_each_other(postgres_dsn: str) -> None:
    """A worker on its own store object is refused once another worker opened the task."""
    a, b = PostgresStore(postgres_dsn), PostgresStore(postgres_dsn)
    try:
        first = a.open_task(TASK)
        r1 = _record(first, 1, None)
        a.commit(first, r1, [(b"k", b"1")], [], [])
        second = b.open_task(TASK)
        assert second.record == r1 and second.epoch > first.epoch
        with pytest.raises(FencedError):
            a.commit(first, _record(first, 2, r1), [(b"k", b"zombie")], [], [])
        assert b.load_state(second.task_no, b"k") == b"1"
    finally:
        a.close()
        b.close()


def test_rewind_restores_a_kept_checkpoint_exactly(postgres_dsn: str) -> None:
    """rewind() makes a kept checkpoint the newest, with the state it had, and fences owners."""
    store = PostgresStore(postgres_dsn, keep_checkpoints=5)
    try:
        opened = store.open_task(TASK)
        prev = None
        records = []
        for seq in range(1, 8):
            prev = _record(opened, seq, prev)
            delta: list[tuple[bytes, bytes | None]] = [(b"k", str(seq).encode())]
            if seq == 4:
                delta.append((b"gone", None))
            if seq == 2:
                delta.append((b"gone", b"here"))
            store.commit(opened, prev, delta, [], [])
            records.append(prev)
        assert [s for s, _ in store.records(TASK)] == [3, 4, 5, 6, 7]
        assert store.wait_pruned()  # the pruner dropped what checkpoints 1 and 2 alone needed
        assert store.rewind(TASK, 3) == records[2]
        with pytest.raises(FencedError):
            store.commit(opened, _record(opened, 8, prev), [], [], [])
        again = store.open_task(TASK)
        assert again.record == records[2]
        assert store.load_state(again.task_no, b"k") == b"3"
        assert store.load_state(again.task_no, b"gone") == b"here"
        with pytest.raises(ConfigurationError):
            store.rewind(TASK, 1)
    finally:
        store.close()


def test_old_state_versions_are_pruned(postgres_dsn: str) -> None:
    """A key rewritten at every checkpoint keeps only the versions the kept records need."""
    store = PostgresStore(postgres_dsn, keep_checkpoints=3)
    try:
        opened = store.open_task(TASK)
        prev = None
        for seq in range(1, 21):
            prev = _record(opened, seq, prev)
            store.commit(opened, prev, [(b"k", str(seq).encode())], [], [])
        assert store.wait_pruned()
        with psycopg.connect(postgres_dsn) as conn:
            row = conn.execute("SELECT count(*) FROM resumeflow.state").fetchone()
        assert row is not None and row[0] == 3
        assert store.load_state(opened.task_no, b"k") == b"20"
    finally:
        store.close()


def test_open_task_reads_no_state_and_load_state_one_row(postgres_dsn: str) -> None:
    """Opening a task with a large state reads O(1) rows, and a cold read reads one row."""
    store = PostgresStore(postgres_dsn)
    try:
        opened = store.open_task(TASK)
        delta: list[tuple[bytes, bytes | None]] = [(b"k%06d" % i, b"v") for i in range(20_000)]
        store.commit(opened, _record(opened, 1, None), delta, [], [])
        before = store.rows_read
        again = store.open_task(TASK)
        assert store.rows_read - before <= 3
        before = store.rows_read
        assert store.load_state(again.task_no, b"k012345") == b"v"
        assert store.rows_read - before == 1
    finally:
        store.close()


def test_checkpoint_cost_grows_with_dirty_keys(postgres_dsn: str) -> None:
    """A checkpoint of 1,000 dirty keys in a 200,000-key state is one set-based write (timed)."""
    store = PostgresStore(postgres_dsn, keep_checkpoints=3)
    try:
        opened = store.open_task(TASK)
        prev = _record(opened, 1, None)
        big: list[tuple[bytes, bytes | None]] = [(b"k%07d" % i, b"0") for i in range(200_000)]
        store.commit(opened, prev, big, [], [])
        spent = []
        for seq in range(2, 12):
            prev = _record(opened, seq, prev)
            dirty: list[tuple[bytes, bytes | None]] = [
                (b"k%07d" % ((seq * 7919 + i * 197) % 200_000), str(seq).encode())
                for i in range(1000)]
            began = time.perf_counter()
            store.commit(opened, prev, dirty, [], [])
            spent.append(time.perf_counter() - began)
        spent.sort()
        print(f"\nPostgresStore checkpoint of 1,000 dirty keys in 200,000: "
              f"median {spent[len(spent) // 2] * 1e3:.1f} ms, max {spent[-1] * 1e3:.1f} ms")
        assert store.load_state(opened.task_no, b"k%07d" % ((11 * 7919) % 200_000)) == b"11"
    finally:
        store.close()


def test_commit_and_load_state_from_two_threads(postgres_dsn: str) -> None:
    """Commits on one thread and cold reads on another run at once without corrupting either."""
    store = PostgresStore(postgres_dsn)
    try:
        opened = store.open_task(TASK)
        prev = _record(opened, 1, None)
        store.commit(opened, prev, [(b"r%03d" % i, b"x") for i in range(100)], [], [])
        errors: list[BaseException] = []
        done = threading.Event()

        def reads() -> None:
            try:
                while not done.is_set():
                    for i in range(100):
                        assert store.load_state(opened.task_no, b"r%03d" % i) == b"x"
            except BaseException as exc:
                errors.append(exc)

        reader = threading.Thread(target=reads)
        reader.start()
        try:
            for seq in range(2, 40):
                prev = _record(opened, seq, prev)
                store.commit(opened, prev, [(b"w", str(seq).encode())], [], [])
        finally:
            done.set()
            reader.join()
        assert errors == []
        assert store.load_state(opened.task_no, b"w") == b"39"
    finally:
        store.close()


def test_operations_retry_across_a_database_restart(postgres_server: Any,
                                                    postgres_dsn: str) -> None:
    """A restart of the database is retried with backoff and counted; nothing is lost."""
    store = PostgresStore(postgres_dsn, retry=RetryPolicy(budget_s=30, backoff_base_s=0.05))
    try:
        opened = store.open_task(TASK)
        r1 = _record(opened, 1, None)
        store.commit(opened, r1, [(b"k", b"1")], [], [])
        postgres_server.stop()
        restarter = threading.Timer(1.0, postgres_server.start)
        restarter.start()
        try:
            r2 = _record(opened, 2, r1)
            store.commit(opened, r2, [(b"k", b"2")], [], [])
        finally:
            restarter.join()
        assert store.retries >= 1
        assert store.load_state(opened.task_no, b"k") == b"2"
        assert [s for s, _ in store.records(TASK)] == [1, 2]
    finally:
        store.close()


def test_retry_budget_spent_raises_unavailable(postgres_server: Any, postgres_dsn: str) -> None:
    """Once the retry budget is spent the store raises UnavailableError without the password."""
    store = PostgresStore(postgres_dsn + " password=s3cret-pw",
                          retry=RetryPolicy(budget_s=0.5, backoff_base_s=0.05))
    try:
        opened = store.open_task(TASK)
        postgres_server.stop()
        try:
            with pytest.raises(UnavailableError) as caught:
                store.commit(opened, _record(opened, 1, None), [], [], [])
        finally:
            postgres_server.start()
        assert "s3cret-pw" not in str(caught.value)
        assert store.retries >= 1
        store.commit(opened, _record(opened, 1, None), [(b"k", b"1")], [], [])
        assert store.load_state(opened.task_no, b"k") == b"1"
    finally:
        store.close()


class _LosesCommitAnswer(PostgresStore):
    """Drops the connection right after COMMIT reached the server (``landed``) or right before
    it was sent (not landed): the client sees a lost connection either way."""

    def __init__(self, dsn: str, *, landed: bool) -> None:
        super().__init__(dsn, retry=RetryPolicy(budget_s=10, backoff_base_s=0.01))
        self.landed = landed
        self.armed = False

    def _commit_tx(self, conn: Any, *args: Any, **kwargs: Any) -> None:
        if not self.armed:
            return super()._commit_tx(conn, *args, **kwargs)
        self.armed = False
        if self.landed:
            super()._commit_tx(conn, *args, **kwargs)
        killer = psycopg.connect(self._dsn_for_tests, autocommit=True)
        try:
            killer.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        finally:
            killer.close()
        conn.execute("SELECT 1")  # the lost connection shows here
        raise AssertionError("the terminated connection still answered")


@pytest.mark.parametrize("landed", [True, False])
def test_unknown_commit_outcome_is_decided_from_durable_data(postgres_dsn: str,
                                                              landed: bool) -> None:
    """A commit whose answer was lost is applied exactly once, whether or not it had landed."""
    store = _LosesCommitAnswer(postgres_dsn, landed=landed)
    store._dsn_for_tests = postgres_dsn  # type: ignore[attr-defined]
    try:
        opened = store.open_task(TASK)
        r1 = _record(opened, 1, None)
        store.commit(opened, r1, [(b"k", b"1")], [], [])
        r2 = _record(opened, 2, r1)
        store.armed = True
        store.commit(opened, r2, [(b"k", b"2")], [], [])
        assert store.unknown_commits == 1 and store.retries >= 1
        assert [s for s, _ in store.records(TASK)] == [1, 2]
        assert store.load_state(opened.task_no, b"k") == b"2"
        store.commit(opened, _record(opened, 3, r2), [(b"k", b"3")], [], [])
        assert store.load_state(opened.task_no, b"k") == b"3"
    finally:
        store.close()


def test_bad_configuration_fails_at_start(postgres_server: Any) -> None:
    """A DSN naming a missing database, or a bad schema, fails at once with what to fix."""
    with pytest.raises(ConfigurationError, match="does not exist"):
        PostgresStore(postgres_server.dsn_for("no_such_db"))
    with pytest.raises(ConfigurationError, match="schema"):
        PostgresStore(postgres_server.dsn, schema="Bad-Name")
    with pytest.raises(ConfigurationError, match="keep_checkpoints"):
        PostgresStore(postgres_server.dsn, keep_checkpoints=1)


class _PausesInCommit(PostgresStore):
    """Stalls inside its commit transaction, after locking the task's row (a paused worker)."""

    pause_s = 0.0

    def _commit_tx(self, conn: Any, opened: Any, record: Any, *args: Any, **kwargs: Any) -> None:
        if self.pause_s:
            pause, self.pause_s = self.pause_s, 0.0
            with conn.transaction():
                conn.execute(f"SELECT 1 FROM {self.schema}.tasks WHERE task_no = %s FOR UPDATE",
                             (opened.task_no,))
                time.sleep(pause)
                conn.execute("SELECT 1")  # the server ended the idle session meanwhile
        super()._commit_tx(conn, opened, record, *args, **kwargs)


def test_a_worker_paused_inside_its_commit_cannot_block_the_task(postgres_dsn: str) -> None:
    """A worker paused while holding the task's row lock is cut off by the server, the new
    owner opens the task, and the paused worker's commit is then refused (FencedError)."""
    paused = _PausesInCommit(postgres_dsn, idle_in_transaction_timeout_s=1.0,
                             retry=RetryPolicy(budget_s=5, backoff_base_s=0.05))
    other = PostgresStore(postgres_dsn)
    try:
        opened = paused.open_task(TASK)
        paused.pause_s = 3.0
        outcome: list[BaseException] = []

        def zombie() -> None:
            try:
                paused.commit(opened, _record(opened, 1, None), [(b"k", b"zombie")], [], [])
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=zombie)
        thread.start()
        time.sleep(0.3)  # the zombie holds the row lock now
        began = time.monotonic()
        taken = other.open_task(TASK)
        waited = time.monotonic() - began
        thread.join()
        assert taken.epoch == opened.epoch + 1 and waited < 2.5
        assert len(outcome) == 1 and isinstance(outcome[0], FencedError)
        assert other.load_state(taken.task_no, b"k") is None and other.records(TASK) == []
    finally:
        paused.close()
        other.close()


class _LosesOpenAnswer(PostgresStore):
    """The first open_task transaction lands, then its connection is lost."""

    lose_next = False

    def _open_task_tx(self, conn: Any, task: str, seen_discarded: set[int]) -> Any:
        opened = super()._open_task_tx(conn, task, seen_discarded)
        if self.lose_next:
            self.lose_next = False
            with psycopg.connect(self.killer_dsn, autocommit=True) as killer:
                killer.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
            conn.execute("SELECT 1")  # the lost connection shows here
        return opened


def test_a_fallback_whose_answer_was_lost_is_still_reported(postgres_dsn: str) -> None:
    """When open_task discards a corrupt record and its answer is lost, the retried open still
    reports the discarded seq (sinks must drop that checkpoint's output)."""
    store = _LosesOpenAnswer(postgres_dsn, retry=RetryPolicy(budget_s=10, backoff_base_s=0.01))
    store.killer_dsn = postgres_dsn  # type: ignore[attr-defined]
    try:
        opened = store.open_task(TASK)
        r1 = _record(opened, 1, None)
        store.commit(opened, r1, [(b"k", b"1")], [], [])
        store.commit(opened, _record(opened, 2, r1), [(b"k", b"2")], [], [])
        _corrupt_latest(postgres_dsn)(store, TASK)
        store.lose_next = True
        back = store.open_task(TASK)
        assert store.retries >= 1
        assert back.record == r1 and back.discarded_seqs == (2,)
        assert store.load_state(back.task_no, b"k") == b"1"
    finally:
        store.close()
