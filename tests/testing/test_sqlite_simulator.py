"""The seeded simulator on the real embedded backends: SQLiteStore, JSON-lines and table sinks."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from resumeflow import Flow, SQLiteStore
from resumeflow.checkpoint import GENESIS_DIGEST, decode_record, make_record
from resumeflow.errors import ConfigurationError, CorruptCheckpointError
from resumeflow.runtime import CRASH_POINTS
from resumeflow.sinks import JsonLinesSink, SinkContext, SinkWriter
from resumeflow.testing import MemorySource, SimReport, SQLiteBackend, _sqlite_sim, simulate
from resumeflow.testing._cli import main, run_many, run_seed
from resumeflow.testing._sqlite_sim import SINK_KINDS
from resumeflow.testing._workload import workload

from .conftest import sqlite_corrupt_latest

SCHEDULES = 5000
"""Real-backend schedules of the main test: about a minute on two idle cores (tmpfs)."""


def test_sqlite_schedules_keep_every_invariant() -> None:
    """5,000 seeded fault schedules on SQLiteStore with JSON-lines and SQLite-table sinks
    (two processes) break no invariant against the memory reference."""
    report = run_many(SCHEDULES, seed=0, backend="sqlite", jobs=2)
    print(f"\nsqlite simulator: {report.summary()}")
    assert report.schedules == SCHEDULES
    assert report.totals["crashes"] > SCHEDULES and report.totals["takeovers"] > 200
    assert report.totals["fenced"] > 100 and report.duplicates > 0
    report.check()


@pytest.mark.parametrize("guarantee", ["exactly-once", "at-least-once"])
@pytest.mark.parametrize("sink", SINK_KINDS)
def test_every_sink_runs_under_each_guarantee(sink: str, guarantee: str) -> None:
    """Each real sink, under each guarantee, keeps every invariant through 40 schedules."""
    backend = SQLiteBackend(sink=sink)  # type: ignore[arg-type]
    report = SimReport()
    on_sink = 0
    for seed in range(40):
        result = run_seed(seed, guarantee=guarantee, backend=backend)
        on_sink += f"(sink {sink}," in result.backend  # else a flow not keyed, on jsonl
        report.add(result)
    assert on_sink >= 25 and report.totals["crashes"] > 0 and report.totals["commits"] > 0
    report.check()


@pytest.mark.slow
def test_sqlite_fault_plans_reach_every_fault_kind() -> None:
    """On the real backends the plans inject every fault: each crash point, takeovers and
    fenced zombies, torn records (at commit and at rest after a crash) and their fallback,
    failed writes, sink failures."""
    events: list[str] = []
    # 600 seeds: with pipelined commits in the schedules, a takeover at
    # commit.after_finalize comes about once in 150 seeds.
    for seed in range(600):
        run_seed(seed, trace_to=events.append, backend="sqlite")
    text = "\n".join(events)
    for point in CRASH_POINTS:
        assert f"crash at {point}" in text, point
    for point in sorted(_sqlite_sim.SQLiteSchedule.takeover_points):
        assert re.search(rf"takeover of \S+ at {re.escape(point)}", text), point
    for kind in ("crash in user code", "transient error in user code", "store write fails",
                 "torn commit record", "tore commit record", "sink pre-commit fails",
                 "sink finalize fails", "sink finalize fails during recovery",
                 "fenced (zombie)", "abandoned", "killed compacting", "liveness phase"):
        assert kind in text, kind
    assert re.search(r"discarded \[\d", text), "no fallback from a torn record"
    assert re.search(r"torn commit record of \S+ after a crash", text)
    assert "resumeflow-sim-" not in text, "a temporary path leaked into the events"


def test_a_seed_replays_the_same_schedule_whatever_the_compactor_does() -> None:
    """A seed run twice with the background compactor, and once compacting every commit in
    the committing thread, gives the same events, counts, replays and duplicates."""
    for seed in (9, 33, 224, 373, 590, 1060, 1378, 1587, 2718):
        runs = [run_seed(seed, backend="sqlite"), run_seed(seed, backend="sqlite"),
                run_seed(seed, backend=SQLiteBackend(compaction="eager"))]
        assert {r.violations == [] for r in runs} == {True}, runs[0].message()
        assert len({(r.fingerprint, str(r.counts), str(r.replays), r.duplicates)
                    for r in runs}) == 1, seed


def test_a_record_with_an_invalid_utf8_byte_is_corrupt(tmp_path: Path) -> None:
    """A newest record with an invalid UTF-8 byte in a string is corruption: open falls back
    to the record before (the SQLite simulator, seed 14, found it raising instead)."""
    path = tmp_path / "store.db"
    store = SQLiteStore(path, keep_checkpoints=3)
    opened = store.open_task("t")
    digest = GENESIS_DIGEST
    for seq in (1, 2):
        record = make_record(task="t", epoch=opened.epoch, seq=seq, positions={"0": seq},
                             sink_txn={}, inflight=[], created_at=0.0, stats={},
                             prev_digest=digest)
        store.commit(opened, record, [(b"k", b"%d" % seq)], [], [])
        digest = record.digest
    store.close()
    db = sqlite3.connect(path)
    raw = bytes(db.execute("SELECT record FROM commits WHERE seq = 2").fetchone()[0])
    at = raw.index(b'"task":"t"') + len(b'"task":"')
    torn = raw[:at] + b"\xff" + raw[at + 1:]
    db.execute("UPDATE commits SET record = ? WHERE seq = 2", (torn,))
    db.commit()
    db.close()
    with pytest.raises(CorruptCheckpointError, match="cannot be decoded"):
        decode_record(torn)
    reopened = SQLiteStore(path, keep_checkpoints=3)
    try:
        again = reopened.open_task("t")
        assert again.record is not None and again.record.seq == 1
        assert again.discarded_seqs == (2,)
        assert reopened.load_state(again.task_no, b"k") == b"1"
    finally:
        reopened.close()


@pytest.mark.parametrize("after", ["fallback", "rewind"])
def test_going_back_across_a_compaction_of_no_keys(tmp_path: Path, after: str) -> None:
    """Checkpoints that changed no state, once compacted, can still be fallen back or rewound
    across (the SQLite simulator, seed 224, found open failing an invariant forever)."""
    path = tmp_path / "store.db"
    store = SQLiteStore(path, keep_checkpoints=3)
    opened = store.open_task("t")
    digest = GENESIS_DIGEST
    for seq in (1, 2, 3):
        record = make_record(task="t", epoch=opened.epoch, seq=seq, positions={"0": seq},
                             sink_txn={}, inflight=[], created_at=0.0, stats={},
                             prev_digest=digest)
        store.commit(opened, record, [(b"k", b"1")] if seq == 1 else [], [], [])
        digest = record.digest
        if seq != 2:
            assert store.compact() == 1  # runs (0, 1] with key k, then (1, 3] with none
    if after == "fallback":
        sqlite_corrupt_latest(store, "t")
    else:
        store.rewind("t", 2)
    store.close()
    reopened = SQLiteStore(path, keep_checkpoints=3)
    try:
        again = reopened.open_task("t")
        assert again.record is not None and again.record.seq == 2
        assert again.discarded_seqs == ((3,) if after == "fallback" else ())
        assert reopened.load_state(again.task_no, b"k") == b"1"
    finally:
        reopened.close()


def test_at_least_once_records_name_the_bytes_written_after_a_zombie(tmp_path: Path) -> None:
    """Under at-least-once, a commit's JSON-lines meta names the bytes its writer appended,
    even after a paused old owner appended to the file (the SQLite simulator, seed 1587,
    found records naming the zombie's line instead)."""
    sink = JsonLinesSink(tmp_path / "out.jsonl")

    def writer(epoch: int) -> SinkWriter:
        ctx = SinkContext(sink_id="out", task="t", partition="0", partitions=1, keyed=False,
                          guarantee="at-least-once", store_path=None, epoch=epoch)
        opened = sink.open(ctx)
        opened.recover(None, [])
        return opened

    zombie, owner = writer(1), writer(2)
    zombie.buffer.append({"from": "zombie"})
    zombie.precommit(5)
    owner.buffer.append({"from": "owner"})
    meta = owner.precommit(5).meta
    assert meta is not None
    data = (tmp_path / "out.jsonl").read_bytes()
    assert json.loads(data[meta["base"]:meta["end"]]) == {"from": "owner"}
    zombie.close()
    owner.close()


def _orders(source: MemorySource, sink: Any) -> Flow:
    flow = Flow("orders")
    (flow.source(source)
         .filter(lambda e: e["amount"] > 0)
         .key_by(lambda e: e["customer"])
         .reduce(lambda total, e: total + e["amount"], initial=0)
         .sink(sink))
    return flow


def _doubled(source: MemorySource, sink: Any) -> Flow:
    flow = Flow("doubled")
    flow.source(source).map(lambda e: {"twice": e["amount"] * 2}).sink(sink)
    return flow


_ORDERS: dict[str, list[Any]] = {
    "0": [{"customer": "abc"[i % 3], "amount": i % 7 - 1} for i in range(40)],
    "1": [{"customer": "xy"[i % 2], "amount": i} for i in range(25)],
}


def test_simulate_checks_a_user_pipeline_on_sqlite() -> None:
    """simulate(backend="sqlite") runs a user's flow on the real backends without violation;
    a table sink for a flow that is not keyed is refused at once."""
    report = simulate(_orders, _ORDERS, schedules=120, seed=500, backend="sqlite")
    assert report.ok and report.schedules == 120 and report.totals["crashes"] > 0
    unkeyed = simulate(_doubled, _ORDERS["1"], schedules=30, seed=7, backend="sqlite")
    assert unkeyed.ok and unkeyed.totals["commits"] > 0
    with pytest.raises(ConfigurationError, match="not keyed"):
        simulate(_doubled, _ORDERS["1"], schedules=1, backend=SQLiteBackend(sink="table"))


def test_cli_runs_both_backends_and_replays_a_sqlite_seed(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`run --backend both` reports each backend; `replay --backend sqlite` traces one seed
    with the fingerprint a run of that seed gives."""
    assert main(["run", "--backend", "both", "--schedules", "30", "--seed", "40"]) == 0
    out = capsys.readouterr().out
    assert "[memory] 30 schedules, 0 with violations" in out
    assert "[sqlite] 30 schedules, 0 with violations" in out
    assert main(["replay", "--seed", "373", "--backend", "sqlite"]) == 0
    out = capsys.readouterr().out
    assert "backend sqlite (sink jsonl, compaction thread)" in out
    assert "liveness phase" in out and "no violations" in out
    assert f"fingerprint {run_seed(373, backend='sqlite').fingerprint}" in out


def _kinds(report: SimReport) -> set[str]:
    return {v.kind for failure in report.failures for v in failure.violations}


_, BUILD, INPUTS = workload(12)


class _NoFencing(_sqlite_sim._SimStore):
    """Accepts a commit from any epoch: a zombie's commit lands."""

    def _check_owner(self, db: Any, opened: Any, record: Any) -> None:
        db.execute("UPDATE tasks SET epoch = ? WHERE task_no = ?",
                   (record.epoch, opened.task_no))
        db.execute("DELETE FROM commits WHERE task_no = ? AND seq >= ?",
                   (opened.task_no, record.seq))
        db.execute("UPDATE tasks SET last_seq = ? WHERE task_no = ?",
                   (record.seq - 1, opened.task_no))


def test_the_sqlite_checker_catches_a_store_without_fencing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A SQLite store that lets zombies commit is reported as stale_epoch_commit."""
    monkeypatch.setattr(_sqlite_sim, "_SimStore", _NoFencing)
    report = simulate(BUILD, INPUTS, schedules=200, seed=0, raise_on_violation=False,
                      backend="sqlite")
    assert "stale_epoch_commit" in _kinds(report)


class _AppendsAgain(JsonLinesSink):
    """Finalize appends even when the file already holds the checkpoint: not idempotent."""

    def open(self, ctx: SinkContext) -> Any:
        writer = super().open(ctx)

        def append(seq: int, meta: dict[str, Any], payload: Any) -> None:
            writer._file.seek(0, os.SEEK_END)
            writer._file.write(payload())
            writer._file.flush()

        writer._append = append  # type: ignore[method-assign]
        return writer


def test_the_sqlite_checker_catches_a_file_sink_whose_finalize_is_not_idempotent(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A JSON-lines sink that appends a checkpoint again when finalize is redone (by
    recovery or by a zombie) is caught: as duplicated output, or as recovery refusing a file
    longer than its checkpoint says (the task then stalls)."""
    monkeypatch.setattr(_sqlite_sim, "JsonLinesSink", _AppendsAgain)
    report = simulate(BUILD, INPUTS, schedules=150, seed=0, guarantee="exactly-once",
                      raise_on_violation=False, backend=SQLiteBackend(sink="jsonl"))
    kinds = _kinds(report)
    assert report.failures
    assert "duplicated" in kinds or {"error", "stalled"} <= kinds
