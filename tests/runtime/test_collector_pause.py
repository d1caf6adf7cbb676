"""The cyclic garbage collector is held off for the length of a checkpoint's cut, and only
then."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest

import resumeflow as rf
from resumeflow.runtime._task import collector_paused
from resumeflow.state import KeyedState


def test_every_cut_runs_with_the_collector_paused_and_it_is_back_on_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each checkpoint's delta is taken with the collector off; the run ends with it on."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"key": f"k{i % 7}", "v": i}) + "\n" for i in range(500)))
    seen: list[bool] = []
    take = KeyedState.take_delta

    def recording(self: KeyedState) -> Any:
        seen.append(gc.isenabled())
        return take(self)

    monkeypatch.setattr(KeyedState, "take_delta", recording)
    flow = rf.Flow("gc")
    (flow.source(rf.sources.JsonLines(src))
         .key_by(lambda e: e["key"])
         .reduce(lambda total, e: total + e["v"], initial=0)
         .sink(rf.sinks.JsonLinesSink(tmp_path / "out.jsonl")))
    assert gc.isenabled()
    summary = rf.run(flow, tmp_path / "store.db", rf.RunConfig(replay_max_events=100))
    assert summary.commits >= 5
    assert len(seen) >= 5 and not any(seen)
    assert gc.isenabled()


def test_pauses_nest_and_leave_a_collector_turned_off_by_the_user_off() -> None:
    """The collector comes back on when the outermost pause ends (also on an error), and not
    at all if it was off before."""
    with collector_paused():
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("the cut failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
