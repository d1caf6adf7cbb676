"""The seeded simulator on the real embedded backends: SQLiteStore, JSON-lines and table sinks."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from resumeflow import SQLiteStore
from resumeflow.checkpoint import GENESIS_DIGEST, decode_record, make_record
from resumeflow.errors import CorruptCheckpointError
from resumeflow.sinks import JsonLinesSink, SinkContext, SinkWriter

from .conftest import sqlite_corrupt_latest


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
