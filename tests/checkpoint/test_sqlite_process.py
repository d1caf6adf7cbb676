"""The SQLite store's compactor process: it compacts, lets waiting commits go first, reports
its failures to the store's process, and ends with the store or with the store's process."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from resumeflow.checkpoint import GENESIS_DIGEST, OpenedTask, SQLiteStore, make_record
from resumeflow.checkpoint._sqlite_process import ProcessCompactor
from resumeflow.checkpoint._sqlite_state import (
    COMPACT_AFTER,
    COMPACTOR_NICE,
    Holding,
    WaitingFlag,
    _sync_log,
    compact,
    waiting_path,
)
from resumeflow.errors import ConfigurationError

TASK = "orders:events.jsonl:0"


class Writer:
    """Commits checkpoints of one task straight through the store API."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.opened: OpenedTask = store.open_task(TASK)
        self.seq, self.digest = 0, GENESIS_DIGEST

    def commit(self, delta: list[tuple[bytes, bytes | None]]) -> None:
        record = make_record(task=TASK, epoch=self.opened.epoch, seq=self.seq + 1,
                             positions={"0": self.seq + 1}, sink_txn={}, inflight=[],
                             created_at=time.time(), stats={}, prev_digest=self.digest)
        self.store.commit(self.opened, record, delta, [], [])
        self.seq, self.digest = record.seq, record.digest


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_the_default_store_compacts_in_a_process_of_its_own(tmp_path: Path) -> None:
    """A default store's compactor is a child process: it merges the tail into the table,
    the store's reads stay exact and its tail index is trimmed, and the child has ended
    once the compactor closes."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    compactor = store._compactor
    assert isinstance(compactor, ProcessCompactor)
    w = Writer(store)
    for seq in range(1, COMPACT_AFTER + 1):
        w.commit([(b"k%03d" % i, b"v%d-%d" % (i, seq)) for i in range(300)])
    proc = compactor._proc
    assert proc is not None and proc.pid != os.getpid()
    assert compactor.wait_idle()
    compactor.close()
    assert proc.returncode == 0
    assert rows(path, "SELECT compacted_seq, last_seq FROM tasks") == [(COMPACT_AFTER,) * 2]
    assert compactor.runs == 1 and compactor.failures == 0
    assert store._recent._dirs.get(w.opened.task_no, []) == []
    for i in (0, 150, 299):
        assert store.load_state(w.opened.task_no, b"k%03d" % i) == b"v%d-%d" % (i, COMPACT_AFTER)
    store.close()


def test_the_compactor_process_runs_at_a_lower_cpu_priority_than_the_pipeline(
        tmp_path: Path) -> None:
    """The compactor process is ``COMPACTOR_NICE`` steps nicer than the process whose store
    started it, which keeps its own priority (the pipeline's threads come first on a shared
    core)."""
    store = SQLiteStore(tmp_path / "s.db")
    w = Writer(store)
    for _ in range(COMPACT_AFTER):
        w.commit([(b"k%03d" % i, b"v") for i in range(50)])
    compactor = store._compactor
    assert isinstance(compactor, ProcessCompactor) and compactor.wait_idle()
    proc = compactor._proc
    assert proc is not None
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    assert os.getpriority(os.PRIO_PROCESS, proc.pid) == min(19, mine + COMPACTOR_NICE)
    assert os.getpriority(os.PRIO_PROCESS, 0) == mine
    store.close()


def test_a_failed_compaction_is_logged_by_the_store_and_its_deltas_stay_readable(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run that fails in the child (a damaged delta page) is logged by the store's process
    with the task and the error; nothing is compacted, and the next request is served."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    w = Writer(store)
    w.commit([(b"a", b"1")])
    db = sqlite3.connect(path)
    db.execute("UPDATE deltas SET page = x'c1c1c1'")
    db.commit()
    db.close()
    with caplog.at_level(logging.ERROR, logger="resumeflow.store"):
        store._compactor.request(w.opened.task_no, w.opened.epoch)
        assert store._compactor.wait_idle()
        store._compactor.close()
    assert store._compactor.failures == 1
    assert any(f"task #{w.opened.task_no} failed" in r.getMessage() and "DecodeError"
               in r.getMessage() for r in caplog.records), caplog.text
    assert rows(path, "SELECT compacted_seq FROM tasks") == [(0,)]
    store._compactor.checkpoint_wal()  # a new child serves the next request
    assert store._compactor.wait_idle()
    store._compactor.close()
    store.close()


def test_the_waiting_flag_one_process_sets_is_what_the_other_reads(tmp_path: Path) -> None:
    """The byte a commit sets while it waits for the write lock is read as set by another
    process that maps the same file, and as clear once the commit clears it."""
    path = waiting_path(tmp_path / "s.db")
    probe = "import mmap, os, sys; print(mmap.mmap(os.open(sys.argv[1], os.O_RDWR), 1)[0])"

    def look() -> str:
        return subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True,
                              text=True, check=True).stdout.strip()

    flag = WaitingFlag(path)
    try:
        flag.set()
        assert flag.is_set() and look() == "1"
        flag.clear()
        assert not flag.is_set() and look() == "0"
    finally:
        flag.close()


def test_the_compactor_s_hold_of_the_lock_is_what_the_store_reads(tmp_path: Path) -> None:
    """The hold a compactor process announces around its write transactions (``Holding``)
    is what the store's process reads in ``writing()``, and a hold a killed compactor left
    set is cleared when the next one starts."""
    path = tmp_path / "s.db"
    stale = WaitingFlag(waiting_path(path))
    stale.hold()
    stale.close()
    store = SQLiteStore(path)
    flag = WaitingFlag(waiting_path(path))
    try:
        assert flag.held()
        store._compactor.checkpoint_wal()  # starts the compactor process
        assert not store._compactor.writing() and not flag.held()
        deadline = time.monotonic() + 30
        while -1 in store._compactor._pending:  # until it serves (it clears the hold too)
            assert time.monotonic() < deadline, "the compactor process never started"
            time.sleep(0.005)
        turn = Holding(flag)
        with turn:
            assert store._compactor.writing()
        assert not store._compactor.writing()
        with turn:  # a turn is taken again and again
            assert store._compactor.writing()
        assert not flag.held()
    finally:
        flag.close()
        store.close()


def test_a_commit_waiting_for_the_compactor_process_is_let_in_first(tmp_path: Path) -> None:
    """While the compactor process runs over a long tail, commits keep landing: the child
    yields between chunks to a commit that set the waiting flag, so no commit waits for the
    whole run."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path)
    w = Writer(store)
    for seq in range(1, 21):
        w.commit([(b"k%05d" % (seq * 10_000 + i), b"v") for i in range(5_000)])
    store._compactor.request(w.opened.task_no, w.opened.epoch)
    slowest, during = 0.0, 0
    deadline = time.monotonic() + 120
    while rows(path, "SELECT compacted_seq FROM tasks")[0][0] < 20:
        assert time.monotonic() < deadline, "the compactor process never finished its run"
        began = time.perf_counter()
        w.commit([(b"hot", b"%d" % w.seq)])
        slowest, during = max(slowest, time.perf_counter() - began), during + 1
    store._compactor.close()
    assert during >= 3, f"only {during} commit(s) ran beside the compaction run"
    assert slowest < 2.0, f"a commit waited {slowest:.2f} s for the compactor process"
    store.close()


def test_a_killed_stores_compactor_process_ends(tmp_path: Path) -> None:
    """When the store's process is killed, its compactor process ends too (its requests
    come through a pipe that closes): no compactor outlives its worker."""
    script = textwrap.dedent("""
        import os, signal, sys, time
        from pathlib import Path
        from resumeflow.checkpoint import GENESIS_DIGEST, SQLiteStore, make_record
        store = SQLiteStore(Path(sys.argv[1]))
        opened = store.open_task("t:x:0")
        digest = GENESIS_DIGEST
        for seq in range(1, 9):
            record = make_record(task="t:x:0", epoch=opened.epoch, seq=seq,
                                 positions={"0": seq}, sink_txn={}, inflight=[],
                                 created_at=time.time(), stats={}, prev_digest=digest)
            store.commit(opened, record, [(b"k%d" % i, b"v%d" % seq) for i in range(2000)],
                         [], [])
            digest = record.digest
        print(store._compactor._proc.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "s.db")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr
    child = int(done.stdout.split()[0])
    deadline = time.monotonic() + 20
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), f"compactor process {child} outlived its killed store"


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_an_unknown_compactor_is_refused_with_the_choices(tmp_path: Path) -> None:
    """A compactor setting other than "process" or "thread" fails at start, naming both."""
    with pytest.raises(ConfigurationError, match="'process', 'thread'"):
        SQLiteStore(tmp_path / "s.db", compactor="fork")


def test_a_compaction_run_hands_each_chunk_to_its_after_chunk_hook(tmp_path: Path) -> None:
    """``compact`` calls its ``after_chunk`` hook after each chunk written (and each turn of
    its pruning), outside the write lock (the compactor process flushes the write-ahead log
    there), and the run is exact."""
    path = tmp_path / "s.db"
    store = SQLiteStore(path, compactor="thread")
    w = Writer(store)
    w.commit([(b"k%03d" % i, b"v%d" % i) for i in range(300)])
    lock = threading.Lock()
    held: list[bool] = []

    def after_chunk() -> None:
        held.append(lock.locked())

    with store._lock:
        ran = compact(store.connection, w.opened.task_no, w.opened.epoch, store._recent,
                      lock, chunk_keys=64, after_chunk=after_chunk)
    assert ran and len(held) >= 5 and not any(held)  # 300 keys in chunks of 64
    assert rows(path, "SELECT count(*) FROM state") == [(300,)]
    store.close()


def test_the_log_flush_of_a_compactor_process_never_raises(tmp_path: Path) -> None:
    """Flushing the write-ahead log after a chunk syncs the log file when there is one and
    does nothing when there is none (the store's next commit then syncs it)."""
    database = tmp_path / "s.db"
    _sync_log(database)  # no log yet
    store = SQLiteStore(database)
    Writer(store).commit([(b"k", b"v")])
    assert Path(f"{database}-wal").exists()
    _sync_log(database)
    store.close()
