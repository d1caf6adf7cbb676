"""The simulator's command line: ``run``, ``replay`` and ``soak`` on the built-in workloads.

``run --schedules N --seed S`` runs schedules with seeds S, S+1, ..., S+N-1 and exits 1 if
any broke an invariant, printing each failure with the command that replays it. ``replay
--seed N`` runs one schedule with a trace of every event. ``soak`` is ``run`` with many
schedules and a progress line every few seconds. Every command prints schedules per second
and the ratio of simulated time to wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

from ._plan import FaultPlan
from ._simulate import ScheduleResult, SimReport, run_schedule
from ._workload import workload

__all__ = ["main", "run_seed"]


def replay_command(seed: int, guarantee: str | None = None) -> str:
    """The shell command that replays schedule ``seed`` of the built-in workloads."""
    forced = f" --guarantee {guarantee}" if guarantee else ""
    return f"python -m resumeflow.testing replay --seed {seed}{forced}"


def run_seed(seed: int, *, guarantee: str | None = None, trace: bool = False,
             trace_to: Callable[[str], None] | None = None) -> ScheduleResult:
    """Run the built-in schedule of ``seed`` (``trace``: print every event; ``trace_to``:
    hand every event to a function instead)."""
    _, build, inputs = workload(seed)
    plan = FaultPlan.draw(seed, guarantee=guarantee)
    return run_schedule(build, inputs, plan, replay=replay_command(seed, guarantee),
                        trace=trace_to or (print if trace else None))


def run_many(schedules: int, seed: int, *, guarantee: str | None = None,
             progress_every_s: float = 0.0, stop_on_failure: bool = False) -> SimReport:
    """Run ``schedules`` built-in schedules from ``seed`` on; returns the report."""
    report = SimReport()
    started = last = time.perf_counter()
    for s in range(seed, seed + schedules):
        result = run_seed(s, guarantee=guarantee)
        report.add(result)
        if result.violations:
            print(result.message(), file=sys.stderr, flush=True)
            if stop_on_failure:
                break
        now = time.perf_counter()
        if progress_every_s and now - last >= progress_every_s:
            last = now
            report.wall_seconds = now - started
            print(f"... {report.summary()}", flush=True)
    report.wall_seconds = time.perf_counter() - started
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resumeflow.testing",
                                     description="seeded fault simulator of resumeflow")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run N schedules and check every invariant")
    soak = commands.add_parser("soak", help="a long run, with progress")
    for sub, default in ((run, 1000), (soak, 200_000)):
        sub.add_argument("--schedules", type=int, default=default)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--guarantee", choices=["exactly-once", "at-least-once"])
        sub.add_argument("--stop-on-failure", action="store_true")
    replay = commands.add_parser("replay", help="replay one schedule with a trace")
    replay.add_argument("--seed", type=int, required=True)
    replay.add_argument("--guarantee", choices=["exactly-once", "at-least-once"])
    replay.add_argument("--quiet", action="store_true", help="no event trace")
    args = parser.parse_args(argv)
    if args.command == "replay":
        return _replay(args.seed, args.guarantee, trace=not args.quiet)
    report = run_many(args.schedules, args.seed, guarantee=args.guarantee,
                      progress_every_s=10.0 if args.command == "soak" else 0.0,
                      stop_on_failure=args.stop_on_failure)
    print(report.summary())
    if report.failures:
        print(f"FAILED: seeds {[f.seed for f in report.failures[:20]]}; replay one with "
              f"`{replay_command(report.failures[0].seed, args.guarantee)}`")
        return 1
    return 0


def _replay(seed: int, guarantee: str | None, *, trace: bool) -> int:
    shape, _, inputs = workload(seed)
    plan = FaultPlan.draw(seed, guarantee=guarantee)
    sizes = {p: len(v) for p, v in inputs.items()}
    print(f"seed {seed}: workload {shape!r}, partitions {sizes}, {plan.guarantee}")
    print("fault plan (non-zero fields):")
    print(plan.describe())
    started = time.perf_counter()
    result = run_seed(seed, guarantee=guarantee, trace=trace)
    wall = time.perf_counter() - started
    print(f"counts {result.counts}; replays {result.replays}; at-least-once duplicates "
          f"{result.duplicates}; simulated {result.sim_seconds:.3f} s in {wall:.3f} s wall")
    print(f"fingerprint {result.fingerprint}")
    if result.violations:
        print(result.message())
        return 1
    print("no violations")
    return 0
