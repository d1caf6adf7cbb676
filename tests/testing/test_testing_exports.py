"""The public names of resumeflow.testing are exactly these, and each is importable."""

from __future__ import annotations

import pytest

import resumeflow.testing as testing
from resumeflow.errors import UsageError


def test_testing_exports_are_pinned() -> None:
    """resumeflow.testing re-exports this list and nothing else through __all__."""
    assert sorted(testing.__all__) == sorted([
        "VIOLATION_KINDS", "FakeClock", "FaultPlan", "InjectedUserError", "MemorySink",
        "MemorySource", "MemoryStore", "ObservedStore", "Outcome", "SQLiteBackend", "Schedule",
        "ScheduleResult", "SimReport", "SimulatedCrash", "SinkEntry", "SinkFixture",
        "Violation", "check_sink", "check_source", "check_store", "run_schedule", "simulate",
    ])
    for name in testing.__all__:
        assert getattr(testing, name) is not None, name
        if name[0].isupper() and name != "VIOLATION_KINDS":
            assert getattr(testing, name).__doc__, f"{name} has no docstring"


def test_fake_clock_moves_only_when_told() -> None:
    """FakeClock sleeps by moving time, never backwards, and its wall clock moves with it."""
    clock = testing.FakeClock(start_s=5.0, wall_epoch_s=1000.0)
    assert clock.monotonic() == 5.0 and clock.time() == 1000.0
    clock.sleep(2.5)
    clock.advance(0.5)
    assert clock.monotonic() == 8.0 and clock.time() == 1003.0 and clock.slept_s == 2.5
    with pytest.raises(UsageError, match="cannot go back"):
        clock.advance(-1.0)
