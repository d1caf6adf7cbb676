"""SQLiteStore: epoch fencing, the atomic commit point, fallback from damage, pruning, rewind."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from resumeflow._faults import installed
from resumeflow.checkpoint import (
    GENESIS_DIGEST,
    SCHEMA_VERSION,
    CommitRecord,
    OpenedTask,
    SQLiteStore,
    StagedEntry,
    make_record,
)
from resumeflow.checkpoint import _sqlite as sqlite_module
from resumeflow.checkpoint._sqlite_state import (
    COMPACT_AFTER,
    COMPACT_AFTER_MAX,
    MAX_RUN_DELTAS,
    MAX_TAIL_DELTAS,
    PRUNE_TURN_BYTES,
    LogKeeper,
    _compactor_connection,
    _turns,
    compact,
    compact_after,
)
from resumeflow.errors import (
    ClosedError,
    ConfigurationError,
    FencedError,
    InternalError,
    UnavailableError,
)

TASK = "orders:events.jsonl:0"


class Writer:
    """Commits checkpoints of one task straight through the store API."""

    def __init__(self, store: SQLiteStore, task: str = TASK) -> None:
        self.store = store
        self.opened: OpenedTask = store.open_task(task)
        record = self.opened.record
        self.seq = record.seq if record else 0
        self.digest = record.digest if record else GENESIS_DIGEST

    def record(self, seq: int | None = None) -> CommitRecord:
        seq = self.seq + 1 if seq is None else seq
        return make_record(task=self.opened.task, epoch=self.opened.epoch, seq=seq,
                           positions={"0": position(seq)}, sink_txn={}, inflight=[],
                           created_at=time.time(), stats={}, prev_digest=self.digest)

    def commit(self, delta: Iterable[tuple[bytes, bytes | None]] = (),
               staged: Iterable[StagedEntry] = (), release: Iterable[tuple[str, int]] = (),
               seq: int | None = None) -> CommitRecord:
        record = self.record(seq)
        self.store.commit(self.opened, record, list(delta), list(staged), list(release))
        self.seq, self.digest = record.seq, record.digest
        return record


def position(seq: int) -> int:
    return seq * 1000 + 7


def staged(seq: int, sink: str = "out") -> StagedEntry:
    return StagedEntry(sink=sink, seq=seq, meta={"n": seq}, payload=b"payload %d\n" % seq)


def rows(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def edit_record(path: Path, seq: int, edit: Any) -> None:
    """Rewrite the stored bytes of commit record ``seq`` with ``edit(raw) -> raw``."""
    db = sqlite3.connect(path)
    try:
        (raw,) = db.execute("SELECT record FROM commits WHERE seq = ?", (seq,)).fetchone()
        db.execute("UPDATE commits SET record = ? WHERE seq = ?", (edit(bytes(raw)), seq))
        db.commit()
    finally:
        db.close()


def snapshot(store: SQLiteStore, task_no: int, keys: Iterable[bytes]) -> dict[bytes, bytes]:
    """Committed value of every key that has one."""
    out = {}
    for key in keys:
        value = store.load_state(task_no, key)
        if value is not None:
            out[key] = value
    return out


# -- epochs and fencing -------------------------------------------------------------------


def test_open_task_bumps_the_epoch_every_time(tmp_path: Path) -> None:
    """Each ``open_task`` gives a new, higher epoch, also across store reopenings."""
    store = SQLiteStore(tmp_path / "s.db")
    first = store.open_task(TASK)
    second = store.open_task(TASK)
    store.close()
    store = SQLiteStore(tmp_path / "s.db")
    third = store.open_task(TASK)
    store.close()
    assert (first.epoch, second.epoch, third.epoch) == (1, 2, 3)
    assert first.task_no == second.task_no == third.task_no
    assert first.record is None


def test_stale_epoch_commit_is_refused_and_lands_nothing(store: SQLiteStore) -> None:
    """A commit carrying an older epoch raises FencedError with advice; nothing of it lands."""
    old = Writer(store)
    old.commit(delta=[(b"k", b"1")])
    new = Writer(store)
    assert new.opened.epoch == old.opened.epoch + 1
    with pytest.raises(FencedError) as info:
        old.commit(delta=[(b"k", b"2"), (b"j", b"9")], staged=[staged(2)])
    message = str(info.value)
    assert f"owned by epoch {new.opened.epoch}" in message
    assert f"holds epoch {old.opened.epoch}" in message
    assert "Stop this worker" in message
    assert [seq for seq, _ in store.records(TASK)] == [1]
    assert store.load_state(old.opened.task_no, b"k") == b"1"
    assert store.load_state(old.opened.task_no, b"j") is None
    assert store.open_task(TASK).staged == ()


def test_newer_epoch_commits_after_fencing(store: SQLiteStore) -> None:
    """The worker that took the task last continues the chain where the store left it."""
    old = Writer(store)
    old.commit()
    new = Writer(store)
    record = new.commit()
    assert record.seq == 2 and record.epoch == new.opened.epoch
    with pytest.raises(FencedError):
        old.commit(seq=3)


def test_seq_must_follow_the_last_commit(store: SQLiteStore) -> None:
    """A commit whose seq does not follow the task's last seq is refused as a bug."""
    w = Writer(store)
    with pytest.raises(InternalError, match="commits seq 2 after seq 0"):
        w.commit(seq=2)
    w.commit()
    with pytest.raises(InternalError, match="commits seq 1 after seq 1"):
        w.commit(seq=1)
    assert [seq for seq, _ in store.records(TASK)] == [1]


def test_commit_epoch_must_match_the_opened_task(store: SQLiteStore) -> None:
    """A record whose epoch is not the one the task was opened with is refused before writing."""
    w = Writer(store)
    record = make_record(task=TASK, epoch=w.opened.epoch + 5, seq=1, positions={}, sink_txn={},
                         inflight=[], created_at=0.0, stats={}, prev_digest=GENESIS_DIGEST)
    with pytest.raises(InternalError, match="epoch"):
        store.commit(w.opened, record, [], [], [])
    assert store.records(TASK) == []


# -- the commit point ---------------------------------------------------------------------


class Crash(BaseException):
    """Stands for the process dying at a crash point."""


def test_crash_inside_commit_leaves_nothing(store: SQLiteStore) -> None:
    """A crash just before the store's COMMIT leaves no record, no state and no staging."""
    w = Writer(store)
    w.commit(delta=[(b"a", b"1")])

    def crash(point: str) -> None:
        if point == "store.before_commit":
            raise Crash

    with installed(crash), pytest.raises(Crash):
        w.commit(delta=[(b"a", b"2"), (b"b", b"3")], staged=[staged(2)])
    assert [seq for seq, _ in store.records(TASK)] == [1]
    assert snapshot(store, w.opened.task_no, [b"a", b"b"]) == {b"a": b"1"}
    assert store.open_task(TASK).staged == ()


def test_commit_writes_record_state_and_staging_together(store: SQLiteStore) -> None:
    """After ``commit`` returns, record, state delta and staged output are all readable."""
    w = Writer(store)
    record = w.commit(delta=[(b"a", b"1"), (b"b", None)], staged=[staged(1)])
    opened = store.open_task(TASK)
    assert opened.record == record
    assert opened.staged == (staged(1),)
    assert store.load_state(opened.task_no, b"a") == b"1"
    assert store.load_state(opened.task_no, b"b") is None


def test_release_drops_staged_output_up_to_a_seq(store: SQLiteStore) -> None:
    """Released staging is deleted inside the next commit; unreleased staging is kept."""
    w = Writer(store)
    w.commit(staged=[staged(1), staged(1, sink="dead")])
    w.commit(staged=[staged(2)], release=[("out", 1)])
    opened = store.open_task(TASK)
    assert [(e.sink, e.seq) for e in opened.staged] == [("dead", 1), ("out", 2)]


def _rows_to_open_and_load(path: Path, keys: int) -> tuple[int, int]:
    store = SQLiteStore(path, keep_checkpoints=5)
    w = Writer(store)
    w.commit(delta=[(b"k%d" % i, b"%d" % i) for i in range(keys)])
    for _ in range(6):
        w.commit(delta=[(b"k1", b"x")])
    assert store._compactor.wait_idle()  # the same tail for any state size: 3 deltas
    store.close()
    store = SQLiteStore(path, keep_checkpoints=5)
    opened = store.open_task(TASK)
    assert opened.record is not None and opened.record.seq == 7
    at_open = store.rows_read
    assert store.load_state(opened.task_no, b"k%d" % (keys - 1)) == b"%d" % (keys - 1)
    at_load = store.rows_read - at_open
    store.close()
    return at_open, at_load


def test_open_task_reads_o1_rows_whatever_the_state_size(tmp_path: Path) -> None:
    """Opening a task and loading one key read as many rows for 20,000 keys as for 100."""
    small = _rows_to_open_and_load(tmp_path / "small.db", 100)
    large = _rows_to_open_and_load(tmp_path / "large.db", 20_000)
    assert large == small
    assert large[0] <= 10 and large[1] <= 10


# -- damage -------------------------------------------------------------------------------


def _three_checkpoints(store: SQLiteStore) -> Writer:
    w = Writer(store)
    w.commit(delta=[(b"a", b"1"), (b"b", b"1")], staged=[staged(1)])
    w.commit(delta=[(b"a", b"2")], staged=[staged(2)], release=[("out", 1)])
    w.commit(delta=[(b"a", b"3"), (b"b", None), (b"c", b"3")], staged=[staged(3)])
    return w


def _bump_position(raw: bytes) -> bytes:
    old = b'"0":%d' % position(3)
    assert old in raw
    return raw.replace(old, b'"0":%d' % (position(3) + 1))


def _cut_in_half(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


@pytest.mark.parametrize("damage", [_bump_position, _cut_in_half],
                         ids=["edited", "truncated"])
def test_damaged_newest_record_falls_back_to_the_previous(tmp_path: Path, damage: Any,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """A newest record that fails its digest or decoder is set aside; the one before is used,
    with its exact state, and the newer state versions and staged output are discarded."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path, keep_checkpoints=3)
    w = _three_checkpoints(store)
    task_no = w.opened.task_no
    store.close()
    edit_record(path, 3, damage)

    store = SQLiteStore(path, keep_checkpoints=3)
    opened = store.open_task(TASK)
    assert opened.record is not None and opened.record.seq == 2
    assert opened.record.positions == {"0": position(2)}
    assert opened.discarded_seqs == (3,)
    assert "falling back" in caplog.text
    assert snapshot(store, task_no, [b"a", b"b", b"c"]) == {b"a": b"2", b"b": b"1"}
    assert [e.seq for e in opened.staged] == [2]
    assert rows(path, "SELECT seq FROM quarantine") == [(3,)]
    assert [seq for seq, _ in store.records(TASK)] == [1, 2]

    # The chain continues from the record it fell back to.
    again = Writer(store)
    assert again.seq == 2
    record = again.commit(delta=[(b"c", b"new")])
    assert record.seq == 3 and record.prev_digest == opened.record.digest
    store.close()


def test_two_damaged_records_fall_back_two_steps(tmp_path: Path) -> None:
    """Fallback walks back over every damaged record to the newest one that verifies."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path, keep_checkpoints=3)
    _three_checkpoints(store)
    store.close()
    edit_record(path, 3, _cut_in_half)
    edit_record(path, 2, lambda raw: raw.replace(b'"epoch":1', b'"epoch":7'))
    store = SQLiteStore(path, keep_checkpoints=3)
    opened = store.open_task(TASK)
    assert opened.record is not None and opened.record.seq == 1
    assert opened.discarded_seqs == (3, 2)
    assert snapshot(store, opened.task_no, [b"a", b"b", b"c"]) == {b"a": b"1", b"b": b"1"}
    store.close()


def test_status_reports_a_damaged_newest_record(tmp_path: Path) -> None:
    """``tasks()`` names the error of a damaged newest record instead of misreading it."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    _three_checkpoints(store)
    store.close()
    edit_record(path, 3, _bump_position)
    store = SQLiteStore(path, create=False)
    (status,) = store.tasks()
    store.close()
    assert status.record is None
    assert status.error is not None and "fails its digest" in status.error
    assert status.checkpoints == 3


def test_store_of_a_newer_schema_is_refused_with_advice(tmp_path: Path) -> None:
    """A store written by a newer resumeflow fails at open, saying what to do."""
    path = tmp_path / "s.db"
    SQLiteStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
               (str(SCHEMA_VERSION + 1),))
    db.commit()
    db.close()
    with pytest.raises(ConfigurationError) as info:
        SQLiteStore(path)
    message = str(info.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message
    assert "upgrade resumeflow or use another --store path" in message


def test_a_file_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    """Pointing the store at a file that is not SQLite fails with a ConfigurationError."""
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not a database, just some text " * 100)
    with pytest.raises(ConfigurationError, match="point --store to a resumeflow store"):
        SQLiteStore(path)


def test_missing_store_for_read_only_tools(tmp_path: Path) -> None:
    """``create=False`` on a missing store fails and is not created as a side effect."""
    with pytest.raises(ConfigurationError, match="no store at"):
        SQLiteStore(tmp_path / "nope.db", create=False)
    assert not (tmp_path / "nope.db").exists()


def test_store_directory_must_exist(tmp_path: Path) -> None:
    """A store path in a missing directory fails at start with advice."""
    with pytest.raises(ConfigurationError, match="does not exist"):
        SQLiteStore(tmp_path / "missing" / "s.db")


def test_keep_checkpoints_below_two_is_refused(tmp_path: Path) -> None:
    """Keeping fewer than two checkpoints would make fallback impossible: refused."""
    with pytest.raises(ConfigurationError, match="keep_checkpoints >= 2"):
        SQLiteStore(tmp_path / "s.db", keep_checkpoints=1)


def test_closed_store_raises_closed_error(tmp_path: Path) -> None:
    """A closed store raises ClosedError, and closing twice is safe."""
    store = SQLiteStore(tmp_path / "s.db")
    store.close()
    store.close()
    with pytest.raises(ClosedError):
        store.open_task(TASK)


# -- pruning and rewind -------------------------------------------------------------------

KEYS = [b"k%d" % i for i in range(6)]


def _history(store: SQLiteStore, commits: int) -> tuple[Writer, dict[int, dict[bytes, bytes]]]:
    """Commit a history where keys change, vanish and come back; returns each snapshot."""
    w = Writer(store)
    current: dict[bytes, bytes] = {}
    snapshots: dict[int, dict[bytes, bytes]] = {0: {}}
    for seq in range(1, commits + 1):
        delta: list[tuple[bytes, bytes | None]] = []
        for i, key in enumerate(KEYS):
            if seq % (i + 2) == 0:
                delta.append((key, b"%d@%d" % (i, seq)))
            elif seq % (i + 3) == 1 and key in current:
                delta.append((key, None))
        for key, value in delta:
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
        w.commit(delta=delta)
        snapshots[seq] = dict(current)
    return w, snapshots


def test_pruning_keeps_the_last_k_records_and_their_state(tmp_path: Path) -> None:
    """Only ``keep_checkpoints`` records remain, with exactly the state versions they need."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path, keep_checkpoints=3)
    w, snapshots = _history(store, 12)
    assert [seq for seq, _ in store.records(TASK)] == [10, 11, 12]
    assert snapshot(store, w.opened.task_no, KEYS) == snapshots[12]
    store.close()


@pytest.mark.parametrize("target", [10, 11, 12])
def test_rewind_restores_the_exact_state_of_a_kept_checkpoint(tmp_path: Path,
                                                              target: int) -> None:
    """Rewinding to any kept checkpoint makes it the newest, with exactly its state."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path, keep_checkpoints=3)
    w, snapshots = _history(store, 12)
    store.close()
    copy = tmp_path / "copy.db"
    shutil.copy(path, copy)
    store = SQLiteStore(copy, keep_checkpoints=3)
    record = store.rewind(TASK, target)
    assert record is not None and record.seq == target
    opened = store.open_task(TASK)
    assert opened.record == record
    assert opened.epoch == w.opened.epoch + 2  # the rewind fences, then we opened
    assert snapshot(store, opened.task_no, KEYS) == snapshots[target]
    assert rows(copy, "SELECT from_seq, to_seq FROM rewinds") == [(12, target)]
    store.close()


def test_rewind_to_the_beginning_forgets_everything(tmp_path: Path) -> None:
    """Rewind to seq 0 leaves a task with no checkpoint and no state."""
    store = SQLiteStore(tmp_path / "s.db", keep_checkpoints=3)
    _history(store, 5)
    assert store.rewind(TASK, 0) is None
    opened = store.open_task(TASK)
    assert opened.record is None
    assert snapshot(store, opened.task_no, KEYS) == {}
    store.close()


def test_rewind_refuses_unknown_tasks_and_pruned_checkpoints(tmp_path: Path) -> None:
    """Rewind names what to pick when the task or checkpoint does not exist."""
    store = SQLiteStore(tmp_path / "s.db", keep_checkpoints=3)
    _history(store, 6)
    with pytest.raises(ConfigurationError, match="checkpoints list"):
        store.rewind(TASK, 2)
    with pytest.raises(ConfigurationError, match="no task"):
        store.rewind("nope:x:0", 1)
    assert [seq for seq, _ in store.records(TASK)] == [4, 5, 6]
    store.close()


def test_compaction_and_rewind_of_more_keys_than_one_statement_holds(tmp_path: Path) -> None:
    """Compaction runs wider than one multi-row statement (with deletions and empty values)
    land every key in the table, and rewinding across them restores each value exactly."""
    wide = [b"w%04d" % i for i in range(1_300)]
    path = tmp_path / "s.db"
    store = SQLiteStore(path, keep_checkpoints=4)
    w = Writer(store)
    first = {k: b"" if i % 7 == 0 else b"a%d" % i for i, k in enumerate(wide)}
    w.commit(delta=list(first.items()))
    assert store.compact(TASK) == 1
    second: list[tuple[bytes, bytes | None]] = [
        (k, None if i % 3 == 0 else b"b%d" % i) for i, k in enumerate(wide)]
    w.commit(delta=second)
    assert store.compact(TASK) == 1
    assert rows(path, "SELECT count(*) FROM deltas d JOIN tasks t ON t.task_no = d.task_no "
                      "WHERE d.seq > t.compacted_seq") == [(0,)]
    after = {k: v for k, v in second if v is not None}
    assert snapshot(store, w.opened.task_no, wide) == after
    assert rows(path, "SELECT count(*) FROM state") == [(len(after),)]
    store.rewind(TASK, 1)
    opened = store.open_task(TASK)
    assert snapshot(store, opened.task_no, wide) == first
    store.close()


def test_the_compactor_copies_the_write_ahead_log_outside_the_commits(tmp_path: Path) -> None:
    """A checkpoint of the write-ahead log asked of the compactor copies all of it into the
    database file, and the log stays short under a stream of commits."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    w = Writer(store)
    for seq in range(1, 201):
        w.commit(delta=[(b"k%05d" % i, b"v%d-%d" % (i, seq)) for i in range(500)])
    store._compactor.checkpoint_wal()
    assert store._compactor.wait_idle()  # the runs asked for, and the checkpoint, are done
    wal = path.with_name(path.name + "-wal").stat().st_size
    assert wal < 8 * 2**20, f"write-ahead log of {wal:,} bytes after 200 commits"
    alone = tmp_path / "alone.db"  # the database file without its log
    shutil.copy(path, alone)
    sql = "SELECT last_seq, compacted_seq FROM tasks"
    assert rows(alone, sql) == rows(path, sql) and rows(path, sql)[0][1] > 0
    snap = snapshot(store, w.opened.task_no, [b"k%05d" % i for i in range(500)])
    assert snap == {b"k%05d" % i: b"v%d-200" % i for i in range(500)}
    store.close()


def test_compact_after_grows_with_the_overlap_of_deltas() -> None:
    """Without a measured run, and where deltas change different keys, a run starts every
    COMPACT_AFTER deltas; the more often a run found each key, the longer the tail may grow,
    up to COMPACT_AFTER_MAX."""
    assert compact_after(None) == compact_after(1.0) == compact_after(0.5) == COMPACT_AFTER
    assert compact_after(2.0) == 2 * COMPACT_AFTER
    assert compact_after(1e6) == COMPACT_AFTER_MAX


@pytest.mark.parametrize("same_keys", [True, False])
def test_the_compactor_lets_the_tail_grow_where_deltas_change_the_same_keys(
        tmp_path: Path, same_keys: bool) -> None:
    """After a run whose deltas all changed the same keys, the next run starts only once
    COMPACT_AFTER_MAX deltas are uncompacted; where they changed different keys, it starts
    after COMPACT_AFTER again. Reads are exact either way."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    w = Writer(store)

    def commit(seq: int) -> None:
        keys = range(100) if same_keys else range(seq * 100, seq * 100 + 100)
        w.commit(delta=[(b"k%05d" % i, b"v%d" % seq) for i in keys])

    for seq in range(1, COMPACT_AFTER + 1):
        commit(seq)
    assert store._compactor.wait_idle()  # the run asked for is done
    compacted = "SELECT compacted_seq FROM tasks"
    assert rows(path, compacted) == [(COMPACT_AFTER,)]
    expected = COMPACT_AFTER_MAX if same_keys else COMPACT_AFTER
    assert store._compactor.compact_after(w.opened.task_no) == expected
    for seq in range(COMPACT_AFTER + 1, COMPACT_AFTER + expected):
        commit(seq)
    assert store._compactor.wait_idle()
    assert rows(path, compacted) == [(COMPACT_AFTER,)]  # one delta short of the next run
    last = COMPACT_AFTER + expected
    commit(last)
    assert store._compactor.wait_idle()
    assert rows(path, compacted) == [(last,)]
    keys = range(100) if same_keys else range(last * 100, last * 100 + 100)
    assert snapshot(store, w.opened.task_no, [b"k%05d" % i for i in keys]) == {
        b"k%05d" % i: b"v%d" % last for i in keys}
    store.close()


def _no_background_runs(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's compactor is asked for nothing (the test runs ``compact`` itself)."""
    monkeypatch.setattr(store._compactor, "request", lambda *args: None)


def test_a_long_tail_is_compacted_in_runs_of_at_most_max_run_deltas(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run merges at most MAX_RUN_DELTAS deltas and moves compacted_seq to its end, so a
    long tail shrinks run by run; ``SQLiteStore.compact`` runs until none is left, and reads
    are exact throughout."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path, compactor="thread")
    _no_background_runs(store, monkeypatch)
    w = Writer(store)
    commits = MAX_TAIL_DELTAS - 2
    assert commits > MAX_RUN_DELTAS
    for seq in range(1, commits + 1):
        w.commit(delta=[(b"k%03d" % (seq % 7), b"v%d" % seq), (b"s%03d" % seq, b"%d" % seq)])
    expected = {b"k%03d" % (seq % 7): b"v%d" % seq for seq in range(1, commits + 1)}
    expected |= {b"s%03d" % seq: b"%d" % seq for seq in range(1, commits + 1)}
    with store._lock:
        assert compact(store.connection, w.opened.task_no, w.opened.epoch, store._recent)
    assert rows(path, "SELECT compacted_seq FROM tasks") == [(MAX_RUN_DELTAS,)]
    assert snapshot(store, w.opened.task_no, expected) == expected
    assert store.compact() == 1  # the rest, in one more run
    assert rows(path, "SELECT compacted_seq FROM tasks") == [(commits,)]
    assert snapshot(store, w.opened.task_no, expected) == expected
    store.close()


def test_the_history_is_pruned_after_the_merge_of_a_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run first merges its deltas and moves compacted_seq, then drops the history no kept
    checkpoint needs (the undo of an older run), so that dropping a large history never
    delays the tail's shrinking."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path, keep_checkpoints=2, compactor="thread")
    _no_background_runs(store, monkeypatch)
    w = Writer(store)
    for seq in range(1, 5):
        w.commit(delta=[(b"k%03d" % i, b"v%d" % seq) for i in range(100)])
    assert store.compact() == 1  # its undo images: to_seq 4
    for seq in range(5, 9):
        w.commit(delta=[(b"k%03d" % i, b"v%d" % seq) for i in range(100)])
    db = store.connection
    seen: list[tuple[int, int]] = []

    def after_chunk() -> None:
        seen.append(db.execute("SELECT (SELECT compacted_seq FROM tasks), "
                               "(SELECT count(*) FROM undo WHERE to_seq = 4)").fetchone())

    with store._lock:
        assert compact(db, w.opened.task_no, w.opened.epoch, store._recent,
                       chunk_keys=32, after_chunk=after_chunk)
    assert seen[0] == (4, 1)  # after the first chunk: the old run's undo is still there
    pruned = [compacted for compacted, old in seen if old == 0]
    assert pruned and set(pruned) == {8}  # dropped only once compacted_seq had moved
    assert seen[-1] == (8, 0)
    assert snapshot(store, w.opened.task_no, [b"k%03d" % i for i in range(100)]) == {
        b"k%03d" % i: b"v8" for i in range(100)}
    store.close()


def test_pruning_deletes_history_in_turns_of_about_prune_turn_bytes() -> None:
    """Turns are cut by the size of the blobs they delete, not by a count of rows: many
    small rows go in one turn, a row larger than a turn goes alone."""
    small = [(1, i, 1000) for i in range(600)]
    turns = list(_turns(small))
    per_turn = -(-PRUNE_TURN_BYTES // 1000)
    assert [len(t) for t in turns] == [per_turn, per_turn, 600 - 2 * per_turn]
    assert [k for t in turns for k in t] == [(1, i) for i in range(600)]
    big = [(2, 0, PRUNE_TURN_BYTES * 3), (2, 1, 10), (2, 2, 10)]
    assert list(_turns(big)) == [[(2, 0)], [(2, 1), (2, 2)]]
    assert list(_turns([])) == []


def _tail_of_many_pages(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[SQLiteStore,
                                                                             Writer]:
    store = SQLiteStore(path, compactor="thread")
    _no_background_runs(store, monkeypatch)
    w = Writer(store)
    for seq in range(1, 9):
        w.commit(delta=[(b"k%06d" % (i * 8 + seq), b"x" * 200) for i in range(500)])
    store.connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return store, w


def test_a_log_keeper_keeps_the_write_ahead_log_short_during_a_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpointing the log every few chunks of a run lets it start again from its
    beginning: the log a run leaves is a fraction of the one the same run leaves without
    (which the store's commits would otherwise copy themselves past the backstop)."""
    sizes: dict[bool, int] = {}
    for keep in (False, True):
        path = tmp_path / f"{keep}.db"
        store, w = _tail_of_many_pages(path, monkeypatch)
        db = _compactor_connection(path)
        keeper = LogKeeper(db, every=2) if keep else None
        try:
            assert compact(db, w.opened.task_no, w.opened.epoch, store._recent,
                           chunk_keys=64, after_chunk=keeper)
        finally:
            db.close()
        sizes[keep] = Path(f"{path}-wal").stat().st_size
        if keeper is not None:
            assert keeper.checkpoints == 4000 // 64 // 2
        keys = [b"k%06d" % (i * 8 + seq) for i in range(0, 500, 50) for seq in range(1, 9)]
        assert snapshot(store, w.opened.task_no, keys) == {k: b"x" * 200 for k in keys}
        store.close()
    assert sizes[True] * 4 < sizes[False], sizes


def test_released_staged_output_is_not_zero_filled_in_the_log(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's connections delete with ``secure_delete=FAST``: releasing 1 MB of staged
    output writes a few pages to the write-ahead log, not the megabyte of zeros Debian's
    default (``secure_delete`` on) wrote over the freed pages."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path, compactor="thread")
    _no_background_runs(store, monkeypatch)
    assert store.connection.execute("PRAGMA secure_delete").fetchone() == (2,)  # FAST
    db = _compactor_connection(path)
    assert db.execute("PRAGMA secure_delete").fetchone() == (2,)
    db.close()
    w = Writer(store)
    big = StagedEntry(sink="out", seq=1, meta={}, payload=b"y" * 2**20)
    w.commit(staged=[big])
    wal = Path(f"{path}-wal")
    before = wal.stat().st_size
    w.commit(release=[("out", 1)])
    assert wal.stat().st_size - before < 64 * 1024
    assert rows(path, "SELECT count(*) FROM staged") == [(0,)]
    store.close()


@pytest.mark.parametrize("compactor", ["process", "thread"])
def test_close_ends_the_run_in_progress_and_starts_no_queued_one(tmp_path: Path,
                                                                 compactor: str) -> None:
    """Closing the store lets the compactor finish the run it is doing (its task is
    compacted) but start none of the requests still queued (that task keeps its tail, read
    exactly by the next store, whose compactor takes it)."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path, compactor=compactor)
    first, second = Writer(store, "first:0"), Writer(store, "second:0")
    first.commit(delta=[(b"a%d" % i, b"1") for i in range(300)])
    second.commit(delta=[(b"b%d" % i, b"2") for i in range(300)])
    runner = store._compactor
    hold = sqlite3.connect(path, isolation_level=None)
    if compactor == "process":
        hold.execute("BEGIN IMMEDIATE")  # the child's first chunk waits for SQLite's lock
    else:
        store._lock.acquire()  # the thread's turns are the store's lock
    try:
        runner.request(first.opened.task_no, first.opened.epoch)
        deadline = time.monotonic() + 30
        while first.opened.task_no in runner._pending:  # started: now blocked on the lock
            assert time.monotonic() < deadline, "the compactor never started the first run"
            time.sleep(0.01)
        runner.request(second.opened.task_no, second.opened.epoch)
        closing = threading.Thread(target=store.close)
        closing.start()
        time.sleep(0.5)  # the close has begun: its compactor knows it is to stop
        assert closing.is_alive(), "close did not wait for the run in progress"
    finally:
        if compactor == "process":
            hold.execute("ROLLBACK")
        else:
            store._lock.release()
        hold.close()
    closing.join(timeout=60)
    assert not closing.is_alive()
    sql = "SELECT task, compacted_seq FROM tasks ORDER BY task"
    assert rows(path, sql) == [("first:0", 1), ("second:0", 0)]
    store = SQLiteStore(path, compactor=compactor)
    again = Writer(store, "second:0")
    assert snapshot(store, again.opened.task_no, [b"b0", b"b299"]) == {b"b0": b"2",
                                                                        b"b299": b"2"}
    store._compactor.request(again.opened.task_no, again.opened.epoch)
    assert store._compactor.wait_idle()
    assert rows(path, sql) == [("first:0", 1), ("second:0", 1)]
    store.close()


def test_a_commit_takes_the_lock_soon_after_the_compactor_gives_it_up(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit that finds the lock held by the compactor process (which says so) lands soon
    after the compactor gives it up: 34 ms of holding, where SQLite's own busy sleeps (1, 2,
    5, 10, 15, 20 ms) would try again only at 53 ms."""
    w = Writer(store)
    held = [True]
    monkeypatch.setattr(store._compactor, "writing", lambda: held[0])
    other = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")

    def give_up() -> None:
        time.sleep(0.034)
        other.execute("COMMIT")
        held[0] = False

    thread = threading.Thread(target=give_up)
    thread.start()
    began = time.monotonic()
    w.commit([(b"k", b"1")])
    waited = time.monotonic() - began
    thread.join()
    other.close()
    assert 0.030 <= waited < 0.050
    assert rows(store.path, "SELECT last_seq FROM tasks") == [(1,)]


def test_a_hold_the_compactor_never_gave_up_delays_a_commit_a_little_only(
        store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hold flag a killed compactor left set delays a commit by ``HELD_POLL_MAX_S`` at
    most: it then asks SQLite, which finds the lock free."""
    w = Writer(store)
    monkeypatch.setattr(store._compactor, "writing", lambda: True)
    monkeypatch.setattr(sqlite_module, "HELD_POLL_MAX_S", 0.02)
    began = time.monotonic()
    w.commit([(b"k", b"1")])
    assert 0.02 <= time.monotonic() - began < 0.5
    assert rows(store.path, "SELECT last_seq FROM tasks") == [(1,)]


def test_a_commit_gives_up_after_the_busy_timeout_with_advice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write lock another process holds past the busy timeout makes the commit fail as
    unavailable (the runtime then restarts the task), saying what to do, and lands
    nothing."""
    monkeypatch.setattr(sqlite_module, "BUSY_TIMEOUT_S", 0.05)
    store = SQLiteStore(tmp_path / "s.db")
    try:
        w = Writer(store)
        other = sqlite3.connect(store.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(UnavailableError,
                           match=r"locked or unavailable.*stop the other process"):
            w.commit([(b"k", b"1")])
        other.execute("COMMIT")
        other.close()
        assert rows(store.path, "SELECT last_seq FROM tasks") == [(0,)]
        w.commit([(b"k", b"1")])
        assert rows(store.path, "SELECT last_seq FROM tasks") == [(1,)]
    finally:
        store.close()
