"""Fixtures shared by the tests of resumeflow.testing."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from resumeflow import SQLiteStore
from resumeflow.checkpoint import Store


def sqlite_corrupt_latest(store: Store, task: str) -> None:
    """Cut the newest commit record of ``task`` in a SQLiteStore short, as a torn write."""
    assert isinstance(store, SQLiteStore)
    with store._lock:  # take turns with the store's own writes and its compactor
        store.connection.execute(
            "UPDATE commits SET record = substr(record, 1, 20) WHERE task_no = "
            "(SELECT task_no FROM tasks WHERE task = ?1) AND seq = (SELECT max(seq) FROM "
            "commits WHERE task_no = (SELECT task_no FROM tasks WHERE task = ?1))",
            (task,)).close()


def read_jsonl(path: Path, *, keyed: bool = True) -> list[Any]:
    """Items in a JSON-lines sink's file, as the flow emitted them."""
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [[d["key"], d["value"]] for d in lines] if keyed else lines


def read_table(path: Path, table: str) -> list[Any]:
    """Rows of a SQLiteTable sink as ``[key, value]`` items."""
    if not path.exists():
        return []
    db = sqlite3.connect(path)
    try:
        return [[k, json.loads(v)] for k, v in db.execute(f"SELECT key, value FROM {table}")]
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


@pytest.fixture
def fresh_path(tmp_path: Path) -> Callable[[str], Path]:
    """Returns a new, unused path under tmp_path on every call."""
    count = [0]

    def make(suffix: str) -> Path:
        count[0] += 1
        return tmp_path / f"f{count[0]}{suffix}"

    return make
