"""Recovery: what a restart reads, says and repairs, end to end on a real store."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

import resumeflow as rf

SINK_KINDS = ("jsonl", "sqlite-store", "sqlite-other")
ONE_COMMIT_PER_RUN = rf.RunConfig(replay_max_events=1_000_000, replay_max_seconds=3600)


def edit_newest_record(store: Path, edit: Any) -> int:
    db = sqlite3.connect(store)
    try:
        seq, raw = db.execute("SELECT seq, record FROM commits ORDER BY seq DESC").fetchone()
        db.execute("UPDATE commits SET record = ? WHERE seq = ?", (edit(bytes(raw)), seq))
        db.commit()
    finally:
        db.close()
    return int(seq)


def flip_epoch(raw: bytes) -> bytes:
    body = json.loads(raw)
    body["epoch"] += 1
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def cut_in_half(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


@pytest.mark.parametrize("damage", [flip_epoch, cut_in_half], ids=["edited", "truncated"])
@pytest.mark.parametrize("kind", SINK_KINDS)
def test_damaged_newest_checkpoint_falls_back_and_output_stays_exact(
        work: Any, kind: str, damage: Any, caplog: pytest.LogCaptureFixture) -> None:
    """When the newest commit record is damaged, the restart says so, resumes from the one
    before it, and the final output is still exactly the reference."""
    events = work.events(1000)
    rf.run(work.flow(events, kind), work.store, ONE_COMMIT_PER_RUN)  # seq 1
    events.append(1000)
    rf.run(work.flow(events, kind), work.store, ONE_COMMIT_PER_RUN)  # seq 2
    assert edit_newest_record(work.store, damage) == 2
    events.append(1000)
    caplog.set_level("INFO", logger="resumeflow")
    summary = rf.run(work.flow(events, kind), work.store, ONE_COMMIT_PER_RUN)
    (recovery,) = summary.recoveries
    assert recovery.seq == 1 and recovery.discarded_seqs == (2,)
    assert "after discarding corrupt seq [2]" in recovery.line()
    assert "falling back to the one before it" in caplog.text
    assert summary.records_in == 2000, "resumes from seq 1's position"
    assert work.output(kind) == work.expected(events, kind)


def test_recovery_line_names_checkpoint_age_positions_bound_and_state(work: Any) -> None:
    """The per-task recovery line gives seq, age, positions, replay bound and state keys."""
    events = work.events(800, customers=17)
    rf.run(work.flow(events), work.store, ONE_COMMIT_PER_RUN)
    first = rf.Runtime(work.flow(events), work.store, ONE_COMMIT_PER_RUN)
    (recovery,) = first.open()
    for task in first.tasks:
        task.close()
    line = recovery.line()
    pattern = (
        r"recovered task orders:events\.jsonl:0 epoch 2 from checkpoint seq 1 "
        r"\(age \d+\.\d s\); positions \{'0': SIZE\}; replay bound 1000000 records, "
        r"replaying 0; 17 state keys \(opened lazily\); ready in \d+\.\d ms"
    ).replace("SIZE", str(events.size))
    assert re.fullmatch(pattern, line), line


def test_directory_source_resumes_every_partition(work: Any) -> None:
    """With one task per file, a crash and restart leave every partition's output exact."""
    (work.root / "in").mkdir()
    parts = {name: work.events(1500, name=f"in/{name}", seed=i)
             for i, name in enumerate(("a.jsonl", "b.jsonl", "c.jsonl"))}
    flow = rf.Flow("multi")
    (flow.source(rf.sources.JsonLinesDir(str(work.root / "in" / "*.jsonl")))
         .key_by(lambda e: e["customer"])
         .reduce(lambda total, e: total + e["amount"], initial=0)
         .sink(rf.sinks.JsonLinesSink(str(work.root / "out" / "{partition}.jsonl"))))

    class Crash(BaseException):
        pass

    passes = {"n": 0}

    def crash(point: str) -> None:
        if point == "commit.after_store":
            passes["n"] += 1
            if passes["n"] == 5:
                raise Crash

    from resumeflow._faults import installed

    config = rf.RunConfig(replay_max_events=200, replay_max_seconds=3600)
    with installed(crash), pytest.raises(Crash):
        rf.run(flow, work.store, config)
    summary = rf.run(flow, work.store, config)
    assert sorted(r.task for r in summary.recoveries) == [
        f"multi:{work.root / 'in' / '*.jsonl'}:{name}" for name in sorted(parts)]
    for name, events in parts.items():
        out = work.root / "out" / f"{name}.jsonl"
        assert [json.loads(x) for x in out.read_text().splitlines()] == events.running_totals()


class Crash(BaseException):
    """Stands for the process dying at a crash point."""


@pytest.mark.parametrize("point", rf.runtime.CRASH_POINTS)
def test_recovery_depends_only_on_durable_data(work: Any, point: str) -> None:
    """Two copies of one crashed pipeline's files recover to the same checkpoint, the same
    repaired output and the same final output: recovery reads durable data, not timing."""
    from resumeflow._faults import installed

    events = work.events(4000, bad_every=900)
    config = rf.RunConfig(replay_max_events=300, replay_max_seconds=3600)
    passes = {"n": 0}

    def crash(name: str) -> None:
        if name == point:
            passes["n"] += 1
            if passes["n"] == 3:
                raise Crash

    with installed(crash), pytest.raises(Crash):
        rf.run(work.flow(events), work.store, config)

    outcomes = []
    for copy in ("a", "b"):
        root = work.root / copy
        shutil.copytree(work.root, root, ignore=shutil.ignore_patterns("a", "b"))
        twin = type(work)(root)  # the same pipeline, on the copied store and outputs
        runtime = rf.Runtime(twin.flow(events), twin.store, config)
        (recovery,) = runtime.open()
        repaired = (twin.out.read_bytes(), twin.dead_letters())
        summary = runtime.run()
        outcomes.append(((recovery.seq, recovery.positions, recovery.state_keys,
                          recovery.discarded_seqs), repaired, summary.records_in,
                         twin.out.read_bytes()))
        assert twin.output("jsonl") == events.running_totals()
    assert outcomes[0] == outcomes[1]
