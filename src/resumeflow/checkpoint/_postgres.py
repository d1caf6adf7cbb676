"""PostgreSQL store: commit records, versioned keyed state and staged output, shared by workers.

Once ``commit()`` returns, the commit record of ``seq``, the state delta of ``seq``, the staged
sink output, the release of finalized staging and the writes of sinks in this database
(``PostgresTable``) are durable together: they are one transaction, which first locks the
task's row and checks the epoch (compare-and-set: a stale epoch is refused with
``FencedError`` and writes nothing). A crash or lost connection before the server commits
leaves none of them.

State is versioned: one row per (key, seq) that changed it. A key's value at a checkpoint is
its newest version at or below that ``seq``, one indexed row (``load_state`` reads O(1) rows and
opening a task reads no state). A commit inserts its dirty keys in one set-based statement, so
its cost grows with the keys it changed, never with the state. The versions the kept
``keep_checkpoints`` records need stay; once a checkpoint is the oldest kept, the versions its
delta supersedes are deleted by a pruner thread after the commit (``_pg_prune``), so no commit
waits for an old large delta. Falling back from a corrupt record, or rewinding, deletes the
versions above the target: its state is exact.

Transient failures are retried on a new connection (``_pg_retry``). A commit whose COMMIT was
sent but whose answer was lost has an unknown outcome: the retry locks the task's row (waiting
for the old transaction to end, if the server still runs it) and decides from durable data:
if the task's newest record is this seq with this digest, the commit happened and is not
applied again; otherwise it did not happen and is written now.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import psycopg

from .._codec import decode, encode
from .._faults import crash_point
from ..errors import ClosedError, ConfigurationError, CorruptCheckpointError, FencedError, invariant
from ._pg_prune import Pruner
from ._pg_retry import PgConnection, Retrier, RetryPolicy, describe_dsn
from ._record import SCHEMA_VERSION, CommitRecord, decode_record, encode_record
from ._store import InStoreWrite, OpenedTask, StagedEntry, TaskStatus

__all__ = ["PostgresStore"]

log = logging.getLogger("resumeflow.store")

T = TypeVar("T")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_NO_BOUND = 2**62

_DDL = """
CREATE TABLE IF NOT EXISTS {s}.meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.tasks (
    task_no bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task text NOT NULL UNIQUE,
    epoch bigint NOT NULL,
    last_seq bigint NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.commits (
    task_no bigint NOT NULL, seq bigint NOT NULL, epoch bigint NOT NULL,
    record bytea NOT NULL, PRIMARY KEY (task_no, seq));
CREATE TABLE IF NOT EXISTS {s}.state (
    task_no bigint NOT NULL, key bytea NOT NULL, seq bigint NOT NULL, value bytea,
    PRIMARY KEY (task_no, key, seq));
CREATE INDEX IF NOT EXISTS state_by_seq ON {s}.state (task_no, seq);
CREATE TABLE IF NOT EXISTS {s}.staged (
    task_no bigint NOT NULL, sink text NOT NULL, seq bigint NOT NULL,
    meta bytea NOT NULL, payload bytea NOT NULL, PRIMARY KEY (task_no, sink, seq));
CREATE TABLE IF NOT EXISTS {s}.prune_marks (
    task_no bigint PRIMARY KEY, pruned_seq bigint NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.quarantine (
    task_no bigint NOT NULL, seq bigint NOT NULL, record bytea NOT NULL, reason text NOT NULL,
    at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS {s}.rewinds (
    task_no bigint NOT NULL, from_seq bigint NOT NULL, to_seq bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT now())
"""


class PostgresStore:
    """A store in a PostgreSQL schema, shared by every worker of a pipeline.

    Args:
        dsn: libpq connection string or ``postgresql://`` URL (its password is never logged).
        keep_checkpoints: newest commit records (and the state versions they need) kept per
            task for fallback and rewind; at least 2.
        schema: the schema holding the store's tables (created when missing).
        retry: retry budget and backoff for transient failures.
        lock_timeout_s: longest wait for a task's row lock (a paused worker holding it is
            cut off by the server after ``idle_in_transaction_timeout_s``).
        idle_in_transaction_timeout_s: the server ends a session of this store that sits
            idle inside a transaction this long (a paused zombie cannot block a task).
        statement_timeout_s: longest statement; past it the statement fails and is retried.
        rng, sleep, clock: injected for the backoff (tests).

    Attributes:
        retries: transient failures retried (all operations) since the store opened.
        rows_read: rows read by ``open_task`` and ``load_state``.
        unknown_commits: commits whose outcome was unknown after a lost connection and
            was decided from durable data.
    """

    def __init__(self, dsn: str, *, keep_checkpoints: int = 10, schema: str = "resumeflow",
                 retry: RetryPolicy | None = None, lock_timeout_s: float = 30.0,
                 idle_in_transaction_timeout_s: float = 10.0,
                 statement_timeout_s: float = 60.0, rng: random.Random | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if keep_checkpoints < 2:
            raise ConfigurationError(
                f"keep_checkpoints={keep_checkpoints}: keep at least 2 so a corrupt newest "
                "checkpoint can fall back to the one before; set keep_checkpoints >= 2")
        if not _SCHEMA_NAME.match(schema):
            raise ConfigurationError(
                f"schema {schema!r} is not a plain lower-case identifier; use letters, digits "
                "and underscores")
        self.where, password = describe_dsn(dsn)
        self.keep_checkpoints = keep_checkpoints
        self.schema = schema
        self.name = f"postgres:{self.where}:{schema}"
        self.rows_read = 0
        self.unknown_commits = 0
        self._retrier = Retrier(retry or RetryPolicy(), where=self.where, password=password,
                                rng=rng, sleep=sleep, clock=clock)
        settings = {"lock_timeout": f"{int(lock_timeout_s * 1000)}",
                    "idle_in_transaction_session_timeout":
                        f"{int(idle_in_transaction_timeout_s * 1000)}",
                    "statement_timeout": f"{int(statement_timeout_s * 1000)}"}
        self._writer = PgConnection(dsn, settings=settings, application_name="resumeflow")
        self._reader = PgConnection(dsn, settings=settings, application_name="resumeflow-read")
        self._pruner = Pruner(PgConnection(dsn, settings=settings,
                                           application_name="resumeflow-prune"), schema)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._closed = False
        self._upto: dict[int, int] = {}
        self._sql = _Sql(schema)
        self._write("create the store's schema", self._init_schema)

    @property
    def retries(self) -> int:
        return self._retrier.retries

    # -- running operations with retries -----------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"store {self.name} is closed; open a new PostgresStore")

    def _write(self, what: str, op: Callable[[psycopg.Connection[Any], int], T]) -> T:
        self._check_open()
        with self._write_lock:
            return self._retrier.run(what, lambda n: op(self._writer.get(), n),
                                     self._writer.drop)

    def _read(self, what: str, op: Callable[[psycopg.Connection[Any]], T]) -> T:
        self._check_open()
        with self._read_lock:
            return self._retrier.run(what, lambda n: op(self._reader.get()), self._reader.drop)

    def _init_schema(self, conn: psycopg.Connection[Any], attempt: int) -> None:
        s = self.schema
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"resumeflow:{s}",))
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            for statement in _DDL.format(s=s).split(";"):
                conn.execute(statement)
            row = conn.execute(f"SELECT value FROM {s}.meta WHERE key = 'schema_version'"
                               ).fetchone()
            if row is None:
                conn.execute(f"INSERT INTO {s}.meta VALUES ('schema_version', %s)",
                             (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"store {self.name} has schema version {row[0]}, written by a newer "
                    f"resumeflow (this one reads up to {SCHEMA_VERSION}); upgrade resumeflow "
                    "or use another schema")

    # -- taking a task ---------------------------------------------------------------------

    def open_task(self, task: str) -> OpenedTask:
        # An attempt whose COMMIT answer was lost may have discarded corrupt records already:
        # the next attempt no longer sees them, so what every attempt discarded is reported.
        discarded: set[int] = set()
        opened = self._write(f"opening task {task!r}",
                             lambda conn, _: self._open_task_tx(conn, task, discarded))
        if discarded != set(opened.discarded_seqs):
            opened = replace(opened, discarded_seqs=tuple(sorted(discarded, reverse=True)))
        self._upto[opened.task_no] = opened.record.seq if opened.record else 0
        return opened

    def _open_task_tx(self, conn: psycopg.Connection[Any], task: str,
                      seen_discarded: set[int]) -> OpenedTask:
        q = self._sql
        with conn.transaction():
            conn.execute(q.insert_task, (task,))
            task_no, epoch, last_seq = _one(conn.execute(q.lock_task_by_name, (task,)))
            epoch += 1
            record, discarded = self._newest_valid(conn, task_no, last_seq)
            seen_discarded.update(discarded)
            good = record.seq if record is not None else 0
            if record is None and (discarded or last_seq > 0):
                self._forget(conn, task_no)
            elif discarded or last_seq > good:
                self._discard_after(conn, task_no, good)
            conn.execute(q.set_owner, (epoch, good, task_no))
            staged = tuple(
                StagedEntry(sink=sink, seq=seq, meta=_decode_meta(meta), payload=bytes(payload))
                for sink, seq, meta, payload in conn.execute(q.staged, (task_no, good)))
        self.rows_read += 2 + len(staged)
        return OpenedTask(task=task, task_no=task_no, epoch=epoch, record=record,
                          discarded_seqs=tuple(discarded), staged=staged)

    def _newest_valid(self, conn: psycopg.Connection[Any], task_no: int,
                      last_seq: int) -> tuple[CommitRecord | None, list[int]]:
        """Records newest first until one verifies: one row read when nothing is corrupt."""
        discarded: list[int] = []
        below = _NO_BOUND
        while True:
            row = conn.execute(self._sql.newest_below, (task_no, below)).fetchone()
            if row is None:
                break
            self.rows_read += 1
            seq, raw = int(row[0]), bytes(row[1])
            below = seq
            try:
                record = decode_record(raw)
                invariant(record.seq == seq, f"record seq {record.seq} stored under seq {seq}")
            except CorruptCheckpointError as exc:
                log.error("commit record seq %d of task #%d is corrupt (%s); falling back to "
                          "the one before it", seq, task_no, exc)
                conn.execute(self._sql.quarantine, (task_no, seq, raw, str(exc)))
                discarded.append(seq)
                continue
            if discarded:
                log.warning("task #%d resumes from checkpoint seq %d; discarded newer corrupt "
                            "checkpoint(s) %s", task_no, seq, discarded)
            return record, discarded
        if last_seq > 0 or discarded:
            log.error("task #%d has no valid commit record left (last seq %d); it starts from "
                      "the beginning of its sources", task_no, last_seq)
        return None, discarded

    def _forget(self, conn: psycopg.Connection[Any], task_no: int) -> None:
        """Drop a task's whole history (no valid record left, or a rewind to nothing); its
        pruning starts again from seq 0 (the mark goes last: the pruner locks it last too)."""
        for table in ("commits", "state", "staged", "prune_marks"):
            conn.execute(f"DELETE FROM {self.schema}.{table} WHERE task_no = %s", (task_no,))

    def _discard_after(self, conn: psycopg.Connection[Any], task_no: int, seq: int) -> None:
        for table in ("commits", "state", "staged"):
            conn.execute(f"DELETE FROM {self.schema}.{table} WHERE task_no = %s AND seq > %s",
                         (task_no, seq))

    # -- state -----------------------------------------------------------------------------

    def load_state(self, task_no: int, key: bytes, epoch: int | None = None) -> bytes | None:
        upto = self._upto.get(task_no, _NO_BOUND)

        def read(conn: psycopg.Connection[Any]) -> bytes | None:
            row = conn.execute(self._sql.load, (task_no, task_no, key, upto)).fetchone()
            if row is None:
                return None
            if epoch is not None and row[0] is not None and int(row[0]) != epoch:
                raise FencedError(
                    f"task #{task_no} is owned by epoch {row[0]}; this worker holds epoch "
                    f"{epoch} and may not read its state any more. Stop this worker: another "
                    "one took the task")
            return None if row[1] is None else bytes(row[1])

        value = self._read("reading state", read)
        self.rows_read += 1
        return value

    # -- the commit point ------------------------------------------------------------------

    def commit(
        self,
        opened: OpenedTask,
        record: CommitRecord,
        delta: Sequence[tuple[bytes, bytes | None]],
        staged: Sequence[StagedEntry],
        release: Sequence[tuple[str, int]],
        in_store: Sequence[InStoreWrite] = (),
    ) -> None:
        invariant(record.epoch == opened.epoch, "record epoch differs from the task's epoch")
        record.verify()
        raw = encode_record(record)
        keys = [k for k, _ in delta]
        values = [v for _, v in delta]
        staged_rows = [(opened.task_no, e.sink, e.seq, encode(e.meta), e.payload)
                       for e in staged]

        def attempt(conn: psycopg.Connection[Any], n: int) -> None:
            # After a failed attempt the previous COMMIT may have landed: decide from data.
            self._commit_tx(conn, opened, record, raw, keys, values, staged_rows, release,
                            in_store, outcome_unknown=n > 0)

        self._write(f"commit seq {record.seq} of task {opened.task!r}", attempt)
        self._upto[opened.task_no] = record.seq
        if record.seq - self.keep_checkpoints + 1 > 1:
            self._pruner.request(opened.task_no)

    def _commit_tx(self, conn: psycopg.Connection[Any], opened: OpenedTask,
                   record: CommitRecord, raw: bytes, keys: list[bytes],
                   values: list[bytes | None], staged_rows: list[tuple[Any, ...]],
                   release: Sequence[tuple[str, int]], in_store: Sequence[InStoreWrite],
                   *, outcome_unknown: bool) -> None:
        q, task_no, seq = self._sql, opened.task_no, record.seq
        with conn.transaction():
            epoch, last_seq = _one(conn.execute(q.lock_task, (task_no,)))
            if epoch != record.epoch:
                raise FencedError(
                    f"task {opened.task!r} is owned by epoch {epoch}; this worker holds epoch "
                    f"{record.epoch} and its commit seq {seq} was refused. Stop this worker: "
                    "another one resumed the task")
            if outcome_unknown and last_seq == seq and self._landed(conn, task_no, record):
                self.unknown_commits += 1
                log.warning("task %r: commit seq %d had landed before the connection was lost; "
                            "not applied again", opened.task, seq)
                return
            invariant(seq == last_seq + 1,
                      f"task {opened.task!r} commits seq {seq} after seq {last_seq}")
            if outcome_unknown:
                self.unknown_commits += 1
                log.warning("task %r: commit seq %d had not landed before the connection was "
                            "lost; writing it now", opened.task, seq)
            with conn.pipeline():
                if keys:
                    conn.execute(q.insert_delta, (task_no, seq, keys, values))
                with conn.cursor() as cur:
                    if release:
                        cur.executemany(q.release, [(task_no, s, upto) for s, upto in release])
                    if staged_rows:
                        cur.executemany(q.insert_staged, staged_rows)
                for write in in_store:
                    write(conn)
                conn.execute(q.insert_commit, (task_no, seq, record.epoch, raw))
                conn.execute(q.set_last_seq, (seq, task_no))
                self._prune(conn, task_no, seq)
            crash_point("store.before_commit")

    def _landed(self, conn: psycopg.Connection[Any], task_no: int, record: CommitRecord) -> bool:
        row = conn.execute(self._sql.record_at, (task_no, record.seq)).fetchone()
        if row is None:
            return False
        try:
            stored = decode_record(bytes(row[0]))
        except CorruptCheckpointError:
            return False
        invariant(stored.digest == record.digest,
                  f"task {record.task!r} seq {record.seq}: another commit of the same epoch "
                  "landed with a different digest")
        return True

    def _prune(self, conn: psycopg.Connection[Any], task_no: int, seq: int) -> None:
        """Drop the records older than the kept window (at most one row per commit); the
        state versions only they needed are dropped by the pruner thread, after the commit."""
        oldest = seq - self.keep_checkpoints + 1
        if oldest > 1:
            conn.execute(self._sql.prune_commits, (task_no, oldest))

    def prune(self, task: str | None = None) -> int:
        """Prune state versions now, in the caller's thread (tools and tests); returns the
        deltas pruned."""
        self._check_open()
        rows = self._read("listing tasks", lambda conn: conn.execute(
            f"SELECT task_no FROM {self.schema}.tasks"
            + (" WHERE task = %s" if task else ""), (task,) if task else ()).fetchall())
        return sum(self._pruner.prune(int(task_no)) for (task_no,) in rows)

    def wait_pruned(self, timeout_s: float = 60.0) -> bool:
        """Wait until the pruner thread has done every request so far; False on timeout."""
        return self._pruner.wait(timeout_s)

    # -- inspection and tools --------------------------------------------------------------

    def records(self, task: str) -> list[tuple[int, bytes]]:
        def read(conn: psycopg.Connection[Any]) -> list[tuple[int, bytes]]:
            rows = conn.execute(self._sql.records, (task,)).fetchall()
            return [(int(seq), bytes(raw)) for seq, raw in rows]

        return self._read(f"reading the records of {task!r}", read)

    def tasks(self) -> list[TaskStatus]:
        rows = self._read("listing tasks",
                          lambda conn: conn.execute(self._sql.status).fetchall())
        out: list[TaskStatus] = []
        for task, epoch, raw, count, staged in rows:
            record: CommitRecord | None = None
            error: str | None = None
            if raw is not None:
                try:
                    record = decode_record(bytes(raw))
                except CorruptCheckpointError as exc:
                    error = str(exc)
            out.append(TaskStatus(task=task, epoch=int(epoch), record=record, error=error,
                                  checkpoints=int(count), staged=int(staged)))
        return out

    def rewind(self, task: str, seq: int) -> CommitRecord | None:
        """Make checkpoint ``seq`` (0: the beginning) the newest one of ``task``; logged.

        Bumps the epoch, so a worker still running the task is fenced. Sinks that staged
        output are rewound by their own recovery.
        """
        def tx(conn: psycopg.Connection[Any], _: int) -> tuple[int, CommitRecord | None]:
            s = self.schema
            with conn.transaction():
                row = conn.execute(self._sql.lock_task_by_name, (task,)).fetchone()
                if row is None:
                    raise ConfigurationError(f"no task {task!r} in this store; see `status`")
                task_no, _, last_seq = row
                target: CommitRecord | None = None
                if seq > 0:
                    raw = conn.execute(self._sql.record_at, (task_no, seq)).fetchone()
                    if raw is None:
                        raise ConfigurationError(
                            f"task {task!r} keeps no checkpoint seq {seq}; pick one listed by "
                            "`resumeflow checkpoints list`")
                    target = decode_record(bytes(raw[0]))
                    self._discard_after(conn, task_no, seq)
                else:
                    self._forget(conn, task_no)
                conn.execute(f"UPDATE {s}.tasks SET last_seq = %s, epoch = epoch + 1 "
                             "WHERE task_no = %s", (seq, task_no))
                conn.execute(f"INSERT INTO {s}.rewinds (task_no, from_seq, to_seq) "
                             "VALUES (%s, %s, %s)", (task_no, last_seq, seq))
            return int(last_seq), target

        last_seq, target = self._write(f"rewinding {task!r}", tx)
        log.warning("task %r rewound from checkpoint seq %d to seq %d", task, last_seq, seq)
        return target

    def close(self) -> None:
        """Stop the pruner (after its current transaction) and close the connections; safe
        to call twice (and while the server is down)."""
        self._closed = True
        self._pruner.close()
        with self._write_lock:
            self._writer.drop()
        with self._read_lock:
            self._reader.drop()

    def __repr__(self) -> str:
        return f"PostgresStore({self.name!r})"


class _Sql:
    """Every statement of the store, with the schema filled in once."""

    def __init__(self, s: str) -> None:
        self.insert_task = (f"INSERT INTO {s}.tasks (task, epoch, last_seq) VALUES (%s, 0, 0) "
                            "ON CONFLICT (task) DO NOTHING")
        self.lock_task_by_name = (f"SELECT task_no, epoch, last_seq FROM {s}.tasks "
                                  "WHERE task = %s FOR UPDATE")
        self.lock_task = f"SELECT epoch, last_seq FROM {s}.tasks WHERE task_no = %s FOR UPDATE"
        self.set_owner = f"UPDATE {s}.tasks SET epoch = %s, last_seq = %s WHERE task_no = %s"
        self.set_last_seq = f"UPDATE {s}.tasks SET last_seq = %s WHERE task_no = %s"
        self.newest_below = (f"SELECT seq, record FROM {s}.commits WHERE task_no = %s AND "
                             "seq < %s ORDER BY seq DESC LIMIT 1")
        self.quarantine = (f"INSERT INTO {s}.quarantine (task_no, seq, record, reason) "
                           "VALUES (%s, %s, %s, %s)")
        self.staged = (f"SELECT sink, seq, meta, payload FROM {s}.staged WHERE task_no = %s "
                       "AND seq <= %s ORDER BY seq, sink")
        # One statement, one snapshot: the owner's epoch and the value.
        self.load = (f"SELECT (SELECT epoch FROM {s}.tasks WHERE task_no = %s), "
                     f"(SELECT value FROM {s}.state WHERE task_no = %s AND key = %s AND "
                     "seq <= %s ORDER BY seq DESC LIMIT 1)")
        self.insert_delta = (f"INSERT INTO {s}.state (task_no, key, seq, value) "
                             "SELECT %s, k, %s, v FROM unnest(%b::bytea[], %b::bytea[]) "
                             "AS u(k, v)")
        self.release = f"DELETE FROM {s}.staged WHERE task_no = %s AND sink = %s AND seq <= %s"
        self.insert_staged = f"INSERT INTO {s}.staged VALUES (%s, %s, %s, %s, %s)"
        self.insert_commit = f"INSERT INTO {s}.commits VALUES (%s, %s, %s, %s)"
        self.record_at = f"SELECT record FROM {s}.commits WHERE task_no = %s AND seq = %s"
        self.prune_commits = f"DELETE FROM {s}.commits WHERE task_no = %s AND seq < %s"
        self.records = (f"SELECT c.seq, c.record FROM {s}.commits c JOIN {s}.tasks t ON "
                        "t.task_no = c.task_no WHERE t.task = %s ORDER BY c.seq")
        self.status = (
            f"SELECT t.task, t.epoch, "
            f"(SELECT record FROM {s}.commits c WHERE c.task_no = t.task_no "
            " ORDER BY seq DESC LIMIT 1), "
            f"(SELECT count(*) FROM {s}.commits c WHERE c.task_no = t.task_no), "
            f"(SELECT count(*) FROM {s}.staged g WHERE g.task_no = t.task_no) "
            f"FROM {s}.tasks t ORDER BY t.task")


def _one(cursor: psycopg.Cursor[Any]) -> Any:
    row = cursor.fetchone()
    invariant(row is not None, "a row the transaction just locked is missing")
    return row


def _decode_meta(raw: bytes) -> dict[str, Any]:
    value = decode(bytes(raw))
    invariant(isinstance(value, dict), "staged meta is not an object")
    return value  # type: ignore[no-any-return]
