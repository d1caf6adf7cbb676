"""Fencing: when a second runtime takes a task, the first one can no longer commit anything."""

from __future__ import annotations

from typing import Any

import pytest

import resumeflow as rf
from resumeflow.errors import FencedError

SINK_KINDS = ("jsonl", "sqlite-store", "sqlite-other")
CONFIG = rf.RunConfig(replay_max_events=100_000, replay_max_seconds=3600)


def committed(work: Any) -> tuple[int, int]:
    """(seq, epoch) of the task's newest commit record."""
    store = rf.SQLiteStore(work.store, create=False)
    (status,) = store.tasks()
    store.close()
    return (status.record.seq if status.record else 0), status.epoch


@pytest.mark.parametrize("kind", SINK_KINDS)
def test_older_runtime_commit_is_refused_and_lands_nothing(work: Any, kind: str) -> None:
    """The older runtime's commit raises FencedError naming both epochs; none of its output
    or state lands, and the newer runtime finishes with the exact output."""
    events = work.events(3000)
    old = rf.Runtime(work.flow(events, kind), work.store, CONFIG)
    old.open()
    (old_task,) = old.tasks
    assert old_task.step() > 0
    old_task.commit()  # seq 1, while it still owns the task
    before = work.output(kind)
    while old_task.step():
        pass

    new = rf.Runtime(work.flow(events, kind), work.store, CONFIG)
    (recovery,) = new.open()
    assert recovery.seq == 1 and recovery.epoch == old_task.opened.epoch + 1

    with pytest.raises(FencedError) as info:
        old_task.commit()
    message = str(info.value)
    assert f"owned by epoch {recovery.epoch}" in message
    assert f"holds epoch {old_task.opened.epoch}" in message
    assert "another one resumed the task" in message
    old_task.close()
    old.store.close()

    assert committed(work) == (1, recovery.epoch)
    assert work.output(kind) == before, "the fenced commit changed the output"

    new.run()
    assert work.output(kind) == work.expected(events, kind)


def test_older_runtime_run_stops_with_fenced_error(work: Any) -> None:
    """A whole ``run()`` of a fenced runtime fails with FencedError at its first commit."""
    events = work.events(2000)
    old = rf.Runtime(work.flow(events), work.store, CONFIG)
    old.open()
    new = rf.Runtime(work.flow(events), work.store, CONFIG)
    new.open()
    with pytest.raises(FencedError):
        old.run()
    assert work.output("jsonl") == []
    new.run()
    assert work.output("jsonl") == events.running_totals()


def test_older_runtime_cannot_read_state_the_new_owner_committed(work: Any) -> None:
    """A fenced runtime's cold state read raises FencedError instead of returning what the
    new owner committed (which it would fold its own records into a second time)."""
    events = work.events(3000)
    first = rf.Runtime(work.flow(events), work.store, CONFIG)
    first.open()
    (first_task,) = first.tasks
    assert first_task.step() > 0
    first_task.commit()  # seq 1: state for the keys read so far
    first_task.close()
    first.store.close()

    old = rf.Runtime(work.flow(events), work.store, CONFIG)
    old.open()  # its state is cold: every key it reads is looked up in the store
    new = rf.Runtime(work.flow(events), work.store, CONFIG)
    new.open()
    (new_task,) = new.tasks
    assert new_task.step() > 0
    new_task.commit()  # the new owner's state is in the store now

    (old_task,) = old.tasks
    with pytest.raises(FencedError, match="may not read its state"):
        old_task.step()
    old_task.close()
    old.store.close()
    new.run()
    assert work.output("jsonl") == events.running_totals()
