"""An in-memory store that implements the ``Store`` contract exactly, and can misbehave.

Like ``SQLiteStore``: ``open_task`` bumps the epoch and returns the newest commit record whose
digest verifies (newer corrupt ones are quarantined and their state versions and staged output
discarded); ``commit`` is one atomic write refused with ``FencedError`` on a stale epoch; state
is versioned by ``seq`` and the versions the last ``keep_checkpoints`` records need are kept,
so fallback and ``rewind`` restore the exact state of a checkpoint. The ``MemoryStore`` object
is the durable medium: a crashed task loses its ``TaskRunner``, never the store's contents.

Injectable faults (set the attributes, they apply to the next commits): ``fail_writes``
(refused with ``UnavailableError``, nothing written), ``slow_write_s`` (each commit moves the
fake clock), ``tear_next`` (the next commit writes a torn commit record with its delta and
staging, then the writer dies with ``SimulatedCrash``: recovery must detect the torn record by
its digest and fall back to the one before).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .._faults import crash_point
from ..checkpoint import CommitRecord, OpenedTask, StagedEntry, TaskStatus, decode_record
from ..checkpoint._record import encode_record
from ..checkpoint._store import InStoreWrite
from ..errors import (
    ClosedError,
    ConfigurationError,
    CorruptCheckpointError,
    FencedError,
    UnavailableError,
    invariant,
)
from ._clock import FakeClock
from ._crash import SimulatedCrash

__all__ = ["MemoryStore"]


@dataclass
class _Task:
    task: str
    task_no: int
    epoch: int = 0
    last_seq: int = 0
    commits: dict[int, bytes] = field(default_factory=dict)
    versions: dict[bytes, list[tuple[int, bytes | None]]] = field(default_factory=dict)
    written: dict[int, list[bytes]] = field(default_factory=dict)
    staged: dict[tuple[int, str], StagedEntry] = field(default_factory=dict)


class MemoryStore:
    """Commit records, versioned keyed state and staged sink output, in memory.

    Args:
        keep_checkpoints: newest commit records kept per task (at least 2).
        clock: the fake clock that slow writes move (required for ``slow_write_s``).

    Attributes:
        fail_writes: the next this-many commits fail with ``UnavailableError``.
        slow_write_s: simulated seconds each commit takes.
        tear_next: the next commit leaves a torn commit record and crashes.
        rows_read: rows read by ``open_task`` and ``load_state``.
        quarantine: ``(task, seq, raw record, reason)`` of every record set aside as corrupt.
        rewinds: ``(task, from_seq, to_seq)`` of every rewind.
    """

    def __init__(self, *, keep_checkpoints: int = 10, clock: FakeClock | None = None) -> None:
        if keep_checkpoints < 2:
            raise ConfigurationError(
                f"keep_checkpoints={keep_checkpoints}: keep at least 2 so a corrupt newest "
                "checkpoint can fall back to the one before"
            )
        self.keep_checkpoints = keep_checkpoints
        self.clock = clock
        self.fail_writes = 0
        self.slow_write_s = 0.0
        self.tear_next = False
        self.rows_read = 0
        self.quarantine: list[tuple[str, int, bytes, str]] = []
        self.rewinds: list[tuple[str, int, int]] = []
        self._tasks: dict[str, _Task] = {}
        self._by_no: dict[int, _Task] = {}
        self._closed = False

    # -- taking a task ---------------------------------------------------------------------

    def open_task(self, task: str) -> OpenedTask:
        row = self._task(task, create=True)
        row.epoch += 1
        record, discarded = self._newest_valid(row)
        good = record.seq if record is not None else 0
        if discarded:
            self._discard_after(row, good)
        row.last_seq = good
        staged = tuple(e for (seq, _), e in sorted(row.staged.items()) if seq <= good)
        self.rows_read += 2 + len(staged)
        return OpenedTask(task=task, task_no=row.task_no, epoch=row.epoch, record=record,
                          discarded_seqs=tuple(discarded), staged=staged)

    def _newest_valid(self, row: _Task) -> tuple[CommitRecord | None, list[int]]:
        discarded: list[int] = []
        for seq in sorted(row.commits, reverse=True):
            raw = row.commits[seq]
            self.rows_read += 1
            try:
                record = decode_record(raw)
                invariant(record.seq == seq, f"record seq {record.seq} stored under seq {seq}")
            except CorruptCheckpointError as exc:
                self.quarantine.append((row.task, seq, raw, str(exc)))
                discarded.append(seq)
                continue
            return record, discarded
        return None, discarded

    def _discard_after(self, row: _Task, seq: int) -> None:
        for newer in [s for s in row.commits if s > seq]:
            del row.commits[newer]
        for newer in [s for s in row.written if s > seq]:
            for key in row.written.pop(newer):
                versions = [v for v in row.versions.get(key, []) if v[0] <= seq]
                if versions:
                    row.versions[key] = versions
                else:
                    row.versions.pop(key, None)
        for staged_key in [k for k in row.staged if k[0] > seq]:
            del row.staged[staged_key]

    # -- state -----------------------------------------------------------------------------

    def load_state(self, task_no: int, key: bytes, epoch: int | None = None) -> bytes | None:
        self._check_open()
        self.rows_read += 1
        row = self._by_no[task_no]
        if epoch is not None and row.epoch != epoch:
            raise FencedError(f"task {row.task!r} is owned by epoch {row.epoch}; this worker "
                              f"holds epoch {epoch} and may not read its state any more")
        versions = row.versions.get(key)
        return versions[-1][1] if versions else None

    def snapshot(self, task: str) -> dict[bytes, bytes]:
        """Every key of ``task`` with a committed value (newest version), for checkers."""
        row = self._task(task, create=False)
        return {key: v[-1][1] for key, v in sorted(row.versions.items())
                if v[-1][1] is not None}

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
        if in_store:
            raise ConfigurationError(
                "MemoryStore has no database for in-store sink writes; use SQLiteStore with "
                "a sink in the same database, or a sink that stages its output"
            )
        raw = encode_record(record)
        row = self._task(opened.task, create=False)
        if self.slow_write_s and self.clock is not None:
            self.clock.advance(self.slow_write_s)
        if self.fail_writes > 0:
            self.fail_writes -= 1
            raise UnavailableError(
                f"MemoryStore: injected write failure for task {opened.task!r}; retry"
            )
        self._check_owner(row, record)
        crash_point("store.before_commit")
        torn = self.tear_next
        self.tear_next = False
        self._write(row, record, raw[: len(raw) // 2] if torn else raw, delta, staged, release)
        if torn:
            raise SimulatedCrash(f"torn commit record seq {record.seq} of {opened.task!r}")

    def _check_owner(self, row: _Task, record: CommitRecord) -> None:
        if row.epoch != record.epoch:
            raise FencedError(
                f"task {row.task!r} is owned by epoch {row.epoch}; this worker holds epoch "
                f"{record.epoch} and its commit seq {record.seq} was refused. Stop this worker: "
                "another one resumed the task"
            )
        invariant(record.seq == row.last_seq + 1,
                  f"task {row.task!r} commits seq {record.seq} after seq {row.last_seq}")

    def _write(self, row: _Task, record: CommitRecord, raw: bytes,
               delta: Sequence[tuple[bytes, bytes | None]], staged: Sequence[StagedEntry],
               release: Sequence[tuple[str, int]]) -> None:
        seq = record.seq
        written = row.written.setdefault(seq, [])
        for key, value in delta:
            versions = row.versions.setdefault(key, [])
            if versions and versions[-1][0] == seq:
                versions[-1] = (seq, value)
            else:
                versions.append((seq, value))
                written.append(key)
        for sink, upto in release:
            for staged_key in [k for k in row.staged if k[1] == sink and k[0] <= upto]:
                del row.staged[staged_key]
        for entry in staged:
            row.staged[(entry.seq, entry.sink)] = entry
        row.commits[seq] = raw
        row.last_seq = seq
        self._prune(row, seq)

    def _prune(self, row: _Task, seq: int) -> None:
        oldest_kept = seq - self.keep_checkpoints + 1
        for old in [s for s in row.commits if s < oldest_kept]:
            del row.commits[old]
        for old in [s for s in row.written if s < oldest_kept]:
            for key in row.written.pop(old):
                self._compact(row, key, oldest_kept)

    @staticmethod
    def _compact(row: _Task, key: bytes, oldest_kept: int) -> None:
        """Keep the versions of ``key`` that checkpoints from ``oldest_kept`` on can need."""
        versions = row.versions.get(key)
        if not versions:
            return
        base = 0
        for i, (seq, _) in enumerate(versions):
            if seq <= oldest_kept:
                base = i
        kept = versions[base:]
        if kept[0][0] <= oldest_kept and kept[0][1] is None:
            kept = kept[1:]
        if kept:
            row.versions[key] = kept
        else:
            del row.versions[key]

    # -- inspection and tools --------------------------------------------------------------

    def records(self, task: str) -> list[tuple[int, bytes]]:
        self._check_open()
        row = self._tasks.get(task)
        if row is None:
            return []
        return sorted(row.commits.items())

    def tasks(self) -> list[TaskStatus]:
        self._check_open()
        out: list[TaskStatus] = []
        for name in sorted(self._tasks):
            row = self._tasks[name]
            record: CommitRecord | None = None
            error: str | None = None
            if row.commits:
                try:
                    record = decode_record(row.commits[max(row.commits)])
                except CorruptCheckpointError as exc:
                    error = str(exc)
            out.append(TaskStatus(task=name, epoch=row.epoch, record=record, error=error,
                                  checkpoints=len(row.commits), staged=len(row.staged)))
        return out

    def rewind(self, task: str, seq: int) -> CommitRecord | None:
        """Make checkpoint ``seq`` (0: the beginning) the newest of ``task`` and bump its
        epoch; the caller makes sure no worker runs the task."""
        row = self._task(task, create=False)
        target: CommitRecord | None = None
        if seq > 0:
            if seq not in row.commits:
                raise ConfigurationError(f"task {task!r} keeps no checkpoint seq {seq}")
            target = decode_record(row.commits[seq])
        else:
            row.versions.clear()
            row.written.clear()
            row.staged.clear()
        self._discard_after(row, seq)
        self.rewinds.append((task, row.last_seq, seq))
        row.last_seq = seq
        row.epoch += 1
        return target

    def corrupt_latest(self, task: str) -> int:
        """Damage the newest commit record of ``task`` (as a torn write would); returns its
        seq."""
        row = self._task(task, create=False)
        if not row.commits:
            raise ConfigurationError(f"task {task!r} has no commit record to corrupt")
        seq = max(row.commits)
        raw = row.commits[seq]
        row.commits[seq] = raw[: len(raw) // 2]
        return seq

    def close(self) -> None:
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this MemoryStore is closed; make a new one")

    def _task(self, task: str, *, create: bool) -> _Task:
        self._check_open()
        row = self._tasks.get(task)
        if row is None:
            if not create:
                raise ConfigurationError(f"no task {task!r} in this store; open it first")
            row = _Task(task=task, task_no=len(self._tasks) + 1)
            self._tasks[task] = row
            self._by_no[row.task_no] = row
        return row

    def __repr__(self) -> str:
        return f"MemoryStore(tasks={len(self._tasks)})"
