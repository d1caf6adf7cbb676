"""Keyed state in SQLite: a delta blob per checkpoint, indexed into rows in the background.

A checkpoint writes its changed keys, sorted, as a few encoded pages in ``deltas`` (with a
directory of each page's first key in ``delta_dirs``) inside the commit transaction, so a
commit costs in proportion to the keys changed, never to the state. A
background compactor then applies the deltas after ``tasks.compacted_seq`` to the ``state``
table (one row per key: O(1) cold reads), writing the values it overwrites as ``undo`` images
in the same transactions. So:

* the state of the newest checkpoint is the table overlaid with the uncompacted deltas (a
  short tail: the compactor follows the commits, and commits wait for it past
  ``MAX_TAIL_DELTAS``); a cold read looks a key up in one page per uncompacted delta;
* any kept checkpoint ``S`` is restored exactly by rolling back the compaction runs that end
  after ``S`` (newest first) and discarding the deltas after ``S`` (fallback and rewind);
* a compaction interrupted half-way is rolled back by the next compactor (reads stay exact
  meanwhile: the keys it touched are in uncompacted deltas, read first), and a
  compactor whose task has a newer epoch stops before its next write (a zombie cannot touch
  the new owner's state).
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import mmap
import operator
import os
import queue
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import IO, Protocol

import msgspec

__all__ = [
    "COMPACT_AFTER",
    "COMPACT_AFTER_MAX",
    "MAX_TAIL_DELTAS",
    "PAGE_KEYS",
    "SECURE_DELETE",
    "WAL_BACKSTOP_PAGES",
    "Compactor",
    "TailIndex",
    "compact",
    "compact_after",
    "decode_delta",
    "delta_rows",
    "encode_delta",
    "insert_many",
    "roll_back_runs_after",
]

log = logging.getLogger("resumeflow.store")

COMPACT_AFTER = 4
"""Uncompacted deltas of a task that start a compaction (merging several deltas makes keys
updated in every checkpoint cost one row write, not one per checkpoint), until a run has
measured how much the task's deltas overlap (``compact_after``)."""

COMPACT_AFTER_MAX = 16
"""The most uncompacted deltas ``compact_after`` lets a task's tail reach before a run."""

MAX_TAIL_DELTAS = 32
"""Uncompacted deltas a task may have before a commit waits for the compactor."""

MAX_RUN_DELTAS = COMPACT_AFTER_MAX
"""The most deltas one compaction run merges: a long tail (after a restart, or when the
compactor fell behind) is compacted in several runs, each of which shortens it when it
ends, instead of one long run that commits at the tail bound wait for as a whole."""

_CHUNK_KEYS = 250
"""Keys per compaction transaction of a compactor thread: a commit waits for one chunk at
most, woken as soon as the thread lets the store's lock go."""

PROCESS_CHUNK_KEYS = 64
"""Keys per compaction transaction of a compactor process: a commit waiting for a chunk
sleeps in SQLite's busy handler, which retries after 1, 2, then 5 ms, so a chunk must end
within about a millisecond (the checkpoint benchmark, 2 alternating pairs: commit p99
7.3-8.3 ms against 10.4-11.2 ms with 250 keys)."""

Delta = list[tuple[bytes, bytes | None]]

_encode = msgspec.msgpack.Encoder().encode
_decoder = msgspec.msgpack.Decoder(list[tuple[bytes, bytes | None]])


def encode_delta(delta: Sequence[tuple[bytes, bytes | None]]) -> bytes:
    """Encode changed keys (``None`` value: deleted) as one blob."""
    return _encode(delta)


def decode_delta(blob: bytes) -> Delta:
    """Decode a delta or undo blob; raises ``msgspec.DecodeError`` if it is damaged."""
    return _decoder.decode(blob)


_first = operator.itemgetter(0)

PAGE_KEYS = 128
"""Entries per delta page: a cold read decodes one page per uncompacted delta, at most."""


def delta_rows(task_no: int, seq: int, delta: Sequence[tuple[bytes, bytes | None]]
               ) -> tuple[tuple[int, int, bytes], list[tuple[int, int, int, bytes]], list[bytes]]:
    """A delta as sorted pages plus a directory of each page's first key."""
    items = sorted(delta, key=_first)  # keys are unique: comparing keys alone is enough
    pages = [items[i:i + PAGE_KEYS] for i in range(0, len(items), PAGE_KEYS)]
    firsts = [page[0][0] for page in pages]
    rows = [(task_no, seq, no, _encode(page)) for no, page in enumerate(pages)]
    return (task_no, seq, _encode(firsts)), rows, firsts


_firsts_decoder = msgspec.msgpack.Decoder(list[bytes])


class TailIndex:
    """Per task, a directory of the uncompacted deltas (each page's first key), so a cold read
    fetches and decodes at most one page per uncompacted delta: its cost does not grow with
    the state, nor with the size of the deltas. Decoded pages are cached until compacted."""

    def __init__(self) -> None:
        self._dirs: dict[int, list[tuple[int, list[bytes]]]] = {}
        self._pages: dict[int, dict[tuple[int, int], dict[bytes, bytes | None]]] = {}
        self._lock = threading.Lock()

    def _load(self, db: sqlite3.Connection, task_no: int) -> tuple[list[tuple[int, list[bytes]]],
                                                                  int]:
        # Under the lock: a commit on another thread that lands meanwhile either is in the
        # rows read or is added after them (``add`` waits), never lost between the two.
        with self._lock:
            rows = db.execute(
                "SELECT d.seq, d.firsts FROM delta_dirs d JOIN tasks t ON t.task_no = d.task_no "
                "WHERE d.task_no = ? AND d.seq > t.compacted_seq ORDER BY d.seq", (task_no,)
            ).fetchall()
            dirs = [(int(seq), _firsts_decoder.decode(bytes(firsts))) for seq, firsts in rows]
            self._dirs[task_no] = dirs
            self._pages[task_no] = {}
            return list(dirs), len(rows)

    def lookup(self, db: sqlite3.Connection, task_no: int,
               key: bytes) -> tuple[bool, bytes | None, int]:
        """``(found, value, rows read)`` for ``key`` in the uncompacted deltas, newest first."""
        rows = 0
        with self._lock:
            dirs = self._dirs.get(task_no)
            if dirs is not None:
                dirs = list(dirs)
        if dirs is None:
            dirs, rows = self._load(db, task_no)
        pages = self._pages.setdefault(task_no, {})
        for seq, firsts in reversed(dirs):
            page_no = bisect.bisect_right(firsts, key) - 1
            if page_no < 0:
                continue
            page = pages.get((seq, page_no))
            if page is None:
                row = db.execute(
                    "SELECT page FROM deltas WHERE task_no = ? AND seq = ? AND page_no = ?",
                    (task_no, seq, page_no)).fetchone()
                rows += 1
                if row is None:  # compacted and pruned meanwhile: the table has it
                    break
                page = dict(decode_delta(bytes(row[0])))
                pages[(seq, page_no)] = page
            if key in page:
                return True, page[key], rows
        return False, None, rows

    def add(self, task_no: int, seq: int, firsts: list[bytes]) -> None:
        """Record a committed delta's directory (if this task's directory is loaded)."""
        with self._lock:
            dirs = self._dirs.get(task_no)
            if dirs is not None and (not dirs or dirs[-1][0] < seq):
                dirs.append((seq, firsts))

    def forget(self, task_no: int) -> None:
        with self._lock:
            self._dirs.pop(task_no, None)
            self._pages.pop(task_no, None)

    def trim(self, task_no: int, upto: int) -> None:
        """Drop deltas now in the table (seq at or below ``upto``) and their cached pages."""
        with self._lock:
            dirs = self._dirs.get(task_no)
            if dirs is not None:
                self._dirs[task_no] = [(seq, f) for seq, f in dirs if seq > upto]
            pages = self._pages.get(task_no)
            if pages:
                self._pages[task_no] = {k: v for k, v in pages.items() if k[0] > upto}


def _tail(db: sqlite3.Connection, task_no: int) -> tuple[int, int, int]:
    epoch, compacted, last = db.execute(
        "SELECT epoch, compacted_seq, last_seq FROM tasks WHERE task_no = ?", (task_no,)
    ).fetchone()
    return int(epoch), int(compacted), int(last)


class Waiting(Protocol):
    """Set while a commit waits for the write turn (a ``threading.Event``, or ``TurnFile``'s
    byte shared with a compactor process)."""

    def is_set(self) -> bool: ...


WriteLock = contextlib.AbstractContextManager[object]
"""The write turn taken around each write transaction of the compactor."""


def compact_after(overlap: float | None) -> int:
    """Uncompacted deltas that start a task's next compaction, from the ``overlap`` its last
    run measured (entries read from its deltas per distinct key written; ``None``: no run
    yet). A run writes each distinct key once, so where checkpoints change the same keys
    again (a small hot state: W1's 10,000 keys in every delta) letting the tail grow makes
    a run cost no more while it covers more checkpoints; where they change different keys a
    longer tail saves nothing and makes each run, and the fsync after it, larger."""
    if overlap is None or overlap <= 1.0:
        return COMPACT_AFTER
    return max(COMPACT_AFTER, min(COMPACT_AFTER_MAX, int(COMPACT_AFTER * overlap)))


def compact(db: sqlite3.Connection, task_no: int, epoch: int, recent: TailIndex,
            write_lock: WriteLock | None = None,
            commit_waiting: Waiting | None = None,
            measured: Callable[[int, int], None] | None = None,
            chunk_keys: int = _CHUNK_KEYS,
            after_chunk: Callable[[], None] | None = None) -> bool:
    """Apply the uncompacted deltas of a task to its rows; False if there was nothing to do
    or the task moved to another epoch (then nothing more is written). ``measured`` is
    given the entries read from the deltas and the distinct keys among them; ``after_chunk``
    is called after each chunk and each turn of the pruning, outside the write lock.

    In short turns, first undo what a crashed compaction run left half-done (reads are right
    meanwhile: every key it touched is in an uncompacted delta, which reads consult first);
    then merge at most ``MAX_RUN_DELTAS`` deltas; last drop the history no kept checkpoint
    needs (after the merge, so that a large history left by an earlier run does not delay
    the tail's shrinking). None of it is done at the commit point or when a task opens, so
    none of it delays a commit or a resume."""
    lock: WriteLock = write_lock or threading.Lock()
    if not _roll_back_partial(db, task_no, epoch, lock, commit_waiting):
        return False
    ran = _merge_tail(db, task_no, epoch, recent, lock, commit_waiting, measured, chunk_keys,
                      after_chunk)
    _prune_in_turns(db, task_no, lock, commit_waiting, after_chunk)
    return ran


def _merge_tail(db: sqlite3.Connection, task_no: int, epoch: int, recent: TailIndex,
                lock: WriteLock, commit_waiting: Waiting | None,
                measured: Callable[[int, int], None] | None, chunk_keys: int,
                after_chunk: Callable[[], None] | None) -> bool:
    """The merge of ``compact``: read the deltas of the run from one snapshot, write their
    keys in chunks, each with the images it replaces, then move ``compacted_seq``."""
    db.execute("BEGIN")
    try:
        current, since, upto = _tail(db, task_no)
        upto = min(upto, since + MAX_RUN_DELTAS)
        merged: dict[bytes, bytes | None] = {}
        entries = 0
        if current == epoch and upto > since:
            for (blob,) in db.execute(
                "SELECT page FROM deltas WHERE task_no = ? AND seq > ? AND seq <= ? "
                "ORDER BY seq, page_no", (task_no, since, upto)):
                page = decode_delta(bytes(blob))
                entries += len(page)
                merged.update(page)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    if current != epoch or upto <= since:
        return False
    if measured is not None:
        measured(entries, len(merged))
    keys = sorted(merged)
    # A run with no keys (checkpoints that changed no state) still writes one, empty, undo
    # chunk: a fallback or rewind across the run finds it and takes compacted_seq back.
    for chunk_no, start in enumerate(range(0, max(len(keys), 1), chunk_keys)):
        chunk = keys[start:start + chunk_keys]
        _yield_to_commits(commit_waiting)
        with lock:  # short turns: a commit waits for one chunk at most
            if not _write_chunk(db, task_no, epoch, since, upto, chunk_no, chunk, merged):
                return False
        if after_chunk is not None:
            after_chunk()
    _yield_to_commits(commit_waiting)
    with lock:
        return _finish(db, task_no, epoch, since, upto, recent)


def _yield_to_commits(commit_waiting: Waiting | None) -> None:
    """Let a waiting commit take the write lock first (a plain lock is not fair)."""
    if commit_waiting is None:
        return
    for _ in range(2000):
        if not commit_waiting.is_set():
            return
        time.sleep(0.0005)


def _owned(db: sqlite3.Connection, task_no: int, epoch: int, since: int) -> bool:
    current, compacted, _ = _tail(db, task_no)
    return current == epoch and compacted == since


def _read_values(db: sqlite3.Connection, task_no: int, keys: list[bytes]) -> dict[bytes, bytes]:
    """The stored values of ``keys`` (those that have one), read as one row: one step of
    SQLite instead of one per key (see ``insert_many``)."""
    marks = ",".join("?" * len(keys))
    (packed,) = db.execute(
        "SELECT group_concat(hex(key) || ' ' || hex(value), ' ') FROM state "
        f"WHERE task_no = ? AND key IN ({marks})", (task_no, *keys)).fetchone()
    if not packed:
        return {}
    parts = packed.split(" ")
    return {bytes.fromhex(parts[i]): bytes.fromhex(parts[i + 1]) for i in range(0, len(parts), 2)}


def _write_chunk(db: sqlite3.Connection, task_no: int, epoch: int, since: int, upto: int,
                 chunk_no: int, chunk: list[bytes], merged: dict[bytes, bytes | None]) -> bool:
    """Overwrite one chunk of rows, saving the values it replaces, in one transaction."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if not _owned(db, task_no, epoch, since):
            db.execute("ROLLBACK")
            return False
        before = _read_values(db, task_no, chunk)
        images = [(k, before.get(k)) for k in chunk]
        db.execute("INSERT INTO undo VALUES (?, ?, ?, ?, ?)",
                   (task_no, upto, chunk_no, since, encode_delta(images)))
        _apply(db, task_no, [(k, merged[k]) for k in chunk])
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return True


def _finish(db: sqlite3.Connection, task_no: int, epoch: int, since: int, upto: int,
            recent: TailIndex) -> bool:
    db.execute("BEGIN IMMEDIATE")
    try:
        if not _owned(db, task_no, epoch, since):
            db.execute("ROLLBACK")
            return False
        db.execute("UPDATE tasks SET compacted_seq = ? WHERE task_no = ?", (upto, task_no))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    recent.trim(task_no, upto)
    return True


def _apply(db: sqlite3.Connection, task_no: int, items: list[tuple[bytes, bytes | None]]) -> None:
    insert_many(db, "INSERT INTO state (task_no, key, value) VALUES ", 3,
                [(task_no, k, v) for k, v in items if v is not None],
                " ON CONFLICT (task_no, key) DO UPDATE SET value = excluded.value")
    gone = [k for k, v in items if v is None]
    for start in range(0, len(gone), ROWS_PER_STATEMENT):
        part = gone[start:start + ROWS_PER_STATEMENT]
        db.execute(f"DELETE FROM state WHERE task_no = ? AND key IN ({','.join('?' * len(part))})",
                   (task_no, *part))


ROWS_PER_STATEMENT = 500
"""Rows per multi-row statement of ``insert_many`` (3 columns: 1,500 of SQLite's 32,766
parameters)."""


def insert_many(db: sqlite3.Connection, head: str, width: int, rows: Sequence[Sequence[object]],
                tail: str = "") -> None:
    """``executemany`` as a few multi-row ``VALUES`` statements.

    ``executemany`` steps SQLite once per row, and the sqlite3 module lets go of the GIL
    around every step: on a busy interpreter each of those steps can wait a switch interval
    (5 ms) to get it back, so a background writer crawls while it holds the write lock and
    the commits queue behind it. One statement per 500 rows is one step."""
    if not rows:
        return
    one = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        part = rows[start:start + ROWS_PER_STATEMENT]
        db.execute(head + ",".join([one] * len(part)) + tail,
                   [value for row in part for value in row])


def roll_back_runs_after(db: sqlite3.Connection, task_no: int, seq: int) -> int:
    """Undo every compaction run that ends after ``seq``, newest first, inside the caller's
    transaction; the table then holds the state at the oldest undone run's start. Returns
    the runs undone."""
    runs = db.execute(
        "SELECT DISTINCT to_seq, from_seq FROM undo WHERE task_no = ? AND to_seq > ? "
        "ORDER BY to_seq DESC", (task_no, seq)).fetchall()
    for to_seq, _ in runs:
        for (images,) in db.execute(
            "SELECT images FROM undo WHERE task_no = ? AND to_seq = ? ORDER BY chunk",
            (task_no, to_seq)).fetchall():
            _apply(db, task_no, decode_delta(bytes(images)))
    if runs:
        oldest_start = min(int(from_seq) for _, from_seq in runs)
        db.execute("DELETE FROM undo WHERE task_no = ? AND to_seq > ?", (task_no, seq))
        db.execute("UPDATE tasks SET compacted_seq = ? WHERE task_no = ?",
                   (oldest_start, task_no))
    return len(runs)


def _roll_back_partial(db: sqlite3.Connection, task_no: int, epoch: int, lock: WriteLock,
                       commit_waiting: Waiting | None) -> bool:
    """Undo, one chunk per transaction, the chunks of runs that never finished (their
    ``to_seq`` is past ``compacted_seq``); False if the task moved to another epoch."""
    with lock:
        chunks = db.execute(
            "SELECT u.to_seq, u.chunk FROM undo u JOIN tasks t ON t.task_no = u.task_no "
            "WHERE u.task_no = ? AND u.to_seq > t.compacted_seq ORDER BY u.to_seq DESC, u.chunk",
            (task_no,)).fetchall()
    if chunks:
        log.info("task #%d: undoing %d chunk(s) of a compaction a crash interrupted",
                 task_no, len(chunks))
    for to_seq, chunk in chunks:
        _yield_to_commits(commit_waiting)
        with lock:
            db.execute("BEGIN IMMEDIATE")
            try:
                if _tail(db, task_no)[0] != epoch:
                    db.execute("ROLLBACK")
                    return False
                row = db.execute("SELECT images FROM undo WHERE task_no = ? AND to_seq = ? "
                                 "AND chunk = ?", (task_no, to_seq, chunk)).fetchone()
                if row is not None:
                    _apply(db, task_no, decode_delta(bytes(row[0])))
                    db.execute("DELETE FROM undo WHERE task_no = ? AND to_seq = ? AND chunk = ?",
                               (task_no, to_seq, chunk))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
    return True


def _prune_in_turns(db: sqlite3.Connection, task_no: int, lock: WriteLock,
                    commit_waiting: Waiting | None,
                    after_turn: Callable[[], None] | None = None) -> None:
    """Drop undo runs no kept checkpoint can need, then deltas no undo or read needs, a few
    rows per transaction (a large history is never deleted inside one commit). What to drop
    is read from a snapshot, without the write lock: commits go on meanwhile."""
    with _snapshot(db):
        oldest = db.execute("SELECT min(seq) FROM commits WHERE task_no = ?",
                            (task_no,)).fetchone()[0]
        if oldest is None:
            return
        undo = db.execute("SELECT to_seq, chunk, length(images) FROM undo "
                          "WHERE task_no = ? AND to_seq <= ?", (task_no, oldest)).fetchall()
    for turn in _turns(undo):
        _delete_in_turn(db, lock, commit_waiting,
                        "DELETE FROM undo WHERE task_no = ? AND to_seq = ? AND chunk = ?",
                        [(task_no, t, c) for t, c in turn], after_turn)
    with _snapshot(db):
        floor = db.execute("SELECT min(from_seq) FROM undo WHERE task_no = ?",
                           (task_no,)).fetchone()[0]
        compacted = _tail(db, task_no)[1]
        keep_after = min(int(floor), compacted) if floor is not None else compacted
        pages = db.execute("SELECT seq, page_no, length(page) FROM deltas "
                           "WHERE task_no = ? AND seq <= ?", (task_no, keep_after)).fetchall()
    for turn in _turns(pages):
        _delete_in_turn(db, lock, commit_waiting,
                        "DELETE FROM deltas WHERE task_no = ? AND seq = ? AND page_no = ?",
                        [(task_no, q, n) for q, n in turn], after_turn)
    _delete_in_turn(db, lock, commit_waiting,
                    "DELETE FROM delta_dirs WHERE task_no = ? AND seq <= ?",
                    [(task_no, keep_after)])


PRUNE_TURN_BYTES = 256 * 1024
"""About how much history one turn of the pruning deletes (its rows' blobs)."""


def _turns(rows: list[tuple[int, int, int]]) -> Iterator[list[tuple[int, int]]]:
    """``(key, key, size)`` rows in turns of about ``PRUNE_TURN_BYTES``, keys only. Sized by
    bytes, not rows: undo rows of a compactor process hold 64 keys' images (1.6 KB), those
    of a thread 250; 16 rows a turn took 506 turns, 0.3 s, to drop one 10 MB run's undo."""
    turn: list[tuple[int, int]] = []
    size = 0
    for first, second, length in rows:
        turn.append((first, second))
        size += length
        if size >= PRUNE_TURN_BYTES:
            yield turn
            turn, size = [], 0
    if turn:
        yield turn


@contextlib.contextmanager
def _snapshot(db: sqlite3.Connection) -> Iterator[None]:
    """A read transaction: the statements inside see one committed state, and no write
    waits for it."""
    db.execute("BEGIN")
    try:
        yield
    finally:
        db.execute("COMMIT")


def _delete_in_turn(db: sqlite3.Connection, lock: WriteLock,
                    commit_waiting: Waiting | None, sql: str,
                    params: list[tuple[int, ...]],
                    after_turn: Callable[[], None] | None = None) -> None:
    _yield_to_commits(commit_waiting)
    with lock:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(sql, params)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    if after_turn is not None:
        after_turn()


_WAL = -1
"""``Compactor`` queue item of a write-ahead log checkpoint (not a task number)."""


WAL_BACKSTOP_PAGES = 16384
"""The store's connection checkpoints the write-ahead log itself only past this many pages
(64 MB), a backstop: the compactor keeps it far shorter (``WAL_RESTART_PAGES``)."""

WAL_RESTART_PAGES = 1000
"""Pages of the write-ahead log past which the compactor, after copying it into the database
file, copies what commits appended meanwhile under the write lock, so that the next write
starts the log again from its beginning."""


def _checkpoint_wal(db: sqlite3.Connection, write_lock: WriteLock | None) -> None:
    """Copy the write-ahead log into the database file without waiting for readers or
    writers (``PASSIVE``), so commits go on meanwhile; when the log is long, copy the few
    pages appended during that copy with the writers held off, which lets the next write
    start the log from its beginning (a checkpoint alone never shortens it): under
    ``write_lock``, or without one (another process's commits) as a ``RESTART`` checkpoint,
    which holds SQLite's write lock itself and waits at most ``_RESTART_WAIT_MS`` for it."""
    try:
        _, pages, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        if pages >= WAL_RESTART_PAGES:
            if write_lock is not None:
                with write_lock:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            else:
                (timeout,) = db.execute("PRAGMA busy_timeout").fetchone()
                db.execute(f"PRAGMA busy_timeout={_RESTART_WAIT_MS}")
                try:
                    db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
                finally:
                    db.execute(f"PRAGMA busy_timeout={int(timeout)}")
    except sqlite3.OperationalError as exc:  # another checkpoint is running
        log.debug("write-ahead log checkpoint skipped: %s", exc)


_RESTART_WAIT_MS = 20
"""How long a compactor process's ``RESTART`` checkpoint waits for a commit or a reader."""


class Outstanding:
    """The requests a compactor was given and has not served yet (``wait_idle``)."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    def add(self) -> None:
        with self._changed:
            self._count += 1

    def served(self) -> None:
        with self._changed:
            self._count = max(self._count - 1, 0)
            if self._count == 0:
                self._changed.notify_all()

    def reset(self) -> None:
        """None outstanding any more (the compactor stopped)."""
        with self._changed:
            self._count = 0
            self._changed.notify_all()

    def wait(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._count == 0, timeout)


class Compactor:
    """Background thread that compacts tasks on request, one at a time, on its own connection.

    Args:
        path: the database file.
        recent: the store's index of uncompacted deltas (trimmed after each run).
        on_done: called after each run (to wake commits waiting for the tail to shrink).
        write_lock: taken around each write transaction, shared with the store's commits so
            they wait for one short chunk instead of polling SQLite's busy handler.
        commit_waiting: set while a commit wants the write lock; the compactor lets it go
            first between chunks.
    """

    def __init__(self, path: Path, recent: TailIndex, on_done: Callable[[], None],
                 write_lock: threading.Lock, commit_waiting: threading.Event) -> None:
        self._path = path
        self._write_lock = write_lock
        self._commit_waiting = commit_waiting
        self._recent = recent
        self._on_done = on_done
        self._queue: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._pending: set[int] = set()
        self._overlap: dict[int, float] = {}
        self._thread: threading.Thread | None = None
        self._closing = False
        self._outstanding = Outstanding()
        self.runs = 0
        self.failures = 0

    @property
    def commit_waiting(self) -> threading.Event:
        """Set by a commit while it waits for the write lock."""
        return self._commit_waiting

    def writing(self) -> bool:
        """Never: this compactor's turns are the store's own lock, not SQLite's."""
        return False

    def compact_after(self, task_no: int) -> int:
        """Uncompacted deltas of ``task_no`` that start its next run (``compact_after``)."""
        return compact_after(self._overlap.get(task_no))

    def _measured(self, task_no: int, entries: int, keys: int) -> None:
        if keys:
            self._overlap[task_no] = entries / keys

    def request(self, task_no: int, epoch: int) -> None:
        """Ask for a compaction of ``task_no`` (coalesced while one is pending)."""
        if task_no in self._pending:
            return
        self._pending.add(task_no)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="resumeflow-compactor",
                                            daemon=True)
            self._thread.start()
        self._outstanding.add()
        self._queue.put((task_no, epoch))

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until every request made so far is served; False if ``timeout`` ran out."""
        return self._outstanding.wait(timeout)

    def checkpoint_wal(self) -> None:
        """Ask for a checkpoint of the write-ahead log (coalesced while one is pending), done
        outside the write lock: the checkpoint a commit runs itself when the log is long then
        has little left to copy."""
        self.request(_WAL, 0)

    def close(self) -> None:
        """Finish the run in progress and stop, starting none of the requests still queued;
        uncompacted deltas stay readable (the next store's compactor takes them)."""
        if self._thread is not None:
            self._closing = True
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            self._closing = False
            self._outstanding.reset()

    def _run(self) -> None:
        db = _compactor_connection(self._path)
        try:
            while (item := self._queue.get()) is not None:
                task_no, epoch = item
                self._pending.discard(task_no)
                if self._closing:
                    continue
                if task_no == _WAL:
                    _checkpoint_wal(db, self._write_lock)
                    self._outstanding.served()
                    continue
                try:
                    if compact(db, task_no, epoch, self._recent, self._write_lock,
                               self._commit_waiting, partial(self._measured, task_no),
                               after_chunk=LogKeeper(db)):
                        self.runs += 1
                        _checkpoint_wal(db, self._write_lock)
                except Exception:
                    self.failures += 1
                    log.exception("compaction of task #%d failed; its deltas stay readable",
                                  task_no)
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                finally:
                    self._outstanding.served()
                    self._on_done()
        finally:
            db.close()


class WaitingFlag:
    """Two bytes in a small file next to the database, mapped in the store's process and in
    its compactor process. The first is set while a commit waits for SQLite's write lock, so
    that the compactor lets it go first between two chunks (as a compactor thread does with
    an ``Event``). The second is set while the compactor holds that lock (``holding``), so a
    commit that finds it set polls it finely instead of sleeping in SQLite's busy handler
    (1, then 2, then 5 ms between tries, for a chunk of about a quarter of a millisecond).
    The turns themselves are SQLite's lock: a commit gives up after the store's busy timeout
    as it always does."""

    SIZE = 2

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < self.SIZE:
                os.ftruncate(fd, self.SIZE)
            self._map = mmap.mmap(fd, self.SIZE)
        finally:
            os.close(fd)  # the mapping keeps the file

    def set(self) -> None:
        self._map[0] = 1

    def clear(self) -> None:
        self._map[0] = 0

    def is_set(self) -> bool:
        return self._map[0] != 0

    def hold(self) -> None:
        """The compactor is about to take the write lock."""
        self._map[1] = 1

    def release(self) -> None:
        """The compactor gave the write lock up."""
        self._map[1] = 0

    def held(self) -> bool:
        """Whether the compactor holds the write lock (or is about to take it)."""
        return self._map[1] != 0

    def close(self) -> None:
        self._map.close()


class Holding:
    """The write turn of a compactor process, taken around each of its write transactions:
    SQLite's lock, announced in a ``WaitingFlag`` while it is held."""

    def __init__(self, flag: WaitingFlag) -> None:
        self._flag = flag

    def __enter__(self) -> None:
        self._flag.hold()

    def __exit__(self, *exc: object) -> None:
        self._flag.release()


def waiting_path(database: Path) -> Path:
    """The ``WaitingFlag`` of a database."""
    return database.with_name(database.name + "-waiting")


class _Forward(logging.Handler):
    """Sends the compactor process's log records to the store's process (which logs them)."""

    def __init__(self, send: Callable[[dict[str, object]], None]) -> None:
        super().__init__(logging.INFO)
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        self._send({"log": record.levelno, "message": record.getMessage()})


def serve(path: str) -> None:
    """The compactor process of the store at ``path``: reads requests, one JSON array a line
    (``[task_no, epoch]``; ``[-1, 0]``: checkpoint the write-ahead log) from stdin, runs
    them one at a time as the compactor thread does, and writes one JSON object a line per
    request started to stdout. Ends when stdin ends (the store closed, or its process died),
    after the run it is doing, starting none of the requests still queued: a killed worker
    leaves no compactor behind, at most that run, which ends at its next chunk if another
    worker took the task."""
    out = sys.stdout.buffer
    write_lock = threading.Lock()
    encode = msgspec.json.Encoder().encode

    def send(message: dict[str, object]) -> None:
        with write_lock:
            out.write(encode(message) + b"\n")
            out.flush()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C stops the store, which stops us
    log.addHandler(_Forward(send))
    log.setLevel(logging.INFO)
    log.propagate = False
    _lower_priority()
    database = Path(path)
    waiting = WaitingFlag(waiting_path(database))
    waiting.release()  # what a killed compactor left set
    db = _compactor_connection(database)
    turn = Holding(waiting)  # SQLite's write lock is the turn
    decode = msgspec.json.Decoder(tuple[int, int]).decode
    requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    ended = threading.Event()
    threading.Thread(target=_read_requests, args=(sys.stdin.buffer, requests, ended),
                     name="requests", daemon=True).start()
    try:
        while (line := requests.get()) is not None:
            if ended.is_set():
                continue  # the store closed: it starts no more runs (a run in progress ends)
            task_no, epoch = decode(line)
            send({"task": task_no, "started": True})
            if task_no == _WAL:
                _checkpoint_wal(db, None)
                send({"task": _WAL})
                continue
            reply: dict[str, object] = {"task": task_no}
            seen: list[int] = []
            try:
                ran = compact(db, task_no, epoch, _NoTail(), turn, waiting,
                              partial(_note, seen), PROCESS_CHUNK_KEYS,
                              LogKeeper(db, partial(_sync_log, database)))
                if ran:
                    _checkpoint_wal(db, None)
                    reply["upto"] = _tail(db, task_no)[1]
                if seen:
                    reply["entries"], reply["keys"] = seen
            except Exception as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                reply["error"] = f"{type(exc).__name__}: {exc}"
            send(reply)
    finally:
        db.close()
        waiting.close()


def _read_requests(lines: IO[bytes], requests: queue.SimpleQueue[bytes | None],
                   ended: threading.Event) -> None:
    """Queue the store's requests as they come, so that the end of its pipe (the store
    closed, or its process died) is seen while a run goes on: the requests still queued then
    are not started."""
    try:
        for line in lines:
            requests.put(line)
    finally:
        ended.set()
        requests.put(None)


COMPACTOR_NICE = 10
"""How much the compactor process lowers its CPU priority (``nice``) when it starts. Its
work is background work with slack (a task's tail may grow to ``MAX_TAIL_DELTAS`` before a
commit waits for it), while the pipeline's interpreter is the critical path: where the two
want the same core (its commit thread, the kernel's writeback), the pipeline's threads get
it first. A nice process still runs whenever a core is free, and a commit that waits for it
leaves its own core free, so a compactor holding SQLite's write lock is not starved."""


def _lower_priority() -> None:
    try:
        os.nice(COMPACTOR_NICE)
    except OSError as exc:  # a platform without nice: the compactor runs at the same priority
        log.debug("compactor priority not lowered: %s", exc)


def _sync_log(database: Path) -> None:
    """Flush what a compaction chunk wrote to the write-ahead log (``fdatasync``, outside
    the write lock). Its transactions do not sync (``synchronous=NORMAL``), so otherwise the
    store's next commit does it: the checkpoint benchmark's slowest commits, 30-60 ms, were
    each a commit's fsync of the log right after a long compaction run (16,000 keys of a
    1,000,000-key state, a B-tree page or so each). An error leaves it to that commit."""
    try:
        fd = os.open(f"{database}-wal", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fdatasync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


CHUNKS_PER_LOG_CHECKPOINT = 8
"""Chunks of a compaction run between two checkpoints of the write-ahead log made during the
run (``LogKeeper``)."""


class LogKeeper:
    """The ``after_chunk`` hook of a compactor: keeps the write-ahead log short during a
    long run. Every ``every`` chunks it copies the log into the database file (``PASSIVE``:
    commits go on meanwhile), which lets the next write start the log again from its
    beginning; between those, ``sync`` (the compactor process: ``_sync_log``) flushes what
    the chunk wrote. Without it the log grew by a run's pages (a 16,000-key run over a
    1,000,000-key state rewrites most of its 7,000 leaf pages and their undo rows), past
    ``WAL_BACKSTOP_PAGES`` in the checkpoint benchmark's first second, and then every commit
    copied the log itself inside its ``COMMIT`` and synced the database file: 30-50 ms."""

    def __init__(self, db: sqlite3.Connection, sync: Callable[[], None] | None = None,
                 every: int = CHUNKS_PER_LOG_CHECKPOINT) -> None:
        self._db = db
        self._sync = sync
        self._every = every
        self._chunks = 0
        self.checkpoints = 0

    def __call__(self) -> None:
        self._chunks += 1
        if self._chunks % self._every == 0:
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.checkpoints += 1
                return  # a checkpoint syncs the log first
            except sqlite3.OperationalError as exc:  # another checkpoint is running
                log.debug("write-ahead log checkpoint during a run skipped: %s", exc)
        if self._sync is not None:
            self._sync()


def _note(seen: list[int], entries: int, keys: int) -> None:
    seen[:] = [entries, keys]


class _NoTail(TailIndex):
    """The compactor process keeps no index of the tail (the store's process trims its own)."""

    def trim(self, task_no: int, upto: int) -> None:
        return None


SECURE_DELETE = "FAST"
"""``PRAGMA secure_delete`` of the store's writing connections. Debian builds SQLite with
``secure_delete`` on, which zero-fills every page a delete frees: each commit's release of
staged output and each turn of the compactor's pruning of history then wrote as many pages
again to the write-ahead log (the first run after a restart dropped 35 MB of undo history
and its zeros). ``FAST`` still zeroes deleted content on the pages that keep rows and does
not write freed pages (upstream SQLite's default is off)."""


def _compactor_connection(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=60.0)
    db.execute(f"PRAGMA secure_delete={SECURE_DELETE}")
    # No fsync per compaction transaction: a lost suffix of them after a power cut is a
    # compaction that stopped earlier (its partial run is undone by the next compactor), and
    # the next FULL commit of the store's connection makes everything before it durable.
    db.execute("PRAGMA synchronous=NORMAL")
    # Its transactions run under the write lock: the log is checkpointed after them.
    db.execute("PRAGMA wal_autocheckpoint=0")
    return db
