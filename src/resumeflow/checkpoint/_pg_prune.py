"""Background pruning of the PostgreSQL store's state versions.

When checkpoint ``X`` is at or below the oldest kept commit record of its task, every row of
a key older than that key's version at ``X`` can no longer be read by any kept checkpoint, nor
can a tombstone at ``X``. The pruner deletes them, one delta ``X`` per transaction, in order,
and records ``X`` in ``prune_marks``; so a commit never waits for the deletion of an old large
delta's superseded rows, and the table holds about one row per key plus the recent deltas.

Safety does not depend on the owner or on timing: each transaction runs at REPEATABLE READ
and re-reads the oldest kept record in its snapshot, and it deletes only rows below ``X``
while fallback and rewind only delete rows above a kept checkpoint (at or above ``X``). A task
that lost every record starts a new history at seq 1 (its mark is reset to 0); rows of that new
history committed after the pruner's snapshot are invisible to it and never deleted, and a
conflict with the reset aborts the pruner's transaction (it tries again later). A crash
anywhere leaves rows that the next pruning deletes.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import psycopg

from ._pg_retry import PgConnection, is_transient

__all__ = ["Pruner"]

log = logging.getLogger("resumeflow.store")

_STOP = -1


class Pruner:
    """A thread that prunes tasks on request, one at a time, on its own connection.

    Args:
        connection: the pruner's own connection (made on first use).
        schema: the store's schema.
    """

    def __init__(self, connection: PgConnection, schema: str) -> None:
        self._conn = connection
        s = schema
        self._oldest = f"SELECT min(seq) FROM {s}.commits WHERE task_no = %s"
        self._mark = f"SELECT pruned_seq FROM {s}.prune_marks WHERE task_no = %s"
        self._superseded = (
            f"DELETE FROM {s}.state o USING {s}.state n WHERE n.task_no = %s AND n.seq = %s "
            "AND o.task_no = n.task_no AND o.key = n.key AND o.seq < %s")
        self._tombstones = (f"DELETE FROM {s}.state WHERE task_no = %s AND seq = %s AND "
                            "value IS NULL")
        self._set_mark = (f"INSERT INTO {s}.prune_marks VALUES (%s, %s) ON CONFLICT (task_no) "
                          "DO UPDATE SET pruned_seq = excluded.pruned_seq")
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._pending: set[int] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy = 0
        self._thread: threading.Thread | None = None
        self.deltas = 0
        """Deltas pruned since the store opened."""
        self.failures = 0

    def request(self, task_no: int) -> None:
        """Ask for the task to be pruned up to its oldest kept record (coalesced)."""
        with self._lock:
            if task_no in self._pending:
                return
            self._pending.add(task_no)
            self._busy += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="resumeflow-pg-pruner",
                                                daemon=True)
                self._thread.start()
        self._queue.put(task_no)

    def wait(self, timeout_s: float = 60.0) -> bool:
        """Wait until every request so far is done; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout=timeout_s)

    def close(self) -> None:
        """Finish the transaction in progress and stop (pending requests are dropped: the
        next pruning does them)."""
        thread = self._thread
        if thread is not None:
            self._queue.put(_STOP)
            thread.join()
            self._thread = None
        self._conn.drop()

    def prune(self, task_no: int) -> int:
        """Prune ``task_no`` now, in the caller's thread; returns the deltas pruned."""
        done = 0
        while self._prune_one(self._conn.get(), task_no):
            done += 1
        return done

    def _run(self) -> None:
        while (task_no := self._queue.get()) != _STOP:
            with self._lock:
                self._pending.discard(task_no)
            try:
                self.deltas += self.prune(task_no)
            except Exception as exc:
                self.failures += 1
                self._conn.drop()
                if isinstance(exc, psycopg.Error) and is_transient(exc):
                    log.info("pruning task #%d stopped (%s); the next commit resumes it",
                             task_no, exc)
                else:
                    log.exception("pruning task #%d failed; old state versions stay (they are "
                                  "never read)", task_no)
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _prune_one(self, conn: psycopg.Connection[Any], task_no: int) -> bool:
        """Prune the next delta of ``task_no`` if it is at or below the oldest kept record."""
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            oldest = conn.execute(self._oldest, (task_no,)).fetchone()
            mark = conn.execute(self._mark, (task_no,)).fetchone()
            done = int(mark[0]) if mark else 0
            if oldest is None or oldest[0] is None or done + 1 > int(oldest[0]):
                return False
            seq = done + 1
            conn.execute(self._superseded, (task_no, seq, seq))
            conn.execute(self._tombstones, (task_no, seq))
            conn.execute(self._set_mark, (task_no, seq))
        return True
