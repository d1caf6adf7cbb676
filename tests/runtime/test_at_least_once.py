"""At-least-once: output may repeat, but only the records of the replay window, and counted."""

from __future__ import annotations

from typing import Any

import pytest

REPLAY_MAX_EVENTS = 400


def first_mismatch(a: list[Any], b: list[Any]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["commit.after_precommit:3", "store.before_commit:5"])
def test_duplicates_only_from_the_replay_window(work: Any, crash_at: str) -> None:
    """A crash after the output was written but before the commit point repeats exactly the
    records of that window, no more than ``replay_max_events``, and the run counts them."""
    events = work.events(6000)
    args = work.run_args(work.pipeline(events, "jsonl"), "--guarantee", "at-least-once",
                         replay_max_events=REPLAY_MAX_EVENTS)
    crashed = work.cli(*args, crash_at=crash_at)
    assert crashed.returncode == -9, crashed.stderr
    done = work.cli(*args)
    assert done.returncode == 0, done.stderr

    expected = events.running_totals()
    output = work.output("jsonl")
    duplicated = len(output) - len(expected)
    assert 0 < duplicated <= REPLAY_MAX_EVENTS
    # The output is the reference with one window written twice: [0, c + n) then [c, end).
    start = first_mismatch(output, expected) - duplicated
    assert output == expected[:start + duplicated] + expected[start:]
    # The restart says how many records it replayed: exactly the duplicated ones.
    assert work.replayed(done.stderr) == [duplicated, duplicated]


def test_without_crash_at_least_once_output_is_exact(work: Any) -> None:
    """With no fault, at-least-once writes every record's effect exactly once."""
    events = work.events(3000)
    done = work.cli(*work.run_args(work.pipeline(events, "jsonl"), "--guarantee",
                                   "at-least-once", replay_max_events=REPLAY_MAX_EVENTS))
    assert done.returncode == 0, done.stderr
    assert work.output("jsonl") == events.running_totals()
