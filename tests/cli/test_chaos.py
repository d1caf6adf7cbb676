"""``resumeflow chaos`` kills the example pipeline for real and finds nothing lost or doubled."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _orders(path: Path, n: int) -> None:
    rng = random.Random(7)
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "customer": f"c{rng.randrange(300):03d}",
                                "amount": rng.randrange(100, 10_000),
                                "status": "paid" if rng.random() < 0.95 else "refunded"}) + "\n")


def _chaos(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RESUMEFLOW_DEMO_DIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "resumeflow.cli", "chaos", "examples/orders.py:flow", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
def test_chaos_on_the_example_pipeline_reports_no_violation(tmp_path: Path) -> None:
    """Twelve SIGKILLs, some inside the commit protocol, leave the output equal to a clean run;
    the table reports kills, lost, duplicated, replayed and time to resume."""
    _orders(tmp_path / "orders.jsonl", 150_000)
    done = _chaos(tmp_path, "--kills", "12", "--seed", "3", "--replay-max-events", "20000")
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout
    assert "no violations" in table
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in table.splitlines() if line.count("│") >= 3}
    assert rows["lost"] == "0" and rows["duplicated"] == "0"
    kills = int(rows["kills (timed / inside the protocol)"].split()[0])
    assert 6 <= kills <= 12  # a run that ends before its kill ends the chaos early
    replayed_max = int(rows["replayed per restart (median / max)"].split("/")[1].split()[0])
    assert replayed_max <= 20_000
    assert rows["checkpoint chain"] == "verifies"


def test_chaos_refuses_to_overwrite_existing_output(tmp_path: Path) -> None:
    """Chaos writes the flow's output several times, so it refuses to start over a file that
    already exists, and says what to do."""
    _orders(tmp_path / "orders.jsonl", 100)
    (tmp_path / "totals.jsonl").write_text("{}\n")
    done = _chaos(tmp_path, "--kills", "1")
    assert done.returncode == 2
    assert "move it away" in done.stderr
