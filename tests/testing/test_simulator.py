"""The seeded simulator: thousands of fault schedules, exact replay, the user API and CLI."""

from __future__ import annotations

import re
from typing import Any

import pytest

from resumeflow import Flow
from resumeflow.runtime import CRASH_POINTS
from resumeflow.testing import FaultPlan, MemorySink, MemorySource, simulate
from resumeflow.testing._cli import main, run_many, run_seed


def test_ten_thousand_schedules_keep_every_invariant() -> None:
    """10,000 seeded fault schedules of the built-in workloads break no invariant."""
    report = run_many(10_000, seed=0)
    print(f"\nsimulator: {report.summary()}")
    assert report.schedules == 10_000
    assert report.totals["crashes"] > 10_000 and report.totals["takeovers"] > 500
    assert report.sim_ratio > 1.0
    report.check()


def test_a_seed_replays_the_same_schedule() -> None:
    """Running a seed twice gives the same event sequence, counts and outcome."""
    for seed in (3, 17, 404, 5089):
        first, second = run_seed(seed), run_seed(seed)
        assert first.fingerprint == second.fingerprint
        assert first.counts == second.counts and first.replays == second.replays
        assert first.violations == second.violations == []


def test_fault_plans_reach_every_fault_kind() -> None:
    """Over a few hundred seeds the plans inject every kind of fault the brief lists."""
    events: list[str] = []
    for seed in range(400):
        run_seed(seed, trace_to=events.append)
    text = "\n".join(events)
    for point in CRASH_POINTS:
        assert f"crash at {point}" in text, point
    for kind in ("crash in user code", "transient error in user code", "store write fails",
                 "torn commit record", "sink pre-commit fails", "sink finalize fails",
                 "sink finalize fails during recovery", "takeover of", "fenced (zombie)",
                 "discarded [", "liveness phase"):
        assert kind in text, kind
    assert re.search(r"discarded \[\d", text), "no fallback from a torn record"


def _orders(source: MemorySource, sink: MemorySink) -> Flow:
    flow = Flow("orders")
    (flow.source(source)
         .filter(lambda e: e["amount"] > 0)
         .key_by(lambda e: e["customer"])
         .reduce(lambda total, e: total + e["amount"], initial=0)
         .sink(sink))
    return flow


_ORDERS: dict[str, list[Any]] = {
    "0": [{"customer": "abc"[i % 3], "amount": i % 7 - 1} for i in range(40)],
    "1": [{"customer": "xy"[i % 2], "amount": i} for i in range(25)],
}


def test_simulate_checks_a_user_pipeline() -> None:
    """simulate() runs a user's flow through injected faults and reports no violation."""
    report = simulate(_orders, _ORDERS, schedules=400, seed=1000)
    assert report.ok and report.schedules == 400
    assert report.totals["crashes"] > 0 and report.totals["fenced"] > 0
    assert report.sim_seconds > 0 and report.wall_seconds > 0


def test_simulate_takes_a_single_list_as_one_partition() -> None:
    """simulate() accepts one list of records as a single partition, under each guarantee."""
    for guarantee in ("exactly-once", "at-least-once"):
        report = simulate(_orders, _ORDERS["1"], schedules=50, seed=7, guarantee=guarantee)
        assert report.ok and report.schedules == 50


def test_plans_are_drawn_from_the_seed_alone() -> None:
    """The same seed draws the same plan; a forced guarantee overrides the drawn one."""
    assert FaultPlan.draw(42) == FaultPlan.draw(42)
    assert FaultPlan.draw(42, guarantee="at-least-once").guarantee == "at-least-once"
    quiet = FaultPlan.quiet(42, guarantee="exactly-once")
    assert quiet.faults == 0 and quiet.crash_rate == 0.0 and quiet.redeliver_rate == 0.0


def test_cli_run_prints_throughput_and_time_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    """`run` exits 0 and prints schedules/s and the simulated/wall time ratio."""
    assert main(["run", "--schedules", "40", "--seed", "77"]) == 0
    out = capsys.readouterr().out
    assert "40 schedules, 0 with violations" in out
    assert re.search(r"\d+ schedules/s", out) and re.search(r"ratio [\d.]+x", out)


def test_cli_replay_traces_one_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    """`replay --seed N` prints the plan, every event and the fingerprint of the schedule."""
    assert main(["replay", "--seed", "5089"]) == 0
    out = capsys.readouterr().out
    assert "seed 5089" in out and "liveness phase" in out and "no violations" in out
    assert f"fingerprint {run_seed(5089).fingerprint}" in out
