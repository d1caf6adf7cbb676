"""Pipelined commit: the cut on the task's thread, the writes on an executor, every invariant
kept (replay bound, content of the checkpoint, errors, drain on close)."""

from __future__ import annotations

import bisect
import math
import sys
import threading
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import pytest

import resumeflow as rf
from resumeflow.checkpoint import CommitRecord, OpenedTask, StagedEntry, decode_record
from resumeflow.checkpoint._store import InStoreWrite
from resumeflow.errors import ConfigurationError, UnavailableError
from resumeflow.runtime import TaskRunner
from resumeflow.runtime._task import (
    CommitExecutor,
    DeferredCommitExecutor,
    ThreadCommitExecutor,
)
from resumeflow.state import KeyedState


class FailingStore(rf.SQLiteStore):
    """A SQLite store whose commits raise ``failure`` (after ``delay_s``) while it is set."""

    failure: BaseException | None = None
    delay_s = 0.0

    def commit(self, opened: OpenedTask, record: CommitRecord,
               delta: Sequence[tuple[bytes, bytes | None]], staged: Sequence[StagedEntry],
               release: Sequence[tuple[str, int]], in_store: Sequence[InStoreWrite] = ()) -> None:
        time.sleep(self.delay_s)
        if self.failure is not None:
            raise self.failure
        super().commit(opened, record, delta, staged, release, in_store)


def runner(work: Any, events: Any, store: rf.SQLiteStore, executor: CommitExecutor,
           **config: Any) -> TaskRunner:
    task = TaskRunner(flow=work.flow(events), partition="0", partitions=1, store=store,
                      config=rf.RunConfig(keep_checkpoints=100, replay_max_seconds=3600,
                                          **config),
                      dead_letters=rf.sinks.JsonLinesSink(work.root / "dead.jsonl"),
                      executor=executor)
    task.open()
    return task


def durable_position(store: rf.SQLiteStore, events: Any) -> int:
    """Records before the newest durable checkpoint's position."""
    (status,) = store.tasks()
    if status.record is None:
        return 0
    return bisect.bisect_left(events.offsets, status.record.positions["0"])


def test_an_in_flight_commit_counts_in_the_replay_bound(work: Any) -> None:
    """While a commit is in flight, records read past the last durable checkpoint never
    exceed ``replay_max_events``: the task waits for the commit when the room is used up."""
    events = work.events(1000)
    store = rf.SQLiteStore(work.store)
    executor = DeferredCommitExecutor()
    task = runner(work, events, store, executor, replay_max_events=100, batch_max_records=30)
    read = 0
    overlapped = 0
    while not task.at_end:
        pending_before = task.has_uncommitted() and task.window_events == 0
        read += task.step()
        if pending_before and task.window_events:
            overlapped += 1
        assert read - durable_position(store, events) <= 100
        if task.window_events >= 60 or task.commit_due():
            task.commit_async()
    task.commit()
    assert overlapped > 0, "no batch ran while a commit was in flight"
    assert durable_position(store, events) == 1000
    task.close()
    store.close()
    assert work.output("jsonl") == events.running_totals()


def test_state_changed_after_the_cut_is_not_in_its_checkpoint(work: Any) -> None:
    """Values updated by batches read after a cut stay out of that checkpoint: the store
    holds, for every key, the value it had at the cut."""
    events = work.events(600, customers=5)
    store = rf.SQLiteStore(work.store)
    executor = DeferredCommitExecutor()
    task = runner(work, events, store, executor, batch_max_records=50)
    for _ in range(4):
        task.step()
    ((name, state),) = task.states.items()
    at_cut = dict(state.values)
    task.commit_async()
    for _ in range(4):
        task.step()
    assert dict(state.values) != at_cut
    assert executor.run_pending()
    reread = KeyedState(partial(store.load_state, task.opened.task_no), namespace=name,
                        max_hot_keys=math.inf)
    assert {key: reread.get(key) for key in at_cut} == at_cut
    task.commit()
    task.close()
    store.close()


def test_a_failed_background_commit_is_raised_on_the_task_thread(work: Any) -> None:
    """An UnavailableError raised by the store on the commit thread is raised, the same
    object, by the task's next step; nothing of that checkpoint lands and a new owner
    finishes with the exact output."""
    events = work.events(800)
    store = FailingStore(work.store)
    failure = UnavailableError("injected: store unavailable")
    store.failure = failure
    task = runner(work, events, store, ThreadCommitExecutor(), batch_max_records=100)
    task.step()
    task.commit_async()
    with pytest.raises(UnavailableError) as info:
        for _ in range(1000):
            task.step()
            time.sleep(0.001)
    assert info.value is failure
    task.close()
    assert store.tasks()[0].record is None
    store.failure = None
    again = runner(work, events, store, ThreadCommitExecutor())
    while not again.at_end:
        again.step()
        if again.commit_due():
            again.commit_async()
    again.commit()
    again.close()
    store.close()
    assert work.output("jsonl") == events.running_totals()


def test_close_waits_for_the_commit_in_flight(work: Any) -> None:
    """``close()`` returns only after the commit in flight is durable and finalized."""
    events = work.events(300)
    store = FailingStore(work.store)
    store.delay_s = 0.2
    task = runner(work, events, store, ThreadCommitExecutor())
    while not task.at_end:
        task.step()
    task.commit_async()
    task.close()
    assert durable_position(store, events) == 300
    store.close()
    assert work.output("jsonl") == events.running_totals()


def test_commits_run_on_the_executor_thread(work: Any) -> None:
    """With the default configuration a task's store commits run off the task's thread."""
    events = work.events(200)
    store = FailingStore(work.store)
    threads: list[threading.Thread] = []
    original = store.commit

    def commit(*args: Any, **kwargs: Any) -> None:
        threads.append(threading.current_thread())
        original(*args, **kwargs)

    store.commit = commit  # type: ignore[method-assign]
    summary = rf.Runtime(work.flow(events), store).run()
    assert summary.commits >= 1 and threads
    assert all(t is not threading.main_thread() for t in threads)
    records = [decode_record(raw) for _, raw in store.records(store.tasks()[0].task)]
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    store.close()
    assert work.output("jsonl") == events.running_totals()


class ThreadRecordingStore(rf.SQLiteStore):
    """A SQLite store that notes the thread of every commit."""

    threads: list[str]

    def commit(self, opened: OpenedTask, record: CommitRecord,
               delta: Sequence[tuple[bytes, bytes | None]], staged: Sequence[StagedEntry],
               release: Sequence[tuple[str, int]], in_store: Sequence[InStoreWrite] = ()) -> None:
        self.threads.append(threading.current_thread().name)
        super().commit(opened, record, delta, staged, release, in_store)


@pytest.mark.parametrize("alone", [True, False])
def test_a_window_that_fills_the_bound_commits_on_the_task_thread_when_alone(
        work: Any, alone: bool) -> None:
    """A task alone on its thread writes a window that fills the whole replay bound at once
    on that thread (nothing could overlap it), and hands partial windows, or any window
    when it shares the thread, to the commit thread; the output is exact either way."""
    events = work.events(1000)
    store = ThreadRecordingStore(work.store)
    store.threads = []
    task = runner(work, events, store, ThreadCommitExecutor("rf-commit-test"),
                  replay_max_events=100, batch_max_records=50)
    full: list[bool] = []
    while not task.at_end:
        task.step()
        if task.commit_due() or (task.window_events >= 50 and len(full) % 2):
            full.append(task.window_events >= 100)
            task.commit_async(alone=alone)
    task.commit()
    task.close()
    store.close()
    assert True in full and False in full
    here = threading.current_thread().name
    expected = [here if alone and f else "rf-commit-test" for f in full]
    assert store.threads[:len(full)] == expected
    assert work.output("jsonl") == events.running_totals()


def test_a_full_window_is_durable_on_the_task_thread_and_finalized_beside_the_next(
        work: Any) -> None:
    """A window that fills the replay bound is made durable on the task's thread, and its
    sinks finalize on the commit thread: the task reads its next batch before that finalize
    ends, the bound still holds (the checkpoint is durable), and the output is exact."""
    events = work.events(500)
    store = ThreadRecordingStore(work.store)
    store.threads = []
    task = runner(work, events, store, ThreadCommitExecutor("rf-commit-test"),
                  replay_max_events=100, batch_max_records=50)
    writer = task.writers["out"]
    finalize = writer.finalize
    finalized: list[tuple[str, float, float]] = []

    def slow_finalize(seq: int) -> None:
        began = time.monotonic()
        time.sleep(0.05)
        finalize(seq)
        finalized.append((threading.current_thread().name, began, time.monotonic()))

    writer.finalize = slow_finalize  # type: ignore[method-assign]
    read_at: list[float] = []
    cut_at: list[float] = []
    while not task.at_end:
        task.step()
        read_at.append(time.monotonic())
        assert task.window_events <= 100
        if task.commit_due():
            assert task.window_events == 100
            cut_at.append(time.monotonic())
            task.commit_async(alone=True)
    task.commit()
    task.close()
    assert durable_position(store, events) == 500
    store.close()
    here = threading.current_thread().name
    assert store.threads[:5] == [here] * 5
    full = finalized[:4]  # the fifth window's finalize is the last commit's: nothing after it
    assert {name for name, _, _ in full} == {"rf-commit-test"}
    for cut, (_, _, ended) in zip(cut_at, full, strict=False):
        assert any(cut < t < ended for t in read_at)  # read on before the finalize ended
    assert work.output("jsonl") == events.running_totals()


class PreparingStore(rf.SQLiteStore):
    """A SQLite store that notes, per checkpoint, when its delta was prepared and whether
    the commit got the prepared delta (when it had one)."""

    prepared: list[tuple[int, float]]
    got_prepared: list[bool]

    def prepare_delta(self, opened: OpenedTask, seq: int,
                      delta: Sequence[tuple[bytes, bytes | None]]) -> Any:
        self.prepared.append((seq, time.monotonic()))
        return super().prepare_delta(opened, seq, delta)

    def commit(self, opened: OpenedTask, record: CommitRecord,
               delta: Sequence[tuple[bytes, bytes | None]], staged: Sequence[StagedEntry],
               release: Sequence[tuple[str, int]], in_store: Sequence[InStoreWrite] = ()) -> None:
        if delta:
            self.got_prepared.append(type(delta).__name__ == "_PreparedDelta")
        super().commit(opened, record, delta, staged, release, in_store)


@pytest.mark.parametrize("alone", [True, False])
def test_sinks_stage_on_the_stager_while_the_store_prepares_the_delta(
        work: Any, alone: bool) -> None:
    """A pipelined task's sinks write their output's staging file on the task's stager
    thread, and the store encodes the checkpoint's delta without waiting for it (inline or
    on the commit thread); the commit gets the encoded delta and the output stays exact."""
    events = work.events(600)
    store = PreparingStore(work.store)
    store.prepared, store.got_prepared = [], []
    staged_on: list[tuple[str, float, float]] = []
    task = runner(work, events, store, ThreadCommitExecutor("rf-commit-test"),
                  replay_max_events=100, batch_max_records=50)
    writer = task.writers["out"]
    writer._inline_max = 0  # type: ignore[attr-defined]  # always a staging file
    stage = writer._stage  # type: ignore[attr-defined]

    def slow_stage(*args: Any) -> None:
        began = time.monotonic()
        time.sleep(0.05)
        stage(*args)
        staged_on.append((threading.current_thread().name, began, time.monotonic()))

    writer._stage = slow_stage  # type: ignore[attr-defined]
    while not task.at_end:
        task.step()
        if task.commit_due():
            task.commit_async(alone=alone)
    task.commit()
    task.close()
    assert durable_position(store, events) == 600
    store.close()
    assert staged_on and len(staged_on) == len(store.prepared)
    assert {name for name, _, _ in staged_on} == {f"resumeflow-stage {task.task_id}"}
    for (_, _, ended), (_, prepared_at) in zip(staged_on, store.prepared, strict=True):
        assert prepared_at < ended  # the delta was encoded without waiting for the staging
    assert len(store.got_prepared) == len(store.prepared) and all(store.got_prepared)
    assert work.output("jsonl") == events.running_totals()


@pytest.mark.parametrize("interval", [0.001, None])
def test_a_run_sets_the_switch_interval_while_it_lasts(work: Any, interval: float | None) -> None:
    """While a run lasts the interpreter switches threads at its ``switch_interval_s`` (so
    the commit thread gets the interpreter lock back soon after each write), and once the
    run ends the interval it found is back; ``None`` leaves it alone throughout."""
    found = sys.getswitchinterval()
    during: list[float] = []

    def look(event: Any) -> Any:
        during.append(sys.getswitchinterval())
        return event

    events = work.events(200)
    summary = rf.run(work.flow(events, check=look), work.store,
                     rf.RunConfig(switch_interval_s=interval))
    assert summary.records_in == 200
    assert set(during) == {found if interval is None else interval}
    assert sys.getswitchinterval() == found
    assert work.output("jsonl") == events.running_totals()


@pytest.mark.parametrize("bad", [0, -0.001, 2.0, math.inf, True, "1ms"])
def test_a_switch_interval_out_of_range_is_refused_at_start(bad: Any) -> None:
    """A switch interval that is not a number of seconds in (0, 1] fails when the config is
    made, with a message naming the setting."""
    with pytest.raises(ConfigurationError, match="switch_interval_s"):
        rf.RunConfig(switch_interval_s=bad)
