"""The checker catches deliberately broken stores, sinks and runtimes, and says how to replay."""

from __future__ import annotations

from typing import Any

import pytest

from resumeflow.checkpoint import CommitRecord, OpenedTask
from resumeflow.runtime import TaskRunner
from resumeflow.sources import Batch
from resumeflow.testing import MemorySink, MemoryStore, SimReport, simulate
from resumeflow.testing._cli import main
from resumeflow.testing._workload import workload

_, BUILD, INPUTS = workload(12)
SCHEDULES = 300


def _kinds(report: SimReport) -> set[str]:
    return {v.kind for failure in report.failures for v in failure.violations}


def _broken(schedules: int = SCHEDULES, **kwargs: Any) -> SimReport:
    return simulate(BUILD, INPUTS, schedules=schedules, seed=0, raise_on_violation=False,
                    **kwargs)


def test_the_workload_under_test_passes_with_correct_backends() -> None:
    """The flow used below keeps every invariant with the real memory backends."""
    report = _broken()
    assert report.ok, report.failures[0].message() if report.failures else ""


class _AcceptsStaleEpochs(MemoryStore):
    def _check_owner(self, row: Any, record: CommitRecord) -> None:
        row.last_seq = record.seq - 1


def test_catches_a_store_that_accepts_stale_epochs() -> None:
    """A store without fencing lets zombies commit: reported as stale_epoch_commit."""
    report = _broken(store_type=_AcceptsStaleEpochs)
    assert "stale_epoch_commit" in _kinds(report)


class _ForgetsNewest(MemoryStore):
    """Reopening silently returns the checkpoint before the newest (a lost commit)."""

    def open_task(self, task: str) -> OpenedTask:
        row = self._task(task, create=True)
        if len(row.commits) >= 2:
            self._discard_after(row, max(row.commits) - 1)
        return super().open_task(task)


def test_catches_a_store_that_loses_its_newest_commit() -> None:
    """A store that drops its newest commit on reopen is caught going backwards."""
    kinds = _kinds(_broken(store_type=_ForgetsNewest))
    assert "non_monotonic_position" in kinds
    assert kinds & {"duplicated", "state_mismatch", "replay_above_bound"}


class _RefinalizeAppends(MemorySink):
    """Finalize redone by recovery appends the checkpoint's output again: not idempotent."""

    def _apply(self, task: str, seq: int, payload: bytes) -> None:
        slots = self._visible[task]
        super()._apply(task, seq + 1_000_000 * (seq in slots), payload)


def test_catches_a_sink_whose_finalize_is_not_idempotent() -> None:
    """A sink that appends when finalize is redone is reported as duplicated output."""
    # The redo that appends needs a takeover inside the commit protocol followed by the
    # zombie's own finalize: a few schedules in a thousand.
    report = _broken(1000, sink_type=_RefinalizeAppends, guarantee="exactly-once")
    assert "duplicated" in _kinds(report)


class _ForgetsStaged(MemorySink):
    """Recovery does not finalize what the store kept staged: output of a commit is lost."""

    def open(self, ctx: Any) -> Any:
        writer = super().open(ctx)
        writer.recover = lambda meta, staged: None
        return writer


def test_catches_a_sink_that_loses_committed_output() -> None:
    """A sink that skips recovery's finalize is reported as lost output."""
    report = _broken(sink_type=_ForgetsStaged, guarantee="exactly-once")
    assert "lost" in _kinds(report)


def test_catches_a_runtime_that_processes_redelivered_records(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without dropping redelivered records, the runtime duplicates effects and goes back."""
    def keep_everything(self: TaskRunner, batch: Batch) -> Batch:
        return batch

    monkeypatch.setattr(TaskRunner, "_drop_redelivered", keep_everything)
    kinds = _kinds(_broken())
    assert "non_monotonic_position" in kinds
    assert kinds & {"duplicated", "state_mismatch"}


def test_a_failure_names_its_seed_and_the_call_that_replays_it() -> None:
    """The AssertionError of a failing simulate() names the seed and the exact replay call."""
    with pytest.raises(AssertionError) as caught:
        simulate(BUILD, INPUTS, schedules=SCHEDULES, seed=0, store_type=_AcceptsStaleEpochs)
    message = str(caught.value)
    seed = int(message.split("schedule seed ")[1].split()[0])
    assert f"simulate(build, inputs, seed={seed}, schedules=1)" in message
    assert "stale_epoch_commit in task" in message and "fault plan" in message
    again = simulate(BUILD, INPUTS, schedules=1, seed=seed, raise_on_violation=False,
                     store_type=_AcceptsStaleEpochs)
    assert again.failures and again.failures[0].violations


def test_the_cli_prints_the_replay_command_of_a_failure(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`run` exits 1 and prints each failing seed with `python -m resumeflow.testing replay`."""
    monkeypatch.setattr(TaskRunner, "_drop_redelivered", lambda self, batch: batch)
    assert main(["run", "--schedules", "60", "--seed", "0"]) == 1
    captured = capsys.readouterr()
    assert "python -m resumeflow.testing replay --seed " in captured.err
    assert "FAILED: seeds" in captured.out and "schedules/s" in captured.out
