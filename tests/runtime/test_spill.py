"""Output a sink spills between batches is committed with its window, and counted."""

from __future__ import annotations

from typing import Any

import pytest

import resumeflow as rf
from resumeflow.sinks import _jsonlines


def test_spilled_output_is_committed_once_and_counted(work: Any,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With windows of 3,000 records read in batches of up to 4,096, the JSON-lines sink
    encodes its buffer between batches; the output is still every running total once, and
    the checkpoint's ``records_out`` counts the spilled items with the rest."""
    spilled: list[int] = []
    spill = _jsonlines._JsonLinesWriter.spill

    def counting(self: Any) -> int:
        n = spill(self)
        spilled.append(n)
        return n

    monkeypatch.setattr(_jsonlines._JsonLinesWriter, "spill", counting)
    events = work.events(10_000)
    summary = rf.run(work.flow(events), work.store, rf.RunConfig(replay_max_events=3000))
    assert sum(spilled) > 5000  # most of the output went through spill()
    assert work.output("jsonl") == events.running_totals()
    store = rf.SQLiteStore(work.store, create=False)
    (status,) = store.tasks()
    store.close()
    assert status.record is not None
    assert status.record.stats["records_out"] == summary.records_in == 10_000
