"""Transient store failures restart a task from its last checkpoint, within a budget."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import resumeflow as rf
from resumeflow.checkpoint import CommitRecord, OpenedTask, SQLiteStore, StagedEntry
from resumeflow.errors import UnavailableError


class FlakyStore(SQLiteStore):
    """A SQLite store whose commits fail as if the database were unreachable."""

    def __init__(self, path: Path, *, fail_commits: set[int]) -> None:
        super().__init__(path)
        self.fail_commits = fail_commits
        self.calls = 0

    def commit(self, opened: OpenedTask, record: CommitRecord,
               delta: Sequence[tuple[bytes, bytes | None]], staged: Sequence[StagedEntry],
               release: Sequence[tuple[str, int]], in_store: Sequence[Any] = ()) -> None:
        self.calls += 1
        if self.calls in self.fail_commits:
            raise UnavailableError("database is locked (injected)")
        super().commit(opened, record, delta, staged, release, in_store)


def _flow(tmp_path: Path, n: int) -> rf.Flow:
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps({"id": i, "k": f"k{i % 7}", "v": i}) + "\n"
                              for i in range(n)))
    flow = rf.Flow("flaky")
    (flow.source(rf.sources.JsonLines(events))
         .key_by(lambda e: e["k"])
         .stateful_map(lambda s, e: (s + e["v"], {"id": e["id"], "sum": s + e["v"]}), initial=0)
         .sink(rf.sinks.JsonLinesSink(tmp_path / "out.jsonl", with_key=False)))
    return flow


def _expected(n: int) -> list[dict[str, int]]:
    sums: dict[str, int] = {}
    out = []
    for i in range(n):
        k = f"k{i % 7}"
        sums[k] = sums.get(k, 0) + i
        out.append({"id": i, "sum": sums[k]})
    return out


def test_failed_commits_restart_the_task_and_lose_or_duplicate_nothing(tmp_path: Path) -> None:
    """Commits that fail transiently (including the final one) are retried by restarting the
    task from its checkpoint after a backoff; the output is exact and the restarts counted."""
    n = 5000
    store = FlakyStore(tmp_path / "s.db", fail_commits={2, 3, 6, 9})
    config = rf.RunConfig(replay_max_events=700, restart_backoff_base_s=0.0,
                          restart_backoff_max_s=0.0, seed=1)
    summary = rf.Runtime(_flow(tmp_path, n), store, config, sleep=lambda s: None).run()
    store.close()
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert got == _expected(n)
    assert summary.restarts == 4


def test_a_task_failing_past_its_restart_budget_fails_the_run(tmp_path: Path) -> None:
    """When every commit fails, the run gives up after ``restart_budget`` restarts in a row."""
    store = FlakyStore(tmp_path / "s.db", fail_commits=set(range(1, 100)))
    config = rf.RunConfig(replay_max_events=700, restart_budget=3, seed=1)
    waits: list[float] = []
    with pytest.raises(UnavailableError, match="injected"):
        rf.Runtime(_flow(tmp_path, 2000), store, config, sleep=waits.append).run()
    store.close()
    assert len(waits) == 3
    assert all(0 <= w <= min(config.restart_backoff_max_s,
                             config.restart_backoff_base_s * 2 ** i)
               for i, w in enumerate(waits))
