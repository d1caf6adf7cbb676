"""The commit policy: a task commits when its replay window reaches either bound."""

from __future__ import annotations

import bisect
from typing import Any

import resumeflow as rf
from resumeflow.checkpoint import decode_record


class FakeClock:
    """A monotonic clock that moves only when a record is processed."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def windows(work: Any, events: Any) -> list[int]:
    """Records covered by each kept commit record, oldest first."""
    store = rf.SQLiteStore(work.store, create=False)
    (status,) = store.tasks()
    positions = [decode_record(raw).positions["0"] for _, raw in store.records(status.task)]
    store.close()
    counts = [bisect.bisect_left(events.offsets, p) for p in positions]
    return [b - a for a, b in zip([0, *counts], counts, strict=False)]


def test_window_never_exceeds_replay_max_events(work: Any) -> None:
    """Every checkpoint covers at most ``replay_max_events`` records; all but the last
    exactly that many when time never forces an earlier commit."""
    events = work.events(5000)
    config = rf.RunConfig(replay_max_events=700, replay_max_seconds=3600,
                          keep_checkpoints=100)
    summary = rf.run(work.flow(events), work.store, config)
    sizes = windows(work, events)
    assert sum(sizes) == 5000 and summary.commits == len(sizes) == 8
    assert sizes == [700] * 7 + [100]


def test_window_commits_once_replay_max_seconds_is_reached(work: Any) -> None:
    """With records taking 10 ms each (on an injected clock), a 0.5 s bound commits about
    every 50 records, never much later than the bound."""
    events = work.events(1000)
    clock = FakeClock()

    def slow(event: dict[str, Any]) -> dict[str, Any]:
        clock.now += 0.01
        return event

    config = rf.RunConfig(replay_max_events=100_000, replay_max_seconds=0.5,
                          keep_checkpoints=100, batch_max_records=64)
    rf.Runtime(work.flow(events, check=slow), work.store, config, clock=clock).run()
    sizes = windows(work, events)
    assert sum(sizes) == 1000
    # The bound is checked after each batch, so a window overshoots by at most one batch:
    # the first batch (64 records, before any cost is measured), then batches sized to a
    # quarter of the bound (12 records of 10 ms).
    assert 50 <= sizes[0] <= 64, sizes
    assert all(50 <= size <= 62 for size in sizes[1:-1]), sizes
    assert sizes[-1] <= 62, sizes
    assert work.output("jsonl") == events.running_totals()


def test_unbounded_window_commits_once_at_the_end(work: Any) -> None:
    """``math.inf`` for both bounds means no bound: one commit, at the end of the input."""
    import math

    events = work.events(3000)
    config = rf.RunConfig(replay_max_events=math.inf,  # type: ignore[arg-type]
                          replay_max_seconds=math.inf)
    summary = rf.run(work.flow(events), work.store, config)
    assert summary.commits == 1 and windows(work, events) == [3000]
    assert work.output("jsonl") == events.running_totals()
