"""Property tests over arbitrary inputs and fault plans (hypothesis)."""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from resumeflow import Flow, SQLiteStore
from resumeflow.checkpoint import GENESIS_DIGEST, CommitRecord, Store, decode_record, make_record
from resumeflow.errors import CorruptCheckpointError
from resumeflow.sinks import JsonLinesSink
from resumeflow.testing import FaultPlan, MemorySink, MemorySource, MemoryStore, Schedule
from resumeflow.testing._check_sink import SinkFixture, _Task

from .conftest import read_jsonl, sqlite_corrupt_latest

EVENTS = st.lists(st.fixed_dictionaries({"k": st.sampled_from("abcd"),
                                         "v": st.integers(-5, 9)}), max_size=30)
INPUTS = st.dictionaries(st.sampled_from(["p0", "p1", "p2"]), EVENTS, min_size=1, max_size=3)
SEEDS = st.integers(0, 2**31)


def _sums(source: MemorySource, sink: MemorySink) -> Flow:
    flow = Flow("sums")
    (flow.source(source)
         .key_by(lambda e: e["k"])
         .reduce(lambda total, e: total + e["v"], initial=0)
         .sink(sink))
    return flow


def _oracle(events: list[dict[str, Any]]) -> list[Any]:
    """Running totals per key, computed by plain Python: what exactly-once must produce."""
    totals: dict[str, int] = {}
    out = []
    for e in events:
        totals[e["k"]] = totals.get(e["k"], 0) + e["v"]
        out.append([e["k"], totals[e["k"]]])
    return out


def _run(inputs: dict[str, list[Any]], seed: int, guarantee: str) -> Schedule:
    schedule = Schedule(_sums, inputs, FaultPlan.draw(seed, guarantee=guarantee))
    assert schedule.run() == []
    return schedule


@settings(max_examples=150, deadline=None)
@given(inputs=INPUTS, seed=SEEDS, guarantee=st.sampled_from(["exactly-once", "at-least-once"]))
def test_committed_positions_never_go_backwards(inputs: dict[str, list[Any]], seed: int,
                                                guarantee: str) -> None:
    """Every commit the store accepts has a seq one above the last and a position no lower."""
    schedule = _run(inputs, seed, guarantee)
    for partition, task in schedule.task_of.items():
        accepted = schedule.observed.accepted(task)
        positions = [r.positions[partition] for r in accepted]
        assert positions == sorted(positions)
        assert [r.seq for r in accepted] == list(range(1, len(accepted) + 1))
        if accepted:
            assert positions[-1] == len(inputs[partition])


@settings(max_examples=150, deadline=None)
@given(inputs=INPUTS, seed=SEEDS)
def test_exactly_once_output_equals_a_plain_python_reference(inputs: dict[str, list[Any]],
                                                              seed: int) -> None:
    """Under exactly-once, each task's output after any fault plan is the straight fold."""
    schedule = _run(inputs, seed, "exactly-once")
    for partition, task in schedule.task_of.items():
        assert schedule.sink.output(task) == _oracle(inputs[partition])


@settings(max_examples=150, deadline=None)
@given(inputs=INPUTS, seed=SEEDS)
def test_at_least_once_duplicates_come_only_from_replay_windows(inputs: dict[str, list[Any]],
                                                                 seed: int) -> None:
    """Under at-least-once, takeovers included, output beyond the reference is exactly the
    output of commits that never landed, each within one replay window, repeating committed
    items only (a fenced zombie's cold reads are refused, so it never folds its records into
    the new owner's state)."""
    plan = FaultPlan.draw(seed, guarantee="at-least-once")
    schedule = Schedule(_sums, inputs, plan)
    assert schedule.run() == []
    bound = schedule.plan.replay_max_events
    for partition, task in schedule.task_of.items():
        landed = {(r.sink_txn["out"]["writer"], r.sink_txn["out"]["seq"])
                  for r in schedule.observed.accepted(task)}
        entries = schedule.sink.entries(task)
        committed = [x for e in entries if (e.writer, e.seq) in landed for x in e.items]
        replayed = [e for e in entries if (e.writer, e.seq) not in landed]
        assert committed == _oracle(inputs[partition])
        assert all(len(e.items) <= bound for e in replayed)
        replayed_items = [x for e in replayed for x in e.items]
        assert {repr(x) for x in replayed_items} <= {repr(x) for x in committed}
        assert len(schedule.sink.output(task)) == len(committed) + len(replayed_items)


def _chain_verifies(store: Store, task: str) -> None:
    records = [decode_record(raw) for _, raw in store.records(task)]
    for older, newer in itertools.pairwise(records):
        assert newer.seq == older.seq + 1 and newer.prev_digest == older.digest


OPS = st.lists(st.sampled_from(["commit", "commit", "commit", "crash", "tear", "reopen"]),
               max_size=25)


def _with_store(kind: str, run: Callable[[Store, Callable[[Store, str], None]], None]) -> None:
    if kind == "memory":
        run(MemoryStore(keep_checkpoints=3), lambda s, t: s.corrupt_latest(t))  # type: ignore[attr-defined]
        return
    with tempfile.TemporaryDirectory() as folder:
        store = SQLiteStore(Path(folder) / "store.db", keep_checkpoints=3)
        try:
            run(store, sqlite_corrupt_latest)
        finally:
            store.close()


@settings(max_examples=100, deadline=None)
@given(ops=OPS, kind=st.sampled_from(["memory", "sqlite"]))
def test_digest_chain_verifies_after_any_commits_and_crashes(ops: list[str], kind: str) -> None:
    """After any sequence of commits, crashes, torn records and reopens, the retained
    records form a verifying digest chain and reopening resumes from its newest record."""
    task = "prop:chain:0"

    def run(store: Store, corrupt: Callable[[Store, str], None]) -> None:
        opened = store.open_task(task)
        last: CommitRecord | None = opened.record
        for op in ops:
            if op == "reopen" or op == "crash":
                opened = store.open_task(task)
                last = opened.record
                continue
            seq = (last.seq if last else 0) + 1
            record = make_record(task=task, epoch=opened.epoch, seq=seq, positions={"0": seq},
                                 sink_txn={}, inflight=[], created_at=0.0, stats={},
                                 prev_digest=last.digest if last else GENESIS_DIGEST)
            store.commit(opened, record, [(b"k", str(seq).encode())], [], [])
            if op == "tear":
                corrupt(store, task)
                opened = store.open_task(task)
                assert opened.discarded_seqs == (seq,)
                last = opened.record
                continue
            last = record
        final = store.open_task(task)
        assert final.record == last
        expected = str(last.seq).encode() if last else None
        assert store.load_state(final.task_no, b"k") == expected
        _chain_verifies(store, task)

    _with_store(kind, run)


@settings(max_examples=60, deadline=None)
@given(batches=st.lists(st.lists(st.integers(0, 99), max_size=6), min_size=1, max_size=5),
       redo=st.lists(st.sampled_from(["finalize", "recover"]), max_size=4),
       sink_kind=st.sampled_from(["memory", "jsonl"]))
def test_finalize_is_idempotent(batches: list[list[int]], redo: list[str],
                                sink_kind: str) -> None:
    """Redoing finalize and recovery any number of times leaves each item once."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "out.jsonl"
        if sink_kind == "memory":
            sink = MemorySink()
            fx = SinkFixture(sink=sink, read=lambda: sink.output() if sink.tasks() else [])
        else:
            fx = SinkFixture(sink=JsonLinesSink(path), read=lambda: read_jsonl(path))
        task = _Task(fx)
        emitted: list[Any] = []
        for n, values in enumerate(batches):
            items = [[f"k{n}-{i}", v] for i, v in enumerate(values)]
            emitted += items
            task.checkpoint([tuple(x) for x in items])
        for action in redo:
            if action == "finalize":
                task.writer.finalize(task.seq)
            else:
                task = _Task(fx)
        assert sorted(map(repr, fx.read())) == sorted(map(repr, emitted))
        task.writer.close()


def test_torn_record_is_never_read() -> None:
    """A torn newest record fails decoding as corruption, never as a misread record."""
    store = MemoryStore()
    opened = store.open_task("t")
    record = make_record(task="t", epoch=opened.epoch, seq=1, positions={}, sink_txn={},
                         inflight=[], created_at=0.0, stats={}, prev_digest=GENESIS_DIGEST)
    store.commit(opened, record, [], [], [])
    store.corrupt_latest("t")
    raw = store.records("t")[0][1]
    try:
        decode_record(raw)
    except CorruptCheckpointError:
        pass
    else:
        raise AssertionError("a torn record decoded")
    assert store.open_task("t").record is None
