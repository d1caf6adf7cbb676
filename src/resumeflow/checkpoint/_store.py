"""The store contract: where commit records, state deltas and staged sink output live.

A store guarantees, for every task:

* ``open_task`` bumps the task's epoch (fencing every older owner) and returns the newest
  commit record whose digest verifies, with the state and staged output as of that record.
  Anything written after it (a corrupt newer record, its state versions, its staged output) is
  discarded and reported, never read.
* ``commit`` is the commit point: the commit record, the state delta, the staged sink output
  and the release of finalized staging are written in one atomic write, or not at all. It is
  refused with ``FencedError`` when the epoch is not the task's current epoch.
* ``load_state`` reads one key's committed value (O(1) rows), so opening a task never loads
  all state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._record import CommitRecord

__all__ = ["OpenedTask", "StagedEntry", "Store", "TaskStatus"]


@dataclass(frozen=True, kw_only=True)
class StagedEntry:
    """Sink output staged inside a commit, kept until the sink has finalized it.

    Attributes:
        sink: id of the sink that staged it.
        seq: the checkpoint it belongs to.
        meta: small JSON-compatible description the sink needs to finalize idempotently.
        payload: the staged bytes.
    """

    sink: str
    seq: int
    meta: dict[str, Any]
    payload: bytes


@dataclass(frozen=True, kw_only=True)
class OpenedTask:
    """What a worker gets when it takes a task.

    Attributes:
        task: the task id.
        task_no: the store's compact number for the task.
        epoch: this owner's fencing token.
        record: the newest valid commit record, or ``None`` for a task never committed.
        discarded_seqs: newer commit records that failed verification and were set aside.
        staged: staged sink output of committed checkpoints not yet released, oldest first.
    """

    task: str
    task_no: int
    epoch: int
    record: CommitRecord | None
    discarded_seqs: tuple[int, ...] = ()
    staged: tuple[StagedEntry, ...] = ()


@dataclass(frozen=True, kw_only=True)
class TaskStatus:
    """One task as the store sees it, for ``status`` and inspection tools."""

    task: str
    epoch: int
    record: CommitRecord | None
    error: str | None = None
    checkpoints: int = 0
    staged: int = field(default=0)


InStoreWrite = Callable[[Any], None]
"""A write a sink performs inside the store's own commit transaction (same database)."""


class Store(Protocol):
    """Durable home of commit records, keyed state and staged sink output."""

    keep_checkpoints: int

    def open_task(self, task: str) -> OpenedTask:
        """Take ``task`` with a new epoch; a crash here leaves at most a bumped epoch."""
        ...

    def load_state(self, task_no: int, key: bytes, epoch: int | None = None) -> bytes | None:
        """The committed value of one key, or ``None`` when it has none. With ``epoch``
        (the reader's), raises ``FencedError`` when the task is owned by another epoch, as
        read after the value (or in the same snapshot): a fenced worker never computes from
        state a newer owner wrote."""
        ...

    def commit(
        self,
        opened: OpenedTask,
        record: CommitRecord,
        delta: Sequence[tuple[bytes, bytes | None]],
        staged: Sequence[StagedEntry],
        release: Sequence[tuple[str, int]],
        in_store: Sequence[InStoreWrite] = (),
    ) -> None:
        """Write the checkpoint atomically. A crash here leaves it entirely or not at all."""
        ...

    def records(self, task: str) -> list[tuple[int, bytes]]:
        """Every retained commit record of ``task``, raw, oldest first (for verification)."""
        ...

    def tasks(self) -> list[TaskStatus]:
        """Every task the store knows, with its newest commit record."""
        ...

    def close(self) -> None:
        """Release the store; safe to call twice."""
        ...
