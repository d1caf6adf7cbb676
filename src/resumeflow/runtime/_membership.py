"""Membership: which partitions of a source this worker runs, when several workers share them.

A membership decides ownership; the store decides who may commit. Taking a partition makes the
runtime open its task, which bumps the task's epoch in the store and so fences the previous
owner whatever the membership believes. Two members that both think they own a partition (a
paused worker that missed its session timeout, a lease that expired unnoticed) are therefore
harmless: only the newer epoch can commit, and the older one's commits fail with
``FencedError`` and land nothing. A membership only has to be live (every partition is
eventually owned by someone), never exact.

* ``StaticMembership``: this worker owns every partition; one process runs the whole flow.
* A source may bring its own (``source.membership()``): ``KafkaSource`` follows its consumer
  group. ``PostgresLeases`` shares the partitions of sources without a group protocol through
  leases with heartbeats.

A membership that can delay a hand-over until the task has committed (Kafka's cooperative
revocation) also implements ``HandsOver``: the runtime gives it a handler that commits and
closes the tasks of the partitions about to go, and the membership calls it, from inside
``poll()``, before it lets them go. Without it the runtime commits a lost task after ``poll()``
returns; if the next owner opened it first, that commit is fenced and the next owner replays
the uncommitted records (at most the replay bound), with no duplicate effect.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

__all__ = [
    "HandsOver", "Membership", "ReleaseHandler", "StaticMembership", "ThrottledMembership",
]


class Membership(Protocol):
    """Which partitions this worker holds, changing as workers come and go."""

    def join(self, partitions: Sequence[str]) -> None:
        """Start competing for ``partitions`` (every partition of the source)."""
        ...

    def poll(self) -> tuple[list[str], list[str]]:
        """``(gained, lost)`` since the last poll; renews heartbeats.

        Called between task steps, often: cheap when nothing changed. A partition lost and
        gained again since the last poll is in both lists (the runtime closes its task and
        opens it anew, with a new epoch).
        """
        ...

    def leave(self) -> None:
        """Release what is held, so other members take it without waiting for a timeout.

        A crash instead leaves the partitions held until the membership's timeout; the next
        owner's open fences this worker anyway.
        """
        ...


ReleaseHandler = Callable[[list[str]], None]
"""Commits and closes the tasks of the given partitions (those this worker holds)."""


@runtime_checkable
class HandsOver(Protocol):
    """Optional: a membership that lets a partition go only after its task has committed."""

    def on_release(self, handler: ReleaseHandler) -> None:
        """Call ``handler`` from inside ``poll()`` or ``leave()`` before giving partitions up."""
        ...


class StaticMembership:
    """Owns every partition from the first ``poll()`` on: one worker runs the whole flow."""

    def __init__(self) -> None:
        self._pending: list[str] = []
        self._held: list[str] = []

    def join(self, partitions: Sequence[str]) -> None:
        self._pending = [p for p in partitions if p not in self._held]
        self._held = list(partitions)

    def poll(self) -> tuple[list[str], list[str]]:
        gained, self._pending = self._pending, []
        return gained, []

    def leave(self) -> None:
        self._held = []
        self._pending = []

    def __repr__(self) -> str:
        return "StaticMembership()"


class ThrottledMembership:
    """Polls ``inner`` at most once per ``interval_s`` (for memberships whose poll is a
    database round trip, such as leases); in between, ``poll()`` reports no change.

    Keep ``interval_s`` well within the inner membership's timeout (a third of a lease).
    """

    def __init__(self, inner: Membership, interval_s: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.interval_s = interval_s
        self._clock = clock
        self._last: float | None = None

    def join(self, partitions: Sequence[str]) -> None:
        self.inner.join(partitions)

    def poll(self) -> tuple[list[str], list[str]]:
        now = self._clock()
        if self._last is not None and now - self._last < self.interval_s:
            return [], []
        self._last = now
        return self.inner.poll()

    def leave(self) -> None:
        self.inner.leave()

    def __repr__(self) -> str:
        return f"ThrottledMembership({self.inner!r}, interval_s={self.interval_s})"
