"""Clean shutdown and the end of input: a run stops only after committing what it read."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

PARTIAL = b'{"id":999999,"customer":"c1","amo'


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def status(work: Any) -> dict[str, Any]:
    done = work.cli("status", "--store", str(work.store), "--json")
    assert done.returncode == 0, done.stderr
    (task,) = json.loads(done.stdout)
    return task  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_commits_and_exits_zero(work: Any, sig: signal.Signals) -> None:
    """A signal to a ``--follow`` run commits everything read (up to, not into, a partial
    last line) and exits 0; the committed position is exactly the bytes of complete lines."""
    events = work.events(4000)
    with open(events.path, "ab") as f:
        f.write(PARTIAL)
    # No commit happens on its own (bounds far away): the only commit is the shutdown's.
    args = work.run_args(work.pipeline(events, "jsonl"), "--follow",
                         "--replay-max-seconds", "3600", replay_max_events=1_000_000)
    proc = subprocess.Popen(work.cli_args(*args), cwd=work.root, env=work.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("first records processed" in line for line in lines))
        time.sleep(0.3)  # let it read everything there is and start polling for more
        assert proc.poll() is None, "a --follow run ended on its own"
        assert work.output("jsonl") == [], "committed before the shutdown"
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert proc.returncode == 0, stderr
    assert f"{sig.name} received: finishing the current batch and committing" in stderr
    assert f"stopped by {sig.name} after committing" in stderr

    task = status(work)
    assert task["seq"] == 1
    assert task["positions"] == {"0": events.size - len(PARTIAL)}
    assert task["records_in"] == 4000
    assert work.output("jsonl") == events.running_totals()

    # Once the partial line is complete, the next run reads it, once.
    with open(events.path, "ab") as f:
        f.write(b'unt":5}\n')
    events.events.append({"id": 999999, "customer": "c1", "amount": 5})
    done = work.cli(*work.run_args(work.pipeline(events, "jsonl")))
    assert done.returncode == 0, done.stderr
    assert work.output("jsonl") == events.running_totals()
    assert status(work)["positions"] == {"0": events.size}


def test_run_exits_zero_after_the_final_commit(work: Any) -> None:
    """Without ``--follow`` a run ends at the end of its input, after committing all of it;
    a second run finds nothing to do and commits nothing."""
    events = work.events(5000)
    args = work.run_args(work.pipeline(events, "jsonl"), "--replay-max-seconds", "3600",
                         replay_max_events=1_000_000)
    done = work.cli(*args)
    assert done.returncode == 0, done.stderr
    assert "resumeflow: 5000 records in" in done.stderr
    task = status(work)
    assert task["seq"] == 1 and task["positions"] == {"0": events.size}
    assert work.output("jsonl") == events.running_totals()

    again = work.cli(*args)
    assert again.returncode == 0, again.stderr
    assert "resumeflow: 0 records in" in again.stderr
    assert "from checkpoint seq 1" in again.stderr
    assert status(work)["seq"] == 1
