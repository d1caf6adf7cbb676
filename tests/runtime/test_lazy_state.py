"""A task with a million keys of state resumes reading O(1) rows, never its whole state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import resumeflow as rf

# Commits ``n`` keys of the flow below (state "reduce0" of task "lazy:keys:0", each key's
# count 1, positions at the end of the keys file) in one checkpoint through the store API,
# then dies at once, as a crash right after the commit would. Building the same state through
# the pipeline costs a cold lookup per new key (seconds for a million); what is measured here
# is the resume, not the build.
BUILD = """
import os, signal, sys, time
from resumeflow._codec import encode_key
from resumeflow.checkpoint import GENESIS_DIGEST, SQLiteStore, make_record

store_path, keys_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = SQLiteStore(store_path)
opened = store.open_task("lazy:keys:0")
delta = [(b"reduce0\\x00" + encode_key(i), b"1") for i in range(n)]
record = make_record(task=opened.task, epoch=opened.epoch, seq=1,
                     positions={"0": os.path.getsize(keys_path)}, sink_txn={}, inflight=[],
                     created_at=time.time(), stats={"keys:reduce0": n, "records_in": n},
                     prev_digest=GENESIS_DIGEST)
store.commit(opened, record, delta, [], [])
os.kill(os.getpid(), signal.SIGKILL)
"""

CONFIG = rf.RunConfig(replay_max_events=2_000_000, replay_max_seconds=3600)


def key_count_flow(keys: Path, out: Path) -> rf.Flow:
    flow = rf.Flow("lazy")
    (flow.source(rf.sources.JsonLines(keys, name="keys")).key_by(lambda k: k)
         .reduce(lambda count, _: count + 1, initial=0)
         .filter(lambda count: count > 1)
         .sink(rf.sinks.JsonLinesSink(out)))
    return flow


def build(root: Path, n: int) -> tuple[Path, Path]:
    keys = root / f"keys{n}.jsonl"
    keys.write_text("\n".join(map(str, range(n))) + "\n")
    store = root / f"store{n}.db"
    done = subprocess.run([sys.executable, "-c", BUILD, str(store), str(keys), str(n)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == -9, done.stderr
    with open(keys, "a") as f:  # new records touching old keys, and one new key
        f.write(f"5\n7\n{n - 1}\n{n}\n")
    return keys, store


def resume(root: Path, n: int) -> dict[str, Any]:
    """Open the task three times; then let the first records flow on the last opening."""
    keys, store_path = build(root, n)
    opens = []
    for _ in range(3):
        store = rf.SQLiteStore(store_path)
        runtime = rf.Runtime(key_count_flow(keys, root / f"out{n}.jsonl"), store, CONFIG)
        (recovery,) = runtime.open()
        rows_at_open = store.rows_read
        opens.append(recovery.open_s)
        task = runtime.tasks[0]
        if len(opens) < 3:
            task.close()
            store.close()
    assert task.step() == 4
    state = task.states["reduce0"]
    result = {
        "rows_at_open": rows_at_open, "rows_after_first_batch": store.rows_read,
        "open_s": min(opens), "state_keys": recovery.state_keys,
        "values": dict(state.values), "loads": state.loads,
        "to_sink": list(task.writers["out"].buffer),
    }
    task.close()
    store.close()
    return result


@pytest.mark.slow
def test_million_key_state_resumes_without_loading_it(tmp_path: Path) -> None:
    """Reopening 1,000,000 keys reads as few rows as 10,000 keys, loads only the keys the
    next records touch (with their committed values), and opens within a small ratio of
    the 10,000-key task's time."""
    small = resume(tmp_path, 10_000)
    large = resume(tmp_path, 1_000_000)
    assert large["state_keys"] == 1_000_000 and small["state_keys"] == 10_000
    assert large["rows_at_open"] == small["rows_at_open"] <= 5
    # Each of the 4 cold reads also reads its task's epoch row (a fenced reader is refused).
    assert large["rows_after_first_batch"] == small["rows_after_first_batch"] <= 10 + 4
    assert large["loads"] == small["loads"] == 4
    assert large["values"] == {5: 2, 7: 2, 999_999: 2, 1_000_000: 1}
    assert small["values"] == {5: 2, 7: 2, 9_999: 2, 10_000: 1}
    assert large["to_sink"] == [(5, 2), (7, 2), (999_999, 2)]
    # Generous: opening is a few milliseconds either way; loading all keys would be ~100x.
    assert large["open_s"] <= 10 * small["open_s"], (large["open_s"], small["open_s"])
