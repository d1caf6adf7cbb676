"""``resumeflow worker``: how a worker of a group is started, and what it refuses."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from resumeflow.cli._worker import is_dsn


def test_worker_of_a_file_source_needs_a_postgres_store_for_leases(work: Any) -> None:
    """A worker whose source has no consumer group and whose store is a SQLite file exits 2
    before processing anything, saying to use a PostgreSQL store or ``run --follow``."""
    events = work.events(10)
    spec = work.pipeline(events)
    done = work.cli("worker", spec, "--store", str(work.store), "--no-progress")
    assert done.returncode == 2, done.stderr
    assert "postgresql://" in done.stderr and "run --follow" in done.stderr
    assert not work.out.exists()


def test_store_argument_is_a_dsn_or_a_path() -> None:
    """``--store`` is a PostgreSQL DSN for URLs and libpq strings, else a SQLite path."""
    assert is_dsn("postgresql://u@h/db") and is_dsn("host=127.0.0.1 port=5 dbname=x")
    assert not is_dsn("state.db") and not is_dsn("/var/lib/flows/orders.db")


_DIR_PIPELINE = '''\
import time

import resumeflow as rf


def pace(e):
    time.sleep(0.002)
    return e


def flow():
    f = rf.Flow("leased")
    (f.source(rf.sources.JsonLinesDir({pattern!r}, name="files"))
      .map(pace)
      .key_by(lambda e: e["k"])
      .stateful_map(lambda s, e: (s + e["v"], {{"id": e["id"], "sum": s + e["v"]}}), initial=0)
      .sink(rf.sinks.JsonLinesSink({out!r}, with_key=False)))
    return f
'''


@pytest.mark.slow
def test_workers_share_files_through_leases_and_survive_a_sigkill(
        tmp_path: Path, postgres_dsn: str) -> None:
    """Two workers share four files through PostgreSQL leases; one is SIGKILLed mid-run, the
    other takes its leases once they expire, resumes its tasks from their commit records, and
    every record lands exactly once."""
    expected: dict[int, int] = {}
    n = 0
    for f in range(4):
        sums: dict[str, int] = {}
        lines = []
        for i in range(400):
            k, v = f"k{f}-{i % 5}", (n * 3) % 7
            sums[k] = sums.get(k, 0) + v
            expected[n] = sums[k]
            lines.append(json.dumps({"id": n, "k": k, "v": v}))
            n += 1
        (tmp_path / f"in{f}.jsonl").write_text("\n".join(lines) + "\n")
    spec = tmp_path / "pipeline.py"
    spec.write_text(_DIR_PIPELINE.format(pattern=str(tmp_path / "in*.jsonl"),
                                         out=str(tmp_path / "out-{partition}.jsonl")))
    procs, logs = [], []
    for w in range(2):
        logs.append(tmp_path / f"w{w}.log")
        with open(logs[-1], "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "resumeflow.cli", "worker", f"{spec}:flow", "--store",
                 postgres_dsn, "--dead-letters", str(tmp_path / "dead-{partition}.jsonl"),
                 "--lease-seconds", "4", "--worker-id", f"w{w}", "--no-progress",
                 "--replay-max-seconds", "0.2"], cwd=tmp_path, stdout=log, stderr=log))

    def output() -> list[dict[str, Any]]:
        return [json.loads(line) for p in sorted(tmp_path.glob("out-*.jsonl"))
                for line in p.read_bytes().splitlines()]

    def progress() -> int:
        # a poll can catch a worker's last line half-written: count only finished lines
        return sum(p.read_bytes().count(b"\n") for p in tmp_path.glob("out-*.jsonl"))

    def diagnostics() -> str:
        return "\n".join(f"---- {p.name} ----\n{p.read_text(errors='replace')[-4000:]}"
                         for p in logs)

    def wait(condition: Any, what: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}\n{diagnostics()}"
            time.sleep(0.1)

    try:
        wait(lambda: all("recovered task" in p.read_text() for p in logs), "both to hold tasks")
        wait(lambda: progress() >= n // 5, "a fifth of the output")
        procs[0].kill()
        procs[0].wait()
        killed_at = len(logs[1].read_bytes())
        victim = set()
        for m in re.finditer(r"(recovered|released) task leased:files:(in\d\.jsonl)",
                             logs[0].read_text()):
            (victim.add if m.group(1) == "recovered" else victim.discard)(m.group(2))
        assert victim, diagnostics()

        def resumed() -> dict[str, str]:
            after_kill = logs[1].read_bytes()[killed_at:].decode()
            return dict(re.findall(r"recovered task leased:files:(in\d\.jsonl) epoch \d+ "
                                   r"from (no checkpoint|checkpoint seq \d+)", after_kill))

        wait(lambda: victim <= set(resumed()), "the survivor to take the victim's leases")
        wait(lambda: progress() >= n, "the whole output", timeout_s=90)
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(30) == 0, diagnostics()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    rows = output()
    got = {r["id"]: r["sum"] for r in rows}
    assert len(rows) == len(got) == n and got == expected, diagnostics()
    taken = resumed()
    assert any(taken[p].startswith("checkpoint seq") for p in victim), diagnostics()
