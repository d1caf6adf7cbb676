"""W1 on resumeflow, exactly-once at the default commit bound (pipelined, or not: ``sync``;
with the store's compactor in a thread instead of a process of its own: ``thread``), or
with commits disabled (``off``).

"Commits disabled" is the same flow on the same runtime, cut into the same windows (100 ms /
100,000 records), with no checkpoint write at all: a store that keeps nothing (no commit
record, no state delta written, no transaction, no fsync) and a sink that appends each
window's JSON lines to the output file with a plain write as they are encoded (no staging
file, no fsync). What it leaves out is exactly what a checkpoint writes, so the ratio of the
two is the cost of durability; the output it writes is byte for byte the same.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from _common import STARTED, report

import resumeflow as rf
from resumeflow.checkpoint import CommitRecord, OpenedTask, StagedEntry, TaskStatus
from resumeflow.sinks import Precommit, SinkContext

_encode_lines = msgspec.json.Encoder().encode_lines


class ThreadCpu:
    """CPU seconds each thread used, summed by role (the thread's name up to its first space:
    ``resumeflow-commit``, ``resumeflow-compactor``, ``resumeflow-fsync``), read by each thread
    itself as it ends. On one interpreter the threads share one GIL, so
    what the background threads spend in Python is time the main loop cannot run."""

    def __init__(self) -> None:
        self.by_role: dict[str, float] = {}
        self._lock = threading.Lock()
        self._run = threading.Thread.run

    def install(self) -> None:
        outer = self

        def run(thread: threading.Thread) -> None:
            try:
                outer._run(thread)
            finally:
                outer.add(thread.name.split(" ")[0], time.thread_time())

        threading.Thread.run = run  # type: ignore[method-assign]

    def add(self, role: str, seconds: float) -> None:
        with self._lock:
            self.by_role[role] = self.by_role.get(role, 0.0) + seconds

    def report(self) -> dict[str, float]:
        self.add("main", time.thread_time())
        return {role: round(s, 3) for role, s in sorted(self.by_role.items())}


def build(src: Path, sink: Any) -> rf.Flow:
    flow = rf.Flow("w1")
    (flow.source(rf.sources.JsonLines(src))
         .key_by(lambda e: e["key"])
         .reduce(lambda total, e: total + e["v"], initial=0)
         .sink(sink))
    return flow


class NullStore:
    """A store that keeps nothing: every commit is accepted and dropped."""

    keep_checkpoints = 2

    def open_task(self, task: str) -> OpenedTask:
        return OpenedTask(task=task, task_no=1, epoch=1, record=None)

    def load_state(self, task_no: int, key: bytes, epoch: int | None = None) -> bytes | None:
        return None

    def commit(self, opened: OpenedTask, record: CommitRecord,
               delta: Sequence[tuple[bytes, bytes | None]], staged: Sequence[StagedEntry],
               release: Sequence[tuple[str, int]], in_store: Sequence[Any] = ()) -> None:
        return None

    def records(self, task: str) -> list[tuple[int, bytes]]:
        return []

    def tasks(self) -> list[TaskStatus]:
        return []

    def close(self) -> None:
        return None


class PlainJsonLinesSink:
    """JSON lines like ``JsonLinesSink``'s (``{"key": k, "value": v}``), encoded when it
    encodes them (between batches, and at each window's end) and appended at once with a
    plain buffered write: no staging, no fsync, no recovery."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"plain-jsonl:{path}"

    def open(self, ctx: SinkContext) -> _PlainWriter:
        return _PlainWriter(self.path, keyed=ctx.keyed)


class _PlainWriter:
    def __init__(self, path: Path, *, keyed: bool) -> None:
        self.buffer: list[Any] = []
        self._keyed = keyed
        self._file = open(path, "ab")  # noqa: SIM115 - closed in close()

    def recover(self, meta: dict[str, Any] | None, staged: Sequence[StagedEntry]) -> None:
        return None

    def spill(self) -> int:
        """Write the buffered items now, as ``JsonLinesSink``'s writer encodes them (between
        batches, past 1,024 items)."""
        n = len(self.buffer)
        if n < 1024:
            return 0
        self._write()
        return n

    def _write(self) -> None:
        items = self.buffer
        for start in range(0, len(items), 4096):
            chunk = items[start:start + 4096]
            if self._keyed:
                self._file.write(_encode_lines([{"key": k, "value": v} for k, v in chunk]))
            else:
                self._file.write(_encode_lines(chunk))
        items.clear()

    def precommit(self, seq: int) -> Precommit:
        self._write()
        return Precommit()

    def finalize(self, seq: int) -> None:
        return None

    def releasable(self) -> int | None:
        return None

    def close(self) -> None:
        self._file.close()


def main(src: Path, out: Path, mode: str) -> None:
    imported = time.perf_counter()
    threads = ThreadCpu()
    threads.install()
    store_path = out.parent / "rf-store.db"
    for leftover in out.parent.glob("rf-store.db*"):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    out.unlink(missing_ok=True)
    config = rf.RunConfig()
    if mode in ("default", "sync", "thread"):
        label = "resumeflow, exactly-once, 100 ms / 100k commits"
        store: Path | rf.SQLiteStore = store_path
        if mode == "sync":
            config = rf.RunConfig(pipelined_commit=False)
            label += ", not pipelined"
        if mode == "thread":
            store = rf.SQLiteStore(store_path, keep_checkpoints=config.keep_checkpoints,
                                   compactor="thread")
            label += ", compactor thread (one process)"
        try:
            summary = rf.run(build(src, rf.sinks.JsonLinesSink(out)), store, config)
        finally:
            if isinstance(store, rf.SQLiteStore):
                store.close()
    else:
        label = "resumeflow, commits disabled (no checkpoint writes)"
        dead = out.parent / "dead.jsonl"
        dead.unlink(missing_ok=True)
        summary = rf.run(build(src, PlainJsonLinesSink(out)), NullStore(), config,
                         dead_letters=PlainJsonLinesSink(dead))
    report(contender=label, records=summary.records_in, seconds=time.perf_counter() - imported,
           import_s=imported - STARTED, commits=summary.commits,
           commit_p50_ms=summary.commit_p50_s * 1e3, cpu_threads=threads.report())


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
