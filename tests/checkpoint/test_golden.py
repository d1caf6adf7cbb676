"""Stores written by every released schema version are restored by this version."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import resumeflow as rf
from resumeflow.checkpoint import SCHEMA_VERSION, SQLiteStore, decode_record
from resumeflow.cli import load_flow

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
VERSIONS = sorted((p.name for p in GOLDEN.glob("v*") if p.is_dir()), key=lambda v: int(v[1:]))


def _expected(events: Path) -> list[dict[str, object]]:
    sums: dict[str, int] = {}
    out = []
    for line in events.read_text().splitlines():
        e = json.loads(line)
        sums[e["k"]] = sums.get(e["k"], 0) + e["v"]
        out.append({"id": e["id"], "sum": sums[e["k"]]})
    return out


def test_every_schema_version_up_to_this_one_has_golden_files() -> None:
    """A golden store exists for each schema version this release can write or read."""
    assert [f"v{n}" for n in range(1, SCHEMA_VERSION + 1)] == VERSIONS


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_commit_records_verify_and_decode(version: str, tmp_path: Path) -> None:
    """Every commit record of an old store decodes, verifies its digest and links its chain."""
    shutil.copy(GOLDEN / version / "store.db", tmp_path / "store.db")
    store = SQLiteStore(tmp_path / "store.db", create=False)
    try:
        (status,) = store.tasks()
        previous = None
        for seq, raw in store.records(status.task):
            record = decode_record(raw)
            assert record.seq == seq
            if previous is not None:
                assert record.prev_digest == previous.digest
            previous = record
        assert previous is not None and previous.positions["0"] > 0
    finally:
        store.close()


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_store_resumes_to_the_exact_output(version: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An old store, crashed after a commit and before finalize, resumes to the exact output."""
    work = tmp_path / version
    shutil.copytree(GOLDEN / version, work)
    monkeypatch.chdir(work)
    flow = load_flow("flow.py:flow")
    store = SQLiteStore(work / "store.db")
    opened = store.open_task("golden:events.jsonl:0")
    assert opened.record is not None and opened.record.seq >= 1
    assert opened.staged, "the golden store keeps staged output of its last checkpoint"
    store.close()
    summary = rf.run(flow, work / "store.db")
    assert summary.records_in > 0
    got = [json.loads(line) for line in (work / "out.jsonl").read_text().splitlines()]
    assert got == _expected(work / "events.jsonl")
