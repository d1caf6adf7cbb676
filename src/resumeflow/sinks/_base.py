"""The sink contract: output buffered per checkpoint, staged before the commit point and
finalized idempotently after it.

For every checkpoint ``seq`` of a task the runtime calls ``precommit(seq)`` (stage the
buffered output), then commits the store (the commit point), then ``finalize(seq)``. After a
crash, ``recover(meta, staged)`` is given what the newest valid commit record says about this
sink and the staged output not yet released; it must finalize those again (idempotently) and
discard anything the sink holds beyond them. ``releasable()`` names the newest ``seq`` whose
finalized output is durable, so the store can drop its staging in the next commit.

Two methods are optional. ``cut(seq)`` detaches the buffer at the checkpoint's cut and returns
the pre-commit to run on the commit's executor (``precommit`` runs at the cut otherwise).
``spill()``, called between batches, may encode the buffer into the sink's own pending output
for the current checkpoint and empty it; it returns how many items it took (0: none).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from ..checkpoint import StagedEntry
from ..checkpoint._store import InStoreWrite

__all__ = ["Guarantee", "Precommit", "Sink", "SinkContext", "SinkWriter"]

Guarantee = Literal["exactly-once", "at-least-once"]


@dataclass(frozen=True, kw_only=True)
class SinkContext:
    """What a sink knows about the task it serves.

    Attributes:
        sink_id: stable id of the sink within the flow (the key of its commit-record entry).
        task: the task id.
        partition: the source partition the task reads.
        partitions: how many partitions the source has (sinks that write one file per task
            need a ``{partition}`` placeholder when there is more than one).
        keyed: whether items are ``(key, value)`` pairs.
        guarantee: the pipeline's guarantee.
        store_path: the store's database file when the store is SQLite, else ``None``.
        epoch: the task owner's fencing epoch (sinks keep per-epoch scratch files apart, so a
            paused old owner cannot touch the new owner's).
        from_scratch: every checkpoint of the task was discarded as corrupt, so it starts from
            the beginning; output its sinks hold was written by those checkpoints and must go.
    """

    sink_id: str
    task: str
    partition: str
    partitions: int
    keyed: bool
    guarantee: Guarantee
    store_path: Path | None
    epoch: int = 0
    from_scratch: bool = False


@dataclass(frozen=True, kw_only=True)
class Precommit:
    """What a sink's pre-commit hands to the store's commit.

    Attributes:
        meta: small JSON-compatible description recorded in the commit record.
        staged: output to keep in the store until finalized.
        in_store: a write to run inside the store's commit transaction (same database).
    """

    meta: dict[str, Any] | None = None
    staged: StagedEntry | None = None
    in_store: InStoreWrite | None = None


class SinkWriter(Protocol):
    """The part of a sink that serves one task."""

    buffer: list[Any]
    """Items emitted since the last pre-commit; the runtime appends and truncates it."""

    def recover(self, meta: dict[str, Any] | None, staged: Sequence[StagedEntry]) -> None:
        """Finalize ``staged`` again and drop anything newer than ``meta`` describes."""
        ...

    def precommit(self, seq: int) -> Precommit:
        """Stage the buffer for checkpoint ``seq``; a crash here leaves nothing visible."""
        ...

    def finalize(self, seq: int) -> None:
        """Make checkpoint ``seq``'s output visible; idempotent, safe to redo after a crash."""
        ...

    def releasable(self) -> int | None:
        """Newest ``seq`` whose finalized output is durable (may flush to make it so)."""
        ...

    def close(self) -> None:
        """Release resources; a crash instead leaves nothing that recovery cannot redo."""
        ...


class Sink(Protocol):
    """An output of a flow."""

    name: str

    def open(self, ctx: SinkContext) -> SinkWriter:
        """A writer for one task; fails at start on unusable configuration."""
        ...
