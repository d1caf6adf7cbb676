"""kill -9 at random moments: whatever the moment, the final output is exact and replay bounded.

A real ``resumeflow run`` process is SIGKILLed after a seeded random delay and restarted, up to
``MAX_KILLS`` times, then left to complete. A failure names its seed; rerunning that seed
replays the same plan of delays (where the kills land still depends on the machine's speed).
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import threading
from typing import Any

import pytest

SINK_KINDS = ("jsonl", "sqlite-store", "sqlite-other")
REPLAY_MAX_EVENTS = 2000
MAX_KILLS = 4
RECOVERED_FROM_CHECKPOINT = re.compile(
    r"recovered task orders:events\.jsonl:0 epoch \d+ from checkpoint seq (\d+)")


def run_killed(work: Any, args: list[str], *, after_first_records: bool,
               delay_s: float) -> tuple[int, str]:
    """Start the pipeline and SIGKILL it ``delay_s`` after it starts, or after it processed
    its first records, unless it ended by then; returns (returncode, stderr)."""
    proc = subprocess.Popen(work.cli_args(*args), cwd=work.root, env=work.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stderr or []:
            lines.append(line)
            if "first records processed" in line:
                started.set()
        started.set()  # the process ended

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if after_first_records:
            started.wait(timeout=60)
        proc.wait(timeout=delay_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    reader.join(timeout=60)
    return proc.returncode, "".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_kill9_at_random_moments_then_resume(work: Any, seed: int) -> None:
    """Random SIGKILLs and restarts end with the exact output, a recovery line per restart,
    and never more records replayed than ``replay_max_events``."""
    rng = random.Random(seed)
    kind = SINK_KINDS[seed % len(SINK_KINDS)]
    events = work.events(40_000, seed=seed, bad_every=7000)
    # At least 1 s of processing (10 ms per 400 events), so the kills land mid-way.
    spec = work.pipeline(events, kind, pace_every=400)
    args = work.run_args(spec, replay_max_events=REPLAY_MAX_EVENTS)
    kills, runs = 0, []
    # Most kills land while records flow (0.15 s after the first ones: past the first
    # commit); some land at any moment from the start (start-up, recovery).
    plan = [(rng.random() < 0.75, rng.uniform(0.15, 0.5)) for _ in range(MAX_KILLS)]
    for after_first_records, delay_s in [*plan, (False, 120.0)]:
        returncode, stderr = run_killed(work, args, after_first_records=after_first_records,
                                        delay_s=delay_s)
        runs.append(stderr)
        if returncode == 0:
            break
        assert returncode == -signal.SIGKILL, f"seed {seed}: run failed:\n{stderr}"
        kills += 1
    assert returncode == 0, f"seed {seed}: the pipeline never completed"
    assert kills >= 1, f"seed {seed}: no kill landed before the pipeline completed"

    assert work.output(kind) == work.expected(events, kind), f"seed {seed}: output differs"
    assert [d["position"] for d in work.dead_letters()] == [o for o, _ in events.bad]
    final = runs[-1]
    assert "recovered task orders:events.jsonl:0" in final
    assert any(RECOVERED_FROM_CHECKPOINT.search(text) for text in runs[1:]), \
        f"seed {seed}: no restart resumed from a checkpoint"
    replayed = [n for text in runs for n in work.replayed(text)]
    assert max(replayed) <= REPLAY_MAX_EVENTS, f"seed {seed}: replayed {max(replayed)}"
