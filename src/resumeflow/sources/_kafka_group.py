"""The consumer group of a ``KafkaSource`` as the runtime's ``Membership``.

Assignments become gained partitions, fetched only once the runtime opened their tasks at
their committed offsets; revocations run the runtime's release handler (commit and close the
tasks) before the partitions are unassigned and the group moves them (``HandsOver``); losses
(this worker's session timed out) take the same path, and the new owner's epoch fences any
commit this worker still attempts. The callbacks run only inside ``poll()``, between task
steps, since only ``poll()`` polls the consumer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from confluent_kafka import Consumer, TopicPartition

    from ..runtime._membership import ReleaseHandler
    from ._kafka import KafkaSource

__all__ = ["KafkaGroup"]

log = logging.getLogger("resumeflow.sources.kafka")


class KafkaGroup:
    """The consumer group as a ``Membership``: assignments become gained partitions,
    revocations and losses lost ones (after the runtime committed them, see ``HandsOver``)."""

    def __init__(self, source: KafkaSource) -> None:
        self.source = source
        self._events: list[tuple[str, int]] = []
        self._held: set[int] = set()
        self._handler: ReleaseHandler | None = None
        self._joined = False

    def __repr__(self) -> str:
        return f"KafkaGroup({self.source.topic!r}, group_id={self.source.group_id!r})"

    def on_release(self, handler: ReleaseHandler) -> None:
        self._handler = handler

    def join(self, partitions: Sequence[str]) -> None:
        self.source._group = self
        self.source.consumer().subscribe([self.source.topic], on_assign=self._on_assign,
                                         on_revoke=self._on_revoke, on_lost=self._on_lost)
        self._joined = True
        log.info("%r: joined with %d partition(s) to share", self, len(partitions))

    def poll(self) -> tuple[list[str], list[str]]:
        self.source.pump(0)
        if not self._events:
            return [], []
        before = set(self._held)
        events, self._events = self._events, []
        lost_any: set[int] = set()
        for kind, n in events:
            if kind == "gained":
                self._held.add(n)
            else:
                self._held.discard(n)
                if n in before:
                    lost_any.add(n)
        gained = sorted((self._held - before) | (self._held & lost_any))
        lost = sorted(lost_any)
        return [str(n) for n in gained], [str(n) for n in lost]

    def leave(self) -> None:
        if not self._joined:
            return
        self._joined = False
        self._held.clear()
        source = self.source
        for reader in list(source._readers.values()):
            reader.close()
        source.flush_advice()
        consumer = source._consumer
        if consumer is not None:
            consumer.close()  # leaves the group at once: the others take over without waiting
        source._consumer = None
        source._group = None

    # -- callbacks (run inside pump(), between task steps) ---------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.source.rebalances += 1
        numbers = sorted(tp.partition for tp in partitions)
        log.info("%r: assigned partitions %s", self, numbers)
        self._events.extend(("gained", n) for n in numbers)
        # Fetching starts only when the runtime opens the task at its committed offset.
        consumer.incremental_assign([])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._give_back(partitions, "revoked")

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._give_back(partitions, "lost (session timed out or fenced by the group)")

    def _give_back(self, partitions: list[TopicPartition], why: str) -> None:
        self.source.rebalances += 1
        numbers = sorted(tp.partition for tp in partitions)
        log.info("%r: partitions %s %s", self, numbers, why)
        if self._handler is not None and self._joined:
            self._handler([str(n) for n in numbers if n in self._held])
        self._events.extend(("lost", n) for n in numbers)
        for n in numbers:
            reader = self.source._readers.get(n)
            if reader is not None:
                reader.drop_buffer()
        self.source.unassign(numbers)
