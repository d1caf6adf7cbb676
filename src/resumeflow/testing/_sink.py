"""An in-memory two-phase sink with injectable failures.

The ``MemorySink`` object is the outside system (it survives a crash of a task); each task
gets a writer (lost in a crash, like a process). Under exactly-once, ``precommit(seq)`` stages
the buffer as a ``StagedEntry`` that the store keeps inside its commit, and ``finalize(seq)``
makes it visible by writing the slot of ``seq``: writing the same slot twice changes nothing,
so finalize is idempotent, and a finalize cut half-way (crash point
``sink.finalize.partial``) is completed by the next one. ``recover`` finalizes the staged
entries again and drops visible output of checkpoints newer than the one resumed. Under
at-least-once, pre-commit appends to the output at once and a replay appends again: every
entry is tagged with its writer and ``seq`` so a checker can tell committed output from
replayed output (see ``entries``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from .._codec import decode, encode
from .._faults import crash_point
from ..checkpoint import StagedEntry
from ..errors import DataError, UnavailableError
from ..sinks import Precommit, SinkContext

__all__ = ["MemorySink", "SinkEntry"]


@dataclass(frozen=True, kw_only=True)
class SinkEntry:
    """Output of one pre-commit of one writer (at-least-once log).

    Attributes:
        writer: number of the writer that wrote it (unique per ``MemorySink``).
        seq: the checkpoint it was written for.
        items: the items, as they come back from JSON.
    """

    writer: int
    seq: int
    items: list[Any]


class MemorySink:
    """Keeps each task's committed output in memory.

    Args:
        name: the sink name.

    Attributes:
        fail_precommits: the next this-many pre-commits (of any writer) raise
            ``UnavailableError`` before touching their buffer.
        fail_finalizes: the next this-many finalizes (including those redone by ``recover``)
            raise ``UnavailableError`` before writing anything.
        finalized: finalize calls that wrote output, counting repeats.
    """

    def __init__(self, name: str = "memory-sink") -> None:
        self.name = name
        self.fail_precommits = 0
        self.fail_finalizes = 0
        self.finalized = 0
        self._visible: dict[str, dict[int, list[Any]]] = {}
        self._log: dict[str, list[SinkEntry]] = {}
        self._writers = 0

    def open(self, ctx: SinkContext) -> _MemorySinkWriter:
        self._writers += 1
        self._visible.setdefault(ctx.task, {})
        self._log.setdefault(ctx.task, [])
        return _MemorySinkWriter(self, ctx, self._writers)

    # -- what a reader of the outside system sees --------------------------------------------

    def tasks(self) -> list[str]:
        """Every task that opened a writer."""
        return sorted(self._visible)

    def output(self, task: str | None = None) -> list[Any]:
        """Visible output of ``task`` (default: of the only task), oldest first.

        Under exactly-once: the finalized output of each checkpoint, in ``seq`` order. Under
        at-least-once: everything written, including replayed duplicates.
        """
        task = self._one(task)
        out: list[Any] = []
        for _, items in sorted(self._visible.get(task, {}).items()):
            out.extend(items)
        for entry in self._log.get(task, []):
            out.extend(entry.items)
        return out

    def entries(self, task: str | None = None) -> list[SinkEntry]:
        """The at-least-once log of ``task``: one entry per pre-commit, in write order."""
        return list(self._log.get(self._one(task), []))

    def _one(self, task: str | None) -> str:
        if task is not None:
            return task
        tasks = self.tasks()
        if len(tasks) != 1:
            raise DataError(f"MemorySink {self.name!r} serves tasks {tasks}; name one")
        return tasks[0]

    # -- used by writers -----------------------------------------------------------------

    def _fail(self, what: str) -> None:
        if what == "precommit" and self.fail_precommits > 0:
            self.fail_precommits -= 1
        elif what == "finalize" and self.fail_finalizes > 0:
            self.fail_finalizes -= 1
        else:
            return
        raise UnavailableError(f"MemorySink {self.name!r}: injected {what} failure; retry")

    def _apply(self, task: str, seq: int, payload: bytes) -> None:
        """Write the slot of ``seq``; a crash half-way leaves half of it, redone next time.
        A slot already complete is left alone, so a late finalize (a zombie's) never
        regresses output that recovery completed."""
        self._fail("finalize")
        items = decode(payload)
        slots = self._visible[task]
        if slots.get(seq) == items:
            return
        half = len(items) // 2
        if half:
            slots[seq] = items[:half]
            crash_point("sink.finalize.partial")
        slots[seq] = items
        self.finalized += 1

    def _drop_after(self, task: str, seq: int) -> None:
        slots = self._visible[task]
        for newer in [s for s in slots if s > seq]:
            del slots[newer]

    def __repr__(self) -> str:
        return f"MemorySink({self.name!r})"


class _MemorySinkWriter:
    def __init__(self, sink: MemorySink, ctx: SinkContext, writer: int) -> None:
        self.buffer: list[Any] = []
        self.sink = sink
        self.ctx = ctx
        self.writer = writer
        self._exactly_once = ctx.guarantee == "exactly-once"
        self._pending: dict[int, bytes] = {}
        self._finalized: int | None = None
        self.closed = False

    def recover(self, meta: dict[str, Any] | None, staged: Sequence[StagedEntry]) -> None:
        if not self._exactly_once:
            return
        for entry in staged:
            self.sink._apply(self.ctx.task, entry.seq, entry.payload)
            self._finalized = entry.seq
        self.sink._drop_after(self.ctx.task, int(meta["seq"]) if meta else 0)

    def precommit(self, seq: int) -> Precommit:
        return self.cut(seq)()

    def cut(self, seq: int) -> Callable[[], Precommit]:
        """Detach the buffer now; stage it when the returned function runs (the commit's
        executor), so items emitted meanwhile belong to the next checkpoint."""
        items = self.buffer.copy()
        self.buffer.clear()
        return partial(self._stage, seq, items)

    def _stage(self, seq: int, items: list[Any]) -> Precommit:
        self.sink._fail("precommit")
        try:
            payload = encode(items)
        except TypeError as exc:
            raise DataError(f"output for {self.sink.name!r} is not JSON-serializable ({exc}); "
                            "emit dicts, lists, strings and numbers") from exc
        count = len(items)
        meta = {"seq": seq, "writer": self.writer, "count": count}
        if not self._exactly_once:
            self.sink._log[self.ctx.task].append(
                SinkEntry(writer=self.writer, seq=seq, items=decode(payload)))
            return Precommit(meta=meta)
        if not count:
            return Precommit(meta=meta)
        self._pending[seq] = payload
        return Precommit(meta=meta, staged=StagedEntry(sink=self.ctx.sink_id, seq=seq,
                                                       meta=meta, payload=payload))

    def finalize(self, seq: int) -> None:
        payload = self._pending.get(seq)
        if payload is None:
            return
        self.sink._apply(self.ctx.task, seq, payload)
        del self._pending[seq]
        self._finalized = seq

    def releasable(self) -> int | None:
        return self._finalized

    def close(self) -> None:
        self.closed = True
