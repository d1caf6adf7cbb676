"""A fake clock: time moves only when a test or the simulator moves it.

Guarantees: ``monotonic()`` never goes backwards; ``sleep(s)`` returns at once after moving
the clock by ``s``, so a run that sleeps for minutes of simulated time takes microseconds.
``time()`` is a wall clock that moves with ``monotonic()`` from a fixed epoch, so commit
records made under the fake clock are the same on every run.
"""

from __future__ import annotations

from ..errors import UsageError

__all__ = ["FakeClock"]


class FakeClock:
    """Injectable clock and sleep for ``TaskRunner``, ``Runtime`` and the memory backends.

    Args:
        start_s: the initial reading of ``monotonic()``.
        wall_epoch_s: the reading of ``time()`` when ``monotonic()`` reads ``start_s``.
    """

    __slots__ = ("_now", "_wall_offset", "slept_s")

    def __init__(self, start_s: float = 0.0, *, wall_epoch_s: float = 1_700_000_000.0) -> None:
        self._now = start_s
        self._wall_offset = wall_epoch_s - start_s
        self.slept_s = 0.0
        """Total simulated seconds spent in ``sleep()``."""

    def monotonic(self) -> float:
        """Seconds on the simulated monotonic clock."""
        return self._now

    def time(self) -> float:
        """Simulated wall-clock seconds since the Unix epoch."""
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (which must not be negative)."""
        if seconds < 0:
            raise UsageError(f"a clock cannot go back: advance({seconds!r}); pass seconds >= 0")
        self._now += seconds

    def sleep(self, seconds: float) -> None:
        """Sleep by moving the clock; returns at once."""
        self.advance(max(seconds, 0.0))
        self.slept_s += max(seconds, 0.0)

    __call__ = monotonic

    def __repr__(self) -> str:
        return f"FakeClock(monotonic={self._now:.6f})"
