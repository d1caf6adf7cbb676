"""The simulator's command line: ``run``, ``replay`` and ``soak`` on the built-in workloads.

``run --schedules N --seed S`` runs schedules with seeds S, S+1, ..., S+N-1 and exits 1 if
any broke an invariant, printing each failure with the command that replays it. ``replay
--seed N`` runs one schedule with a trace of every event. ``soak`` is ``run`` with many
schedules and a progress line every few seconds. ``--backend`` picks where schedules run:
``memory`` (the default of ``run`` and ``replay``), ``sqlite`` (``SQLiteStore`` with
JSON-lines and SQLite-table sinks in a temporary directory; ``--sink`` forces one sink,
``--compaction eager`` compacts after every commit) or ``both`` (each seed on each: the
default of ``soak``). ``--jobs`` runs seeds in that many processes. ``--backend kafka`` runs
the exactly-once schedules with ``KafkaSink`` output (``_kafka_sim``) on a Kafka broker it
starts itself (or the one at ``--bootstrap``), one seed after another.
Every command prints schedules per second and the ratio of simulated time to wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

from ._plan import FaultPlan
from ._simulate import Backend, ScheduleResult, SimReport, run_schedule
from ._sink import MemorySink
from ._source import MemorySource
from ._sqlite_sim import SINK_KINDS, SQLiteBackend
from ._workload import workload

__all__ = ["main", "run_campaign", "run_many", "run_seed"]


def backend_name(backend: Backend) -> str:
    """``memory`` or ``sqlite``."""
    return "memory" if backend == "memory" else "sqlite"


def replay_command(seed: int, guarantee: str | None = None,
                   backend: Backend = "memory") -> str:
    """The shell command that replays schedule ``seed`` of the built-in workloads."""
    forced = f" --guarantee {guarantee}" if guarantee else ""
    if isinstance(backend, SQLiteBackend):
        forced += " --backend sqlite"
        forced += f" --sink {backend.sink}" if backend.sink else ""
        forced += f" --compaction {backend.compaction}" if backend.compaction != "thread" else ""
    elif backend != "memory":
        forced += f" --backend {backend}"
    return f"python -m resumeflow.testing replay --seed {seed}{forced}"


def run_seed(seed: int, *, guarantee: str | None = None, trace: bool = False,
             trace_to: Callable[[str], None] | None = None,
             backend: Backend = "memory") -> ScheduleResult:
    """Run the built-in schedule of ``seed`` on ``backend`` (``trace``: print every event;
    ``trace_to``: hand every event to a function instead). A table sink forced on a seed
    whose flow is not keyed gives way to JSON lines."""
    _, build, inputs = workload(seed)
    plan = FaultPlan.draw(seed, guarantee=guarantee)
    run_on = backend
    if isinstance(backend, SQLiteBackend) and backend.sink not in (None, "jsonl") \
            and not build(MemorySource({"0": []}), MemorySink()).keyed:
        run_on = replace(backend, sink="jsonl")
    return run_schedule(build, inputs, plan, replay=replay_command(seed, guarantee, backend),
                        trace=trace_to or (print if trace else None), backend=run_on)


def _run_job(job: tuple[int, str | None, Backend]) -> ScheduleResult:
    seed, guarantee, backend = job
    return run_seed(seed, guarantee=guarantee, backend=backend)


def _results(jobs: list[tuple[int, str | None, Backend]],
             processes: int) -> Iterator[ScheduleResult]:
    if processes <= 1:
        yield from map(_run_job, jobs)
        return
    pool = ProcessPoolExecutor(max_workers=processes)
    try:
        yield from pool.map(_run_job, jobs, chunksize=8)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_campaign(schedules: int, seed: int, *, backends: Sequence[Backend] = ("memory",),
                 guarantee: str | None = None, progress_every_s: float = 0.0,
                 stop_on_failure: bool = False, jobs: int = 1) -> dict[str, SimReport]:
    """Run seeds ``seed`` to ``seed + schedules - 1``, each on every backend, in ``jobs``
    processes; one report per backend name (``memory``, ``sqlite``)."""
    reports = {backend_name(b): SimReport() for b in backends}
    busy = dict.fromkeys(reports, 0.0)
    work = [(s, guarantee, b) for s in range(seed, seed + schedules) for b in backends]
    started = last = time.perf_counter()
    for result in _results(work, jobs):
        name = "memory" if result.backend == "memory" else "sqlite"
        reports[name].add(result)
        busy[name] += result.wall_seconds
        if result.violations:
            print(result.message(), file=sys.stderr, flush=True)
            if stop_on_failure:
                break
        now = time.perf_counter()
        if progress_every_s and now - last >= progress_every_s:
            last = now
            _share(reports, busy, now - started)
            for name, report in reports.items():
                print(f"... [{name}] {report.summary()}", flush=True)
    _share(reports, busy, time.perf_counter() - started)
    return reports


def _share(reports: dict[str, SimReport], busy: dict[str, float], elapsed: float) -> None:
    """Give each backend the part of the elapsed time its schedules took."""
    total = sum(busy.values())
    for name, report in reports.items():
        report.wall_seconds = elapsed * busy[name] / total if total else elapsed


def run_many(schedules: int, seed: int, *, guarantee: str | None = None,
             progress_every_s: float = 0.0, stop_on_failure: bool = False,
             backend: Backend = "memory", jobs: int = 1) -> SimReport:
    """Run ``schedules`` built-in schedules from ``seed`` on on one backend; the report."""
    return run_campaign(schedules, seed, backends=(backend,), guarantee=guarantee,
                        progress_every_s=progress_every_s, stop_on_failure=stop_on_failure,
                        jobs=jobs)[backend_name(backend)]


def _backends(args: argparse.Namespace) -> tuple[Backend, ...]:
    sqlite = SQLiteBackend(sink=args.sink, compaction=args.compaction)
    choices: dict[str, tuple[Backend, ...]] = {
        "memory": ("memory",), "sqlite": (sqlite,), "both": ("memory", sqlite)}
    return choices[args.backend]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resumeflow.testing",
                                     description="seeded fault simulator of resumeflow")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run N schedules and check every invariant")
    soak = commands.add_parser("soak", help="a long run, with progress")
    replay = commands.add_parser("replay", help="replay one schedule with a trace")
    for sub, default in ((run, 1000), (soak, 200_000)):
        sub.add_argument("--schedules", type=int, default=default)
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--stop-on-failure", action="store_true")
        sub.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    replay.add_argument("--seed", type=int, required=True)
    replay.add_argument("--quiet", action="store_true", help="no event trace")
    for sub in (run, soak, replay):
        sub.add_argument("--guarantee", choices=["exactly-once", "at-least-once"])
        sub.add_argument("--backend", default="both" if sub is soak else "memory",
                         choices=["memory", "sqlite", "kafka"]
                         + (["both"] if sub is not replay else []),
                         help="memory backends, SQLiteStore with real sinks, or both "
                              "(default: both for soak, else memory); kafka: KafkaSink "
                              "output on a real broker")
        sub.add_argument("--bootstrap", help="kafka backend: a running broker (default: "
                         "start one)")
        sub.add_argument("--sink", choices=SINK_KINDS,
                         help="sqlite backend: this output sink (default: drawn per seed)")
        sub.add_argument("--compaction", choices=["thread", "eager"], default="thread",
                         help="sqlite backend: background compactor, or compact every commit")
    args = parser.parse_args(argv)
    if args.backend == "kafka":
        return _kafka(args)
    if args.command == "replay":
        return _replay(args.seed, args.guarantee, _backends(args)[0], trace=not args.quiet)
    reports = run_campaign(args.schedules, args.seed, backends=_backends(args),
                           guarantee=args.guarantee,
                           progress_every_s=10.0 if args.command == "soak" else 0.0,
                           stop_on_failure=args.stop_on_failure, jobs=args.jobs)
    failed = False
    for name, report in reports.items():
        print(f"[{name}] {report.summary()}" if len(reports) > 1 else report.summary())
        if report.failures:
            failed = True
            print(f"FAILED: seeds {[f.seed for f in report.failures[:20]]}; replay one with "
                  f"`{report.failures[0].replay}`")
    return 1 if failed else 0


def _replay(seed: int, guarantee: str | None, backend: Backend, *, trace: bool) -> int:
    shape, _, inputs = workload(seed)
    plan = FaultPlan.draw(seed, guarantee=guarantee)
    sizes = {p: len(v) for p, v in inputs.items()}
    print(f"seed {seed}: workload {shape!r}, partitions {sizes}, {plan.guarantee}")
    print("fault plan (non-zero fields):")
    print(plan.describe())
    started = time.perf_counter()
    result = run_seed(seed, guarantee=guarantee, trace=trace, backend=backend)
    wall = time.perf_counter() - started
    print(f"backend {result.backend}; counts {result.counts}; replays {result.replays}; "
          f"at-least-once duplicates {result.duplicates}; simulated {result.sim_seconds:.3f} s "
          f"in {wall:.3f} s wall")
    print(f"fingerprint {result.fingerprint}")
    if result.violations:
        print(result.message())
        return 1
    print("no violations")
    return 0


def _kafka(args: argparse.Namespace) -> int:
    """``run``, ``soak`` or ``replay`` on the Kafka backend."""
    from ._kafka_broker import KafkaBroker
    from ._kafka_sim import run_kafka_seed

    if args.guarantee == "at-least-once":
        print("the kafka backend runs exactly-once schedules; drop --guarantee",
              file=sys.stderr)
        return 2
    broker = None
    bootstrap = args.bootstrap
    try:
        if bootstrap is None:
            print("starting a Kafka broker on 127.0.0.1 ...", flush=True)
            broker = KafkaBroker().start()
            bootstrap = broker.bootstrap
        if args.command == "replay":
            result = run_kafka_seed(args.seed, bootstrap,
                                    trace=None if args.quiet else print)
            print(f"backend {result.backend}; counts {result.counts}; replays "
                  f"{result.replays}; simulated {result.sim_seconds:.3f} s in "
                  f"{result.wall_seconds:.3f} s wall")
            print(f"fingerprint {result.fingerprint}")
            print(result.message() if result.violations else "no violations")
            return 1 if result.violations else 0
        report = SimReport()
        started = last = time.perf_counter()
        for seed in range(args.seed, args.seed + args.schedules):
            result = run_kafka_seed(seed, bootstrap)
            report.add(result)
            if result.violations:
                print(result.message(), file=sys.stderr, flush=True)
                if args.stop_on_failure:
                    break
            report.wall_seconds = time.perf_counter() - started
            if args.command == "soak" and report.wall_seconds - last >= 10.0:
                last = report.wall_seconds
                print(f"... {report.summary()}", flush=True)
        report.wall_seconds = time.perf_counter() - started
        print(report.summary())
        if report.failures:
            print(f"FAILED: seeds {[f.seed for f in report.failures[:20]]}; replay one with "
                  f"`{report.failures[0].replay}`")
        return 1 if report.failures else 0
    finally:
        if broker is not None:
            broker.close()
