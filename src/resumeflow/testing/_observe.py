"""Watching a store from outside: what a checker can see without trusting the store.

``ObservedStore`` wraps any ``Store`` and passes every call through. It remembers every epoch
handed out and every commit the store accepted, and flags, as they happen, the invariants a
single call can break: a commit accepted from an epoch older than the newest one handed out
(fencing), a commit or an opened checkpoint whose ``seq`` or position went backwards without a
reported fallback (monotonic progress), and an open whose replay (the records read past the
checkpoint it resumes from) is above the bound (bounded replay). A fallback from corrupt
records widens the bound by one window per checkpoint lost, until the task has resumed from
as far as it had read when it lost them. A commit accepted and later discarded as corrupt
no longer counts as accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..checkpoint import CommitRecord, OpenedTask, StagedEntry, Store, TaskStatus
from ..checkpoint._store import InStoreWrite

__all__ = ["VIOLATION_KINDS", "ObservedStore", "Violation"]

VIOLATION_KINDS = (
    "lost",
    "duplicated",
    "replay_above_bound",
    "non_monotonic_position",
    "stale_epoch_commit",
    "state_mismatch",
    "output_mismatch",
    "broken_chain",
    "stalled",
    "error",
)
"""Every kind of violation a checker reports (section 2 of the design, plus liveness)."""


@dataclass(frozen=True, kw_only=True)
class Violation:
    """One broken invariant.

    Attributes:
        kind: one of ``VIOLATION_KINDS``.
        task: the task it concerns ("" for the whole run).
        detail: what was expected and what was found.
    """

    kind: str
    task: str
    detail: str

    def __str__(self) -> str:
        where = f" in task {self.task}" if self.task else ""
        return f"{self.kind}{where}: {self.detail}"


@dataclass
class _Seen:
    epoch: int = 0
    seq: int = 0
    position: int = 0
    accepted: list[CommitRecord] = field(default_factory=list)
    lost: int = 0
    """Checkpoints lost to corruption since the task was last back where it had read."""
    lost_until: int = 0
    """How far the task had read when it last lost checkpoints."""


class ObservedStore:
    """A ``Store`` that checks what passes through it.

    Args:
        inner: the store under test.
        partition_of: task id -> source partition (whose position is an ``int``).
        high_water: reads how far any reader of a partition has been given records.
        replay_max_events: the configured replay bound.
    """

    def __init__(self, inner: Store, *, partition_of: dict[str, str],
                 high_water: Callable[[str], int], replay_max_events: int) -> None:
        self.inner = inner
        self.keep_checkpoints = inner.keep_checkpoints
        self.violations: list[Violation] = []
        self.replays: list[int] = []
        """Records re-read after each open of a task that had read past its checkpoint."""
        self._partition_of = partition_of
        self._high_water = high_water
        self._bound = replay_max_events
        self._seen: dict[str, _Seen] = {}

    def over(self, inner: Store) -> ObservedStore:
        """An observer of another handle on the same durable store (another process's
        connection) that shares everything this one has seen."""
        twin = ObservedStore(inner, partition_of=self._partition_of,
                             high_water=self._high_water, replay_max_events=self._bound)
        twin.violations = self.violations
        twin.replays = self.replays
        twin._seen = self._seen
        return twin

    def accepted(self, task: str) -> list[CommitRecord]:
        """Every commit the store accepted for ``task``, in order."""
        return list(self._seen.get(task, _Seen()).accepted)

    def _flag(self, kind: str, task: str, detail: str) -> None:
        self.violations.append(Violation(kind=kind, task=task, detail=detail))

    def open_task(self, task: str) -> OpenedTask:
        opened = self.inner.open_task(task)
        seen = self._seen.setdefault(task, _Seen())
        partition = self._partition_of[task]
        record = opened.record
        seq = record.seq if record else 0
        position = int(record.positions.get(partition) or 0) if record else 0
        if opened.epoch <= seen.epoch:
            self._flag("stale_epoch_commit", task,
                       f"open_task handed out epoch {opened.epoch} after epoch {seen.epoch}")
        seen.epoch = max(seen.epoch, opened.epoch)
        if opened.discarded_seqs:  # torn after they were accepted: no longer committed
            seen.accepted = [r for r in seen.accepted if r.seq <= seq]
        if not opened.discarded_seqs and (seq < seen.seq or position < seen.position):
            self._flag("non_monotonic_position", task,
                       f"opened at checkpoint seq {seq} position {position} after seq "
                       f"{seen.seq} position {seen.position} was committed, with no fallback "
                       "reported")
        high_water = self._high_water(partition)
        if opened.discarded_seqs:
            seen.lost += len(opened.discarded_seqs)
            seen.lost_until = max(seen.lost_until, high_water)
        elif position >= seen.lost_until:
            seen.lost = 0
        replay = high_water - position
        bound = self._bound * (1 + seen.lost)
        if replay > 0:
            self.replays.append(replay)
        if replay > bound:
            self._flag("replay_above_bound", task,
                       f"resumes at position {position} after records up to "
                       f"{high_water} were read: replays {replay} records, bound {bound}")
        seen.seq, seen.position = seq, position
        return opened

    def load_state(self, task_no: int, key: bytes, epoch: int | None = None) -> bytes | None:
        return self.inner.load_state(task_no, key, epoch)

    def commit(self, opened: OpenedTask, record: CommitRecord,
               delta: Sequence[tuple[bytes, bytes | None]], staged: Sequence[StagedEntry],
               release: Sequence[tuple[str, int]], in_store: Sequence[InStoreWrite] = ()) -> None:
        self.inner.commit(opened, record, delta, staged, release, in_store)
        task = opened.task
        seen = self._seen.setdefault(task, _Seen())
        seen.accepted.append(record)
        if record.epoch < seen.epoch:
            self._flag("stale_epoch_commit", task,
                       f"the store accepted commit seq {record.seq} from epoch {record.epoch} "
                       f"after epoch {seen.epoch} was handed out")
        position = int(record.positions.get(self._partition_of[task]) or 0)
        if record.seq != seen.seq + 1 or position < seen.position:
            self._flag("non_monotonic_position", task,
                       f"accepted commit seq {record.seq} position {position} after seq "
                       f"{seen.seq} position {seen.position}")
        seen.seq = record.seq
        seen.position = max(position, seen.position)

    def records(self, task: str) -> list[tuple[int, bytes]]:
        return self.inner.records(task)

    def tasks(self) -> list[TaskStatus]:
        return self.inner.tasks()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
