"""Reading what a simulated run left in a ``SQLiteStore`` and real sinks, as a checker's
``Outcome``.

Everything is read from the files, as another process would after the run: committed keyed
state (as the runtime's reads see it, and again after a full compaction: both must agree),
each task's committed position and its chain of commit records (consecutive ``seq``, each
``prev_digest`` the digest of the record before), the JSON-lines files and the SQLite tables.
Under exactly-once a JSON-lines file's items are its committed output. Under at-least-once
the committed output is the bytes each accepted commit record names (``base`` to ``end``),
in commit order; every other item of the file is counted as a duplicate. A table's output is
its rows (the latest value of each key), compared with the rows the reference's output
leaves.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from .._codec import encode
from ..checkpoint import CommitRecord, SQLiteStore, decode_record
from ..errors import CorruptCheckpointError
from ._check import Outcome
from ._observe import ObservedStore, Violation

__all__ = ["expected_rows", "read_outcome"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
"""How ``JsonLinesSink`` turns a partition into a file name."""


def read_outcome(*, database: Path, tasks: dict[str, str], guarantee: str, keyed: bool,
                 observed: ObservedStore, keep_checkpoints: int,
                 out: Path | tuple[Path, Callable[[str], str]],
                 dead_files: Path) -> tuple[Outcome, list[Violation]]:
    """What a run left durable (``tasks``: partition -> task id). ``out`` is the directory of
    the output files (one JSON-lines file per partition) or ``(database, table of a
    partition)``; ``dead_files`` the directory of the dead-letter files."""
    result = Outcome()
    found: list[Violation] = []
    store = SQLiteStore(database, keep_checkpoints=keep_checkpoints, create=False)
    try:
        numbers = dict(store.connection.execute("SELECT task, task_no FROM tasks").fetchall())
        status = {s.task: s for s in store.tasks()}
        for partition, task in tasks.items():
            record = status[task].record if task in status else None
            result.positions[task] = int(record.positions.get(partition) or 0) if record else 0
            found += _check_chain(task, store.records(task))
        result.state, mismatches = _states(store, database, numbers, tasks)
        found += mismatches
    finally:
        store.close()
    for partition, task in tasks.items():
        accepted = observed.accepted(task)
        name = _SAFE.sub("_", partition) + ".jsonl"
        if isinstance(out, tuple):
            result.output[task] = _rows(out[0], out[1](partition))
        else:
            items, problems = _file(out / name, "out", keyed, guarantee, accepted, result)
            result.output[task] = items
            found += [Violation(kind="output_mismatch", task=task, detail=p) for p in problems]
        letters, problems = _file(dead_files / name, "dead", False, guarantee, accepted, result)
        result.dead[task] = [(e["position"], e["kind"], e["record"]) for e in letters]
        found += [Violation(kind="output_mismatch", task=task, detail=p) for p in problems]
    return result, found


def expected_rows(items: list[Any]) -> list[Any]:
    """The rows ``SQLiteTable`` holds after upserting ``items`` (``[key, value]``): the latest
    value per key; keys that are strings or numbers as they are, others as JSON text."""
    latest: dict[Any, Any] = {}
    for key, value in items:
        column = key if isinstance(key, (str, int, float)) and not isinstance(key, bool) \
            else encode(key).decode()
        latest[(type(column).__name__, column)] = [column, value]
    return sorted(latest.values(), key=encode)


def _rows(path: Path, table: str) -> list[Any]:
    if not path.exists():
        return []
    with closing(sqlite3.connect(path)) as db:
        exists = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                            (table,)).fetchone()
        if exists is None:
            return []
        rows = [[key, json.loads(value)]
                for key, value in db.execute(f"SELECT key, value FROM {table}")]
    return sorted(rows, key=encode)


def _check_chain(task: str, records: list[tuple[int, bytes]]) -> list[Violation]:
    """The kept records of ``task`` verify and link: consecutive seqs, digests chained."""
    previous: CommitRecord | None = None
    for seq, raw in records:
        try:
            record = decode_record(raw)
        except CorruptCheckpointError as exc:
            return [Violation(kind="broken_chain", task=task,
                              detail=f"kept commit record seq {seq} does not verify: {exc}")]
        if previous is not None and (record.seq != previous.seq + 1
                                     or record.prev_digest != previous.digest):
            return [Violation(kind="broken_chain", task=task, detail=(
                f"commit record seq {record.seq} does not follow seq {previous.seq} "
                f"(prev_digest {record.prev_digest[:12]}…, digest before "
                f"{previous.digest[:12]}…)"))]
        previous = record
    return []


def _states(store: SQLiteStore, database: Path, numbers: dict[str, int],
            tasks: dict[str, str]) -> tuple[dict[str, dict[bytes, bytes]], list[Violation]]:
    """Committed state per task: as ``load_state`` sees it through the uncompacted deltas,
    and the ``state`` table after a full compaction; they must agree."""
    for task in tasks.values():  # the first read fixes this handle's view of the deltas
        if task in numbers:
            store.load_state(numbers[task], b"")
    before = {task: _table_state(store, numbers[task]) for task in tasks.values()
              if task in numbers}
    compactor = SQLiteStore(database, keep_checkpoints=store.keep_checkpoints, create=False)
    try:
        compactor.compact()
    finally:
        compactor.close()
    states: dict[str, dict[bytes, bytes]] = {}
    found: list[Violation] = []
    for task in tasks.values():
        if task not in numbers:
            states[task] = {}
            continue
        after = _table_state(store, numbers[task])
        keys = sorted(set(after) | set(before[task]))
        seen = {k: v for k in keys if (v := store.load_state(numbers[task], k)) is not None}
        if seen != after:
            wrong = [k for k in keys if seen.get(k) != after.get(k)]
            found.append(Violation(kind="state_mismatch", task=task, detail=(
                f"{len(wrong)} key(s) read differently before and after a full compaction, "
                f"e.g. {wrong[:3]!r}")))
        states[task] = after
    return states, found


def _table_state(store: SQLiteStore, task_no: int) -> dict[bytes, bytes]:
    return {bytes(k): bytes(v) for k, v in store.connection.execute(
        "SELECT key, value FROM state WHERE task_no = ? ORDER BY key", (task_no,))}


def _file(path: Path, sink_id: str, keyed: bool, guarantee: str, accepted: list[CommitRecord],
          result: Outcome) -> tuple[list[Any], list[str]]:
    """Committed items of one JSON-lines file, and what is wrong with it."""
    data = path.read_bytes() if path.exists() else b""
    if guarantee == "exactly-once":
        return _items(data, keyed), []
    committed: list[Any] = []
    problems: list[str] = []
    for record in accepted:
        meta = record.sink_txn.get(sink_id)
        if not meta:
            continue
        base, end = int(meta["base"]), int(meta["end"])
        if base == end:
            continue
        whole = end <= len(data) and data[end - 1:end] == b"\n" and \
            (base == 0 or data[base - 1:base] == b"\n")
        if not whole:
            problems.append(f"commit seq {record.seq} (epoch {record.epoch}) names bytes "
                            f"[{base}, {end}) of {path.name}, not whole lines of its "
                            f"{len(data)} bytes")
            continue
        committed.extend(_items(data[base:end], keyed))
    result.duplicates += len(_items(data, keyed)) - len(committed)
    return committed, problems


def _items(data: bytes, keyed: bool) -> list[Any]:
    lines = [json.loads(line) for line in data.splitlines() if line.strip()]
    return [[d["key"], d["value"]] for d in lines] if keyed else lines
