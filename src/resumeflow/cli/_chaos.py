"""``resumeflow chaos``: SIGKILL a user's pipeline at random moments and check what it kept.

The pipeline runs as real subprocesses of ``resumeflow run``. A seeded plan mixes kills after
a random delay with kills timed to land inside the commit protocol (``RESUMEFLOW_CRASH_AT``
at a random crash point). After the last kill the pipeline runs to its end, and its output is
compared with a fault-free run of the same pipeline on a fresh store: lost and duplicated
records, records replayed per restart against the replay bound, and time to resume.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._faults import CRASH_POINTS
from ..errors import ConfigurationError
from ..flow import Flow
from ..sinks import JsonLinesSink, SQLiteTable

__all__ = ["ChaosReport", "run_chaos"]

_REPLAYING = re.compile(r"replaying (\d+)")
_FIRST = re.compile(r"first records processed")


@dataclass(kw_only=True)
class ChaosReport:
    """Outcome of a chaos run."""

    kills: int = 0
    timed_kills: int = 0
    crash_point_kills: int = 0
    runs: int = 0
    lost: int = 0
    duplicated: int = 0
    replayed: list[int] = field(default_factory=list)
    resume_s: list[float] = field(default_factory=list)
    replay_bound: int = 0
    verify_ok: bool = True
    reference_records: int = 0

    @property
    def violations(self) -> list[str]:
        found = []
        if self.lost:
            found.append(f"{self.lost} record(s) lost")
        if self.duplicated:
            found.append(f"{self.duplicated} record(s) duplicated")
        over = [r for r in self.replayed if r > self.replay_bound]
        if over:
            found.append(f"replay above bound {self.replay_bound}: {over}")
        if not self.verify_ok:
            found.append("checkpoint chain does not verify")
        return found


class _Outputs:
    """Reads, and clears, what a flow's sink wrote."""

    def __init__(self, flow: Flow) -> None:
        sink = flow.sink_
        if isinstance(sink, JsonLinesSink):
            self.kind = "jsonl"
            self.pattern = sink.path.replace("{partition}", "*")
        elif isinstance(sink, SQLiteTable):
            self.kind = "table"
            self.path = sink.path
            self.table = sink.table
        else:
            raise ConfigurationError(
                f"chaos compares the output of a JsonLinesSink or SQLiteTable; {sink!r} cannot "
                "be read back. Point the flow at one of those for the chaos run"
            )

    def files(self) -> list[Path]:
        if self.kind != "jsonl":
            return [self.path]
        return sorted(Path().glob(self.pattern)) if any(c in self.pattern for c in "*?[") \
            else [p for p in [Path(self.pattern)] if p.exists()]

    def read(self) -> Counter[str]:
        if self.kind == "jsonl":
            lines: Counter[str] = Counter()
            for path in self.files():
                with open(path, encoding="utf-8") as f:
                    lines.update(line.rstrip("\n") for line in f)
            return lines
        db = sqlite3.connect(self.path)
        try:
            rows = db.execute(f"SELECT key, value FROM {self.table}").fetchall()
        finally:
            db.close()
        return Counter(f"{k!r}={v}" for k, v in rows)

    def clear(self, store: Path) -> None:
        if self.kind == "jsonl":
            for path in self.files():
                path.unlink()
        elif self.path.resolve() != store.resolve():
            db = sqlite3.connect(self.path)
            try:
                db.execute(f"DROP TABLE IF EXISTS {self.table}")
                db.execute("DROP TABLE IF EXISTS _resumeflow_sink_progress")
                db.commit()
            finally:
                db.close()

    def exists(self) -> bool:
        if self.kind == "jsonl":
            return bool(self.files())
        return self.path.exists()


def _remove_store(store: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-waiting", ".progress"):
        Path(f"{store}{suffix}").unlink(missing_ok=True)
    shutil.rmtree(f"{store}.deadletters", ignore_errors=True)


def _command(spec: str, store: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "resumeflow.cli", "run", spec, "--store", str(store),
            "--no-progress", *extra]


@dataclass
class _Run:
    code: int | None
    replayed: int | None
    resume_s: float | None
    stderr: str


def _spawn(cmd: list[str], env: dict[str, str], kill_after: float | None) -> _Run:
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    first: list[float] = []
    lines: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if not first and _FIRST.search(line):
                first.append(time.monotonic() - started)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    reader.join(timeout=5)
    text = "".join(lines)
    replays = [int(m) for m in _REPLAYING.findall(text)]
    return _Run(code=proc.returncode, replayed=sum(replays) if replays else None,
                resume_s=first[0] if first else None, stderr=text)


def run_chaos(flow: Flow, spec: str, *, kills: int, seed: int, store: Path | None,
              extra: list[str], replay_bound: int, log: Any = print) -> ChaosReport:
    """Run the chaos plan; see the module docstring."""
    outputs = _Outputs(flow)
    if outputs.exists():
        raise ConfigurationError(
            f"the flow's output {outputs.files()} already exists; chaos writes it several "
            "times: move it away first"
        )
    rng = random.Random(seed)
    scratch = Path(tempfile.mkdtemp(prefix="resumeflow-chaos-"))
    store = store or scratch / "chaos.db"
    ref_store = scratch / "reference.db"
    env = {**os.environ}
    env.pop("RESUMEFLOW_CRASH_AT", None)
    report = ChaosReport(replay_bound=replay_bound)
    try:
        log(f"reference run (no faults) on {ref_store}")
        began = time.monotonic()
        ref = _spawn(_command(spec, ref_store, extra), env, None)
        duration = time.monotonic() - began
        if ref.code != 0:
            raise ConfigurationError(f"the fault-free run failed (exit {ref.code}):\n{ref.stderr}")
        reference = outputs.read()
        report.reference_records = sum(reference.values())
        outputs.clear(ref_store)
        _remove_store(store)
        startup = ref.resume_s if ref.resume_s is not None else 0.3
        report = _kill_loop(spec, store, extra, env, rng, kills, duration, startup, report, log)
        verify = subprocess.run(
            [sys.executable, "-m", "resumeflow.cli", "checkpoints", "verify", "--store",
             str(store)], capture_output=True, text=True, check=False)
        report.verify_ok = verify.returncode == 0
        got = outputs.read()
        report.lost = sum((reference - got).values())
        report.duplicated = sum((got - reference).values())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def _kill_loop(spec: str, store: Path, extra: list[str], env: dict[str, str],
               rng: random.Random, kills: int, duration: float, startup: float,
               report: ChaosReport, log: Any) -> ChaosReport:
    """Restart the pipeline until it ends on its own, killing each run until ``kills`` kills
    landed. A run that finishes before its kill ends the chaos early: the table then shows
    fewer kills than asked (use more input for more kills)."""
    processing = max(duration - startup, 0.05)
    while True:
        run_env = dict(env)
        kill_after: float | None = None
        if report.kills < kills:
            if rng.random() < 0.4:
                point = rng.choice(CRASH_POINTS)
                run_env["RESUMEFLOW_CRASH_AT"] = f"{point}:{rng.randint(1, 3)}"
            else:
                # at most half the input's time in all, so runs keep input for every kill
                kill_after = startup + rng.uniform(0.0, processing / (2 * kills))
        run = _spawn(_command(spec, store, extra), run_env, kill_after)
        if report.runs:
            if run.replayed is not None:
                report.replayed.append(run.replayed)
            if run.resume_s is not None:
                report.resume_s.append(run.resume_s)
        report.runs += 1
        if run.code == 0:
            return report
        if run.code != -signal.SIGKILL:
            raise ConfigurationError(f"the pipeline failed (exit {run.code}):\n{run.stderr}")
        report.kills += 1
        if "RESUMEFLOW_CRASH_AT" in run_env:
            report.crash_point_kills += 1
            log(f"kill {report.kills}/{kills} inside the protocol at "
                f"{run_env['RESUMEFLOW_CRASH_AT']}")
        else:
            report.timed_kills += 1
            log(f"kill {report.kills}/{kills} after {kill_after:.2f} s")


def summarize(report: ChaosReport) -> list[tuple[str, str]]:
    """Rows of the chaos table."""
    def stat(values: list[float], fmt: str) -> str:
        if not values:
            return "-"
        return f"{fmt.format(statistics.median(values))} / {fmt.format(max(values))}"

    return [
        ("kills (timed / inside the protocol)",
         f"{report.kills} ({report.timed_kills} / {report.crash_point_kills})"),
        ("runs (first + restarts)", str(report.runs)),
        ("reference records", str(report.reference_records)),
        ("lost", str(report.lost)),
        ("duplicated", str(report.duplicated)),
        ("replayed per restart (median / max)",
         stat([float(r) for r in report.replayed], "{:.0f}") + f"  (bound {report.replay_bound})"),
        ("time to resume, s (median / max)", stat(report.resume_s, "{:.3f}")),
        ("checkpoint chain", "verifies" if report.verify_ok else "DAMAGED"),
    ]
