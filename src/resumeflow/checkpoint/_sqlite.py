"""SQLite store: commit records, keyed state and staged output in one database.

SQLite runs in WAL mode with ``synchronous=FULL``: once ``commit()`` returns, the commit
record, the state delta of its ``seq`` and the staged sink output are durable together; a
crash before that leaves none of them. State is a compacted table overlaid with one delta per
checkpoint (see ``_sqlite_state``); the deltas of the last ``keep_checkpoints`` records are
kept, so falling back from a corrupt record or rewinding to a kept one restores the exact
state of that checkpoint.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

from .._faults import crash_point
from ..errors import (
    ClosedError,
    ConfigurationError,
    CorruptCheckpointError,
    FencedError,
    UnavailableError,
    invariant,
)
from ._record import SCHEMA_VERSION, CommitRecord, decode_record, encode_record
from ._sqlite_process import ProcessCompactor
from ._sqlite_state import (
    MAX_TAIL_DELTAS,
    SECURE_DELETE,
    WAL_BACKSTOP_PAGES,
    Compactor,
    TailIndex,
    compact,
    delta_rows,
    insert_many,
    roll_back_runs_after,
)
from ._store import InStoreWrite, OpenedTask, StagedEntry, TaskStatus

__all__ = ["SQLiteStore"]

COMPACTORS = ("process", "thread")

BUSY_TIMEOUT_S = 30.0
"""How long a write waits for SQLite's write lock (held by another process's or the
compactor's transaction) before the store reports itself unavailable."""
BEGIN_POLL_S = (0.0001, 0.002)
"""First and longest sleep of a commit between two looks at the compactor's hold of the
write lock (doubling)."""
HELD_POLL_MAX_S = 0.05
"""How long a commit polls the compactor's hold before it leaves the wait to SQLite (a hold
that lasts, or a flag a killed compactor left set)."""

WAL_CHECKPOINT_EVERY = 8
"""Commits between two requests for a write-ahead log checkpoint on the compactor's thread
(compaction runs checkpoint the log too)."""

log = logging.getLogger("resumeflow.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    task_no INTEGER PRIMARY KEY,
    task TEXT NOT NULL UNIQUE,
    epoch INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    compacted_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS commits (
    task_no INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (task_no, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deltas (
    task_no INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    page_no INTEGER NOT NULL,
    page BLOB NOT NULL,
    PRIMARY KEY (task_no, seq, page_no)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS delta_dirs (
    task_no INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    firsts BLOB NOT NULL,
    PRIMARY KEY (task_no, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (
    task_no INTEGER NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (task_no, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS undo (
    task_no INTEGER NOT NULL,
    to_seq INTEGER NOT NULL,
    chunk INTEGER NOT NULL,
    from_seq INTEGER NOT NULL,
    images BLOB NOT NULL,
    PRIMARY KEY (task_no, to_seq, chunk)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS staged (
    task_no INTEGER NOT NULL,
    sink TEXT NOT NULL,
    seq INTEGER NOT NULL,
    meta BLOB NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (task_no, sink, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine (
    task_no INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    record BLOB NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rewinds (
    task_no INTEGER NOT NULL,
    from_seq INTEGER NOT NULL,
    to_seq INTEGER NOT NULL,
    at REAL NOT NULL
);
"""


class _PreparedDelta(list[tuple[bytes, bytes | None]]):
    """A state delta with its pages encoded for one task's checkpoint (``prepare_delta``);
    still the list of changed keys, so any store can take it as a plain delta."""

    def __init__(self, delta: Sequence[tuple[bytes, bytes | None]], task_no: int,
                 seq: int) -> None:
        super().__init__(delta)
        self.made_for = (task_no, seq)
        self.encoded = delta_rows(task_no, seq, delta)


class SQLiteStore:
    """A store in one SQLite file; the default for one process.

    Args:
        path: database file, created if missing.
        keep_checkpoints: how many newest commit records (and the state deltas they need)
            each task keeps for fallback and rewind; at least 2.
        create: create the database when missing; ``False`` for read-only tools.
        compactor: where the background compaction runs: ``"process"`` (the default: a
            child process, so it does not hold the pipeline's interpreter lock; it starts
            at the first compaction and ends with the store) or ``"thread"`` (in this
            process).
    """

    def __init__(self, path: str | os.PathLike[str], *, keep_checkpoints: int = 10,
                 create: bool = True, compactor: str = "process") -> None:
        if compactor not in COMPACTORS:
            raise ConfigurationError(
                f"compactor={compactor!r}: choose one of {', '.join(map(repr, COMPACTORS))}")
        if keep_checkpoints < 2:
            raise ConfigurationError(
                f"keep_checkpoints={keep_checkpoints}: keep at least 2 so a corrupt newest "
                "checkpoint can fall back to the one before; set keep_checkpoints >= 2"
            )
        self.path = Path(path)
        self.keep_checkpoints = keep_checkpoints
        self.rows_read = 0
        """Rows read by ``open_task`` and ``load_state`` since the store opened."""
        self._lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        """Connection of ``load_state``: reads committed data only, and never waits for a
        commit running on another thread (pipelined commits) on the write connection."""
        self._recent = TailIndex()
        self._compacted = threading.Condition()
        self._since_wal_checkpoint = 0
        self._compactor: Compactor | ProcessCompactor
        if compactor == "process" and sys.executable:
            self._compactor = ProcessCompactor(self.path, self._recent, self._notify_compacted)
        else:
            self._compactor = Compactor(self.path, self._recent, self._notify_compacted,
                                        self._lock, threading.Event())
        if not create and not self.path.exists():
            raise ConfigurationError(
                f"no store at {str(self.path)!r}; pass the --store path a pipeline ran with"
            )
        if self.path.parent and not self.path.parent.exists():
            raise ConfigurationError(
                f"store directory {str(self.path.parent)!r} does not exist; create it or "
                "choose another --store path"
            )
        try:
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False,
                timeout=BUSY_TIMEOUT_S)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
            self._db.execute("PRAGMA foreign_keys=OFF")
            self._db.execute(f"PRAGMA secure_delete={SECURE_DELETE}")
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            raise ConfigurationError(
                f"cannot open store {str(self.path)!r}: {exc}; point --store to a resumeflow "
                "store or a new file"
            ) from exc

    @property
    def database_path(self) -> Path:
        """Resolved path of the database, for sinks that share its transaction."""
        return self.path.resolve()

    @property
    def connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise ClosedError(f"store {str(self.path)!r} is closed; open a new SQLiteStore")
        return self._db

    def _init_schema(self) -> None:
        db = self.connection
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"store {str(self.path)!r} has schema version {row[0]}, written by a newer "
                    f"resumeflow (this one reads up to {SCHEMA_VERSION}); upgrade resumeflow or "
                    "use another --store path"
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- taking a task ---------------------------------------------------------------------

    def open_task(self, task: str) -> OpenedTask:
        with self._lock:
            db = self.connection
            self._begin(db)
            try:
                opened = self._open_task_locked(db, task)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return opened

    def _open_task_locked(self, db: sqlite3.Connection, task: str) -> OpenedTask:
        db.execute(
            "INSERT OR IGNORE INTO tasks (task, epoch, last_seq) VALUES (?, 0, 0)", (task,)
        )
        task_no, epoch, last_seq = db.execute(
            "SELECT task_no, epoch, last_seq FROM tasks WHERE task = ?", (task,)
        ).fetchone()
        epoch += 1
        self._recent.forget(task_no)
        record, discarded = self._newest_valid(db, task_no, last_seq)
        good_seq = record.seq if record is not None else 0
        if record is None and (discarded or last_seq > 0):
            self._forget_task_state(db, task_no)
        elif discarded:
            roll_back_runs_after(db, task_no, good_seq)
            self._discard_after(db, task_no, good_seq)
        db.execute(
            "UPDATE tasks SET epoch = ?, last_seq = ? WHERE task_no = ?",
            (epoch, good_seq, task_no),
        )
        staged = tuple(
            StagedEntry(sink=sink, seq=seq, meta=_decode_meta(meta), payload=bytes(payload))
            for sink, seq, meta, payload in db.execute(
                "SELECT sink, seq, meta, payload FROM staged WHERE task_no = ? AND seq <= ? "
                "ORDER BY seq, sink",
                (task_no, good_seq),
            )
        )
        self.rows_read += 2 + len(staged)
        return OpenedTask(task=task, task_no=task_no, epoch=epoch, record=record,
                          discarded_seqs=tuple(discarded), staged=staged)

    def _newest_valid(
        self, db: sqlite3.Connection, task_no: int, last_seq: int
    ) -> tuple[CommitRecord | None, list[int]]:
        """Read records newest first until one verifies: O(1) reads when nothing is corrupt."""
        discarded: list[int] = []
        # Only the newest few rows are read, so the cursor is left unexhausted: close it, or
        # whatever keeps this frame alive (a log record holding ``exc``) keeps its statement
        # and read snapshot open, and the next BEGIN IMMEDIATE fails with "database is locked".
        with closing(db.execute(
            "SELECT seq, record FROM commits WHERE task_no = ? ORDER BY seq DESC", (task_no,)
        )) as cursor:
            return self._first_valid(db, cursor, task_no, last_seq, discarded)

    def _first_valid(self, db: sqlite3.Connection, cursor: sqlite3.Cursor, task_no: int,
                     last_seq: int, discarded: list[int]) -> tuple[CommitRecord | None, list[int]]:
        for seq, raw in cursor:
            self.rows_read += 1
            try:
                record = decode_record(bytes(raw))
                invariant(record.seq == seq, f"record seq {record.seq} stored under seq {seq}")
            except CorruptCheckpointError as exc:
                log.error("commit record seq %d of task #%d is corrupt (%s); falling back to "
                          "the one before it", seq, task_no, exc)
                db.execute(
                    "INSERT INTO quarantine VALUES (?, ?, ?, ?)", (task_no, seq, raw, str(exc))
                )
                discarded.append(seq)
                continue
            if discarded and record.digest is not None:
                log.warning("task #%d resumes from checkpoint seq %d; discarded newer corrupt "
                            "checkpoint(s) %s", task_no, record.seq, discarded)
            return record, discarded
        if last_seq > 0 or discarded:
            log.error("task #%d has no valid commit record left (last seq %d); it starts from "
                      "the beginning of its sources", task_no, last_seq)
        return None, discarded

    def _discard_after(self, db: sqlite3.Connection, task_no: int, seq: int) -> None:
        compacted = db.execute("SELECT compacted_seq FROM tasks WHERE task_no = ?",
                               (task_no,)).fetchone()[0]
        invariant(seq >= compacted,
                  f"task #{task_no}: going back to seq {seq} below compacted seq {compacted}")
        db.execute("DELETE FROM commits WHERE task_no = ? AND seq > ?", (task_no, seq))
        db.execute("DELETE FROM deltas WHERE task_no = ? AND seq > ?", (task_no, seq))
        db.execute("DELETE FROM delta_dirs WHERE task_no = ? AND seq > ?", (task_no, seq))
        db.execute("DELETE FROM staged WHERE task_no = ? AND seq > ?", (task_no, seq))

    def _forget_task_state(self, db: sqlite3.Connection, task_no: int) -> None:
        for table in ("commits", "deltas", "delta_dirs", "state", "undo", "staged"):
            db.execute(f"DELETE FROM {table} WHERE task_no = ?", (task_no,))
        db.execute("UPDATE tasks SET compacted_seq = 0, last_seq = 0 WHERE task_no = ?",
                   (task_no,))

    # -- state -----------------------------------------------------------------------------

    def _read_connection(self) -> sqlite3.Connection:
        db = self._reader
        if db is None:
            if self._db is None:
                raise ClosedError(f"store {str(self.path)!r} is closed; open a new SQLiteStore")
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                 timeout=30.0)
            self._reader = db
        return db

    def load_state(self, task_no: int, key: bytes, epoch: int | None = None) -> bytes | None:
        db = self._read_connection()
        value = self._load_state(db, task_no, key)
        if epoch is not None:
            # The epoch is read after the value: if it is still ours, the value was read
            # before any new owner took the task, so before any of its commits. (One read
            # transaction around both would pin a snapshot older than the tail index's
            # lock, and the index could then miss a delta committed in between.)
            owner = db.execute("SELECT epoch FROM tasks WHERE task_no = ?",
                               (task_no,)).fetchone()
            self.rows_read += 1
            if owner is not None and int(owner[0]) != epoch:
                raise FencedError(
                    f"task #{task_no} is owned by epoch {owner[0]}; this worker holds epoch "
                    f"{epoch} and may not read its state any more. Stop this worker: another "
                    "one took the task")
        return value

    def _load_state(self, db: sqlite3.Connection, task_no: int, key: bytes) -> bytes | None:
        found, value, rows = self._recent.lookup(db, task_no, key)
        self.rows_read += rows
        if found:
            return value
        row = db.execute(
            "SELECT value FROM state WHERE task_no = ? AND key = ?", (task_no, key)
        ).fetchone()
        self.rows_read += 1
        return None if row is None else bytes(row[0])

    # -- the commit point ------------------------------------------------------------------

    def prepare_delta(self, opened: OpenedTask, seq: int,
                      delta: Sequence[tuple[bytes, bytes | None]]) -> _PreparedDelta:
        """Encode checkpoint ``seq``'s delta into its pages ahead of ``commit`` (the runtime
        does it while the sinks stage their output); ``commit`` takes the result as the
        delta. Writes nothing."""
        return _PreparedDelta(delta, opened.task_no, seq)

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
        pages: tuple[tuple[int, int, bytes], list[tuple[int, int, int, bytes]]] | None = None
        firsts: list[bytes] = []
        if delta:
            if isinstance(delta, _PreparedDelta) and delta.made_for == (opened.task_no,
                                                                         record.seq):
                directory, rows, firsts = delta.encoded
            else:
                directory, rows, firsts = delta_rows(opened.task_no, record.seq, delta)
            pages = (directory, rows)
        waiting = self._compactor.commit_waiting
        waiting.set()
        with self._lock:
            try:
                db = self.connection
                self._begin(db)
            finally:
                waiting.clear()
            try:
                self._check_owner(db, opened, record)
                self._write(db, opened.task_no, record, raw, pages, staged, release, in_store)
                crash_point("store.before_commit")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            if firsts:
                self._recent.add(opened.task_no, record.seq, firsts)
            compacted = db.execute("SELECT compacted_seq FROM tasks WHERE task_no = ?",
                                   (opened.task_no,)).fetchone()[0]
        tail = record.seq - compacted
        self._since_wal_checkpoint += 1
        if self._since_wal_checkpoint >= WAL_CHECKPOINT_EVERY:
            self._since_wal_checkpoint = 0
            self._compactor.checkpoint_wal()
        if tail >= self._compactor.compact_after(opened.task_no):
            self._compactor.request(opened.task_no, opened.epoch)
        if tail > MAX_TAIL_DELTAS:
            self._bound_tail(opened)

    def _bound_tail(self, opened: OpenedTask) -> None:
        """Wait for the compactor while a task's uncompacted tail is too long (back-pressure
        that keeps recovery's cold reads short)."""
        while True:
            with self._lock:
                compacted, last, epoch = self.connection.execute(
                    "SELECT compacted_seq, last_seq, epoch FROM tasks WHERE task_no = ?",
                    (opened.task_no,)).fetchone()
            if last - compacted <= MAX_TAIL_DELTAS or epoch != opened.epoch:
                return
            with self._compacted:
                self._compactor.request(opened.task_no, opened.epoch)
                self._compacted.wait(timeout=1.0)

    def _notify_compacted(self) -> None:
        with self._compacted:
            self._compacted.notify_all()

    def _check_owner(self, db: sqlite3.Connection, opened: OpenedTask,
                     record: CommitRecord) -> None:
        epoch, last_seq = db.execute(
            "SELECT epoch, last_seq FROM tasks WHERE task_no = ?", (opened.task_no,)
        ).fetchone()
        if epoch != record.epoch:
            raise FencedError(
                f"task {opened.task!r} is owned by epoch {epoch}; this worker holds epoch "
                f"{record.epoch} and its commit seq {record.seq} was refused. Stop this worker: "
                "another one resumed the task"
            )
        invariant(record.seq == last_seq + 1,
                  f"task {opened.task!r} commits seq {record.seq} after seq {last_seq}")

    def _write(self, db: sqlite3.Connection, task_no: int, record: CommitRecord, raw: bytes,
               pages: tuple[tuple[int, int, bytes], list[tuple[int, int, int, bytes]]] | None,
               staged: Sequence[StagedEntry], release: Sequence[tuple[str, int]],
               in_store: Sequence[InStoreWrite]) -> None:
        seq = record.seq
        if pages is not None:
            db.execute("INSERT INTO delta_dirs VALUES (?, ?, ?)", pages[0])
            insert_many(db, "INSERT INTO deltas VALUES ", 4, pages[1])
        for sink, upto in release:
            db.execute("DELETE FROM staged WHERE task_no = ? AND sink = ? AND seq <= ?",
                       (task_no, sink, upto))
        if staged:
            db.executemany(
                "INSERT INTO staged VALUES (?, ?, ?, ?, ?)",
                [(task_no, e.sink, e.seq, _encode_meta(e.meta), e.payload) for e in staged],
            )
        for write in in_store:
            write(db)
        db.execute("INSERT INTO commits VALUES (?, ?, ?, ?)", (task_no, seq, record.epoch, raw))
        db.execute("UPDATE tasks SET last_seq = ? WHERE task_no = ?", (seq, task_no))
        self._prune(db, task_no, seq)

    def _prune(self, db: sqlite3.Connection, task_no: int, seq: int) -> None:
        """Drop records older than the kept window; the compactor drops the state history
        only they needed, a little at a time (never inside a commit)."""
        oldest_kept = seq - self.keep_checkpoints + 1
        if oldest_kept > 1:
            db.execute("DELETE FROM commits WHERE task_no = ? AND seq < ?", (task_no, oldest_kept))

    def compact(self, task: str | None = None) -> int:
        """Compact every uncompacted delta now, in the caller's thread (tools and tests), in
        as many runs as that takes (``MAX_RUN_DELTAS`` each); returns the runs done."""
        done = 0
        with self._lock:
            db = self.connection
            rows = db.execute(
                "SELECT task_no, epoch FROM tasks" + (" WHERE task = ?" if task else ""),
                (task,) if task else ()).fetchall()
            for task_no, epoch in rows:
                while compact(db, task_no, epoch, self._recent):
                    done += 1
        return done

    # -- inspection and tools --------------------------------------------------------------

    def records(self, task: str) -> list[tuple[int, bytes]]:
        db = self.connection
        row = db.execute("SELECT task_no FROM tasks WHERE task = ?", (task,)).fetchone()
        if row is None:
            return []
        return [(seq, bytes(raw)) for seq, raw in db.execute(
            "SELECT seq, record FROM commits WHERE task_no = ? ORDER BY seq", (row[0],))]

    def tasks(self) -> list[TaskStatus]:
        db = self.connection
        out: list[TaskStatus] = []
        for task_no, task, epoch in db.execute(
            "SELECT task_no, task, epoch FROM tasks ORDER BY task"
        ).fetchall():
            raw = db.execute(
                "SELECT record FROM commits WHERE task_no = ? ORDER BY seq DESC LIMIT 1",
                (task_no,),
            ).fetchone()
            count = db.execute("SELECT count(*) FROM commits WHERE task_no = ?",
                               (task_no,)).fetchone()[0]
            staged = db.execute("SELECT count(*) FROM staged WHERE task_no = ?",
                                (task_no,)).fetchone()[0]
            record: CommitRecord | None = None
            error: str | None = None
            if raw is not None:
                try:
                    record = decode_record(bytes(raw[0]))
                except CorruptCheckpointError as exc:
                    error = str(exc)
            out.append(TaskStatus(task=task, epoch=epoch, record=record, error=error,
                                  checkpoints=count, staged=staged))
        return out

    def rewind(self, task: str, seq: int) -> CommitRecord | None:
        """Make checkpoint ``seq`` (0: the beginning) the newest one of ``task``; logged.

        The caller must make sure no worker runs the task. Sinks that staged output are
        rewound by their own recovery (file sinks truncate to the rewound record's length).
        """
        with self._lock:
            db = self.connection
            self._begin(db)
            try:
                row = db.execute("SELECT task_no, last_seq FROM tasks WHERE task = ?",
                                 (task,)).fetchone()
                if row is None:
                    raise ConfigurationError(f"no task {task!r} in this store; see `status`")
                task_no, last_seq = row
                target: CommitRecord | None = None
                if seq > 0:
                    raw = db.execute("SELECT record FROM commits WHERE task_no = ? AND seq = ?",
                                     (task_no, seq)).fetchone()
                    if raw is None:
                        raise ConfigurationError(
                            f"task {task!r} keeps no checkpoint seq {seq}; pick one listed by "
                            "`resumeflow checkpoints list`")
                    target = decode_record(bytes(raw[0]))
                    roll_back_runs_after(db, task_no, seq)
                    self._discard_after(db, task_no, seq)
                else:
                    self._forget_task_state(db, task_no)
                self._recent.forget(task_no)
                db.execute("UPDATE tasks SET last_seq = ?, epoch = epoch + 1 WHERE task_no = ?",
                           (seq, task_no))
                db.execute("INSERT INTO rewinds VALUES (?, ?, ?, strftime('%s','now'))",
                           (task_no, last_seq, seq))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        log.warning("task %r rewound from checkpoint seq %d to seq %d", task, last_seq, seq)
        return target

    def close(self) -> None:
        """Let the compactor finish the run it is doing, then close. The uncompacted tail
        (at most ``MAX_TAIL_DELTAS`` deltas, as after a crash) is left to the next run's
        compactor: compacting it here cost W1 120 ms at every exit (a tenth of its run)
        to spare a clean restart cold reads that a restart after a crash makes anyway."""
        self._compactor.close()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def _begin(self, db: sqlite3.Connection) -> None:
        """Take the write lock. While the compactor process holds it for a chunk (about a
        quarter of a millisecond), SQLite's own busy handler would sleep 1, then 2, then 5 ms
        between tries: a third of the checkpoint benchmark's commits slept the whole first
        millisecond. So while the compactor says it holds the lock, the commit polls that
        (sleeps from a tenth of a millisecond, doubling) for up to ``HELD_POLL_MAX_S``, then
        asks SQLite, whose busy handler waits for any other writer."""
        writing = self._compactor.writing
        if writing():
            pause, deadline = BEGIN_POLL_S[0], time.monotonic() + HELD_POLL_MAX_S
            while writing() and time.monotonic() < deadline:
                time.sleep(pause)
                pause = min(pause * 2, BEGIN_POLL_S[1])
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise UnavailableError(
                f"store {str(self.path)!r} is locked or unavailable ({exc}); retry, or stop the "
                "other process using it"
            ) from exc


def _encode_meta(meta: dict[str, object]) -> bytes:
    from .._codec import encode

    return encode(meta)


def _decode_meta(raw: bytes) -> dict[str, object]:
    from .._codec import decode

    value = decode(bytes(raw))
    invariant(isinstance(value, dict), "staged meta is not an object")
    return value  # type: ignore[no-any-return]
