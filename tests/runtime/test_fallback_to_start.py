"""A task whose every checkpoint is corrupt starts over without tripping on its own output."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import resumeflow as rf


def _flow(tmp_path: Path) -> rf.Flow:
    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps({"id": i, "k": f"k{i % 5}"}) + "\n" for i in range(300)))
    flow = rf.Flow("restart")
    (flow.source(rf.sources.JsonLines(events))
         .key_by(lambda e: e["k"])
         .reduce(lambda n, e: n + 1, initial=0)
         .sink(rf.sinks.JsonLinesSink(tmp_path / "out.jsonl")))
    return flow


def test_corrupt_only_checkpoint_restarts_the_output_from_scratch(tmp_path: Path) -> None:
    """When the only commit record is corrupt after its output was appended, the task starts
    from the beginning, cuts the output it no longer vouches for, and ends exactly once."""
    config = rf.RunConfig(replay_max_events=10_000, replay_max_seconds=60.0)
    rf.run(_flow(tmp_path), tmp_path / "s.db", config)
    reference = (tmp_path / "out.jsonl").read_bytes()
    assert reference
    db = sqlite3.connect(tmp_path / "s.db")
    (count,) = db.execute("SELECT count(*) FROM commits").fetchone()
    assert count == 1
    db.execute("UPDATE commits SET record = substr(record, 1, 40)")
    db.commit()
    db.close()
    summary = rf.run(_flow(tmp_path), tmp_path / "s.db", config)
    assert summary.recoveries[0].seq == 0 and summary.recoveries[0].discarded_seqs == (1,)
    assert (tmp_path / "out.jsonl").read_bytes() == reference
