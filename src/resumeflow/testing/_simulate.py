"""Run many seeded schedules against a flow and check every invariant of the design.

``simulate(build_flow, inputs)`` is the entry point for users: ``build_flow(source, sink)``
builds their flow on the simulator's ``MemorySource`` and ``MemorySink``; every schedule
draws a fault plan from its seed (``seed``, ``seed + 1``, ...), runs it, and the checker
compares committed output and state with a fault-free reference run of the same flow. A
violation raises ``AssertionError`` whose message names the seed and the exact call or
command that replays it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ._check import Outcome, compare
from ._observe import Violation
from ._plan import FaultPlan
from ._sim import BuildFlow, Schedule
from ._sink import MemorySink
from ._sqlite_sim import SQLiteBackend, SQLiteSchedule
from ._store import MemoryStore

__all__ = ["Backend", "ScheduleResult", "SimReport", "make_schedule", "run_schedule",
           "simulate"]

Backend = Literal["memory", "sqlite"] | SQLiteBackend
"""Where schedules run: the memory backends, or ``SQLiteStore`` and real sinks (``"sqlite"``
is ``SQLiteBackend()``: the sink drawn per seed, the background compactor)."""


@dataclass(kw_only=True)
class ScheduleResult:
    """One schedule.

    Attributes:
        plan: its fault plan (``plan.seed`` replays it).
        violations: every broken invariant; empty when the schedule passed.
        sim_seconds: simulated seconds on the fake clock.
        counts: crashes, restarts, commits, takeovers, faults, fenced zombie commits.
        duplicates: at-least-once output items from replay windows (counted, allowed).
        replays: records re-read after each resume.
        fingerprint: digest of the event sequence (equal for equal seeds).
        replay: how to replay it.
        backend: where it ran (``memory``, or the SQLite backend with its sink).
        wall_seconds: real seconds the schedule took (its reference run included).
    """

    plan: FaultPlan
    violations: list[Violation]
    sim_seconds: float
    counts: dict[str, int]
    duplicates: int
    replays: list[int]
    fingerprint: str
    replay: str
    backend: str = "memory"
    wall_seconds: float = 0.0

    @property
    def seed(self) -> int:
        return self.plan.seed

    def message(self) -> str:
        """What failed, the fault plan, and how to replay it."""
        lines = [f"resumeflow simulator: schedule seed {self.seed} on {self.backend} broke "
                 f"{len(self.violations)} invariant(s):"]
        lines += [f"  - {v}" for v in self.violations[:10]]
        lines += ["fault plan (non-zero fields):", self.plan.describe(),
                  f"replay it exactly (seed {self.seed}): {self.replay}"]
        return "\n".join(lines)


@dataclass(kw_only=True)
class SimReport:
    """Many schedules.

    Attributes:
        schedules: schedules run.
        failures: the schedules that broke an invariant.
        sim_seconds: simulated seconds, summed over schedules.
        wall_seconds: real seconds spent.
        totals: counts summed over schedules (crashes, commits, ...).
        duplicates: at-least-once duplicates counted, summed.
        max_replay: most records re-read after one resume.
    """

    schedules: int = 0
    failures: list[ScheduleResult] = field(default_factory=list)
    sim_seconds: float = 0.0
    wall_seconds: float = 0.0
    totals: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    max_replay: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def schedules_per_s(self) -> float:
        return self.schedules / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def sim_ratio(self) -> float:
        """Simulated seconds per wall-clock second."""
        return self.sim_seconds / self.wall_seconds if self.wall_seconds else 0.0

    def add(self, result: ScheduleResult) -> None:
        self.schedules += 1
        self.sim_seconds += result.sim_seconds
        for name, n in result.counts.items():
            self.totals[name] = self.totals.get(name, 0) + n
        self.duplicates += result.duplicates
        self.max_replay = max([self.max_replay, *result.replays])
        if result.violations:
            self.failures.append(result)

    def summary(self) -> str:
        totals = ", ".join(f"{k} {v}" for k, v in sorted(self.totals.items()))
        return (f"{self.schedules} schedules, {len(self.failures)} with violations; "
                f"{self.schedules_per_s:.0f} schedules/s; simulated {self.sim_seconds:.1f} s "
                f"in {self.wall_seconds:.1f} s wall (ratio {self.sim_ratio:.1f}x); {totals}; "
                f"at-least-once duplicates counted {self.duplicates}; max replay "
                f"{self.max_replay} records")

    def check(self) -> None:
        """Raise ``AssertionError`` with the first failure's seed and replay command."""
        if self.failures:
            first = self.failures[0]
            more = len(self.failures) - 1
            tail = f"\n({more} more failing schedule(s): seeds " \
                   f"{[f.seed for f in self.failures[1:6]]})" if more else ""
            raise AssertionError(first.message() + tail)


def _reference(build_flow: BuildFlow, inputs: dict[str, list[Any]], guarantee: str,
               seed: int) -> Outcome:
    plan = FaultPlan.quiet(seed, guarantee=guarantee)
    schedule = Schedule(build_flow, inputs, plan)
    violations = schedule.run()
    if violations:
        raise AssertionError(
            "the fault-free reference run itself failed, so the flow cannot be checked:\n"
            + "\n".join(f"  - {v}" for v in violations))
    return schedule.outcome()[0]


def make_schedule(build_flow: BuildFlow, inputs: dict[str, list[Any]], plan: FaultPlan, *,
                  backend: Backend = "memory", trace: Callable[[str], None] | None = None,
                  store_type: type[MemoryStore] = MemoryStore,
                  sink_type: type[MemorySink] = MemorySink) -> Schedule:
    """The schedule of ``plan`` on ``backend`` (``store_type`` and ``sink_type``: memory
    backend only); call its ``cleanup()`` once its outcome is read."""
    if backend == "memory":
        return Schedule(build_flow, inputs, plan, trace=trace, store_type=store_type,
                        sink_type=sink_type)
    real = SQLiteBackend() if backend == "sqlite" else backend
    if not isinstance(real, SQLiteBackend):
        raise ValueError(f"backend {backend!r} is unknown; use 'memory', 'sqlite' or a "
                         "SQLiteBackend")
    return SQLiteSchedule(build_flow, inputs, plan, backend=real, trace=trace)


def run_schedule(build_flow: BuildFlow, inputs: dict[str, list[Any]], plan: FaultPlan, *,
                 replay: str, reference: Outcome | None = None,
                 trace: Callable[[str], None] | None = None,
                 store_type: type[MemoryStore] = MemoryStore,
                 sink_type: type[MemorySink] = MemorySink,
                 backend: Backend = "memory") -> ScheduleResult:
    """Run one schedule on ``backend`` and check it against ``reference``: a fault-free run
    on the plain memory backends (computed when not given)."""
    started = time.perf_counter()
    if reference is None:
        reference = _reference(build_flow, inputs, plan.guarantee, plan.seed)
    schedule = make_schedule(build_flow, inputs, plan, backend=backend, trace=trace,
                             store_type=store_type, sink_type=sink_type)
    try:
        violations = schedule.run()
        try:
            result, problems = schedule.outcome()
        except Exception as exc:  # what the run left cannot even be read
            result, problems = Outcome(), [Violation(
                kind="error", task="", detail=f"reading the outcome raised "
                f"{type(exc).__name__}: {exc}")]
    finally:
        schedule.cleanup()
    violations += problems
    if not any(v.kind == "error" for v in violations):
        ends = {schedule.task_of[p]: len(records) for p, records in inputs.items()}
        violations += compare(schedule.expected(reference), result, ends)
    where = schedule.backend.describe() if isinstance(schedule, SQLiteSchedule) else "memory"
    return ScheduleResult(
        plan=plan, violations=violations, sim_seconds=schedule.clock.monotonic(),
        counts=dict(schedule.counts), duplicates=result.duplicates,
        replays=list(schedule.observed.replays), fingerprint=schedule.fingerprint,
        replay=replay, backend=where, wall_seconds=time.perf_counter() - started)


def simulate(build_flow: BuildFlow, inputs: dict[str, list[Any]] | list[Any], *,
             schedules: int = 1000, seed: int = 0, guarantee: str | None = None,
             raise_on_violation: bool = True, store_type: type[MemoryStore] = MemoryStore,
             sink_type: type[MemorySink] = MemorySink,
             backend: Backend = "memory") -> SimReport:
    """Run ``schedules`` seeded fault schedules of a flow and check every invariant.

    Args:
        build_flow: ``build_flow(source, sink) -> Flow``; build the flow on exactly these
            (the simulator owns the source, the sink, the store and the clock).
        inputs: records per partition, or one list for a single partition. Records must be
            JSON-compatible, and so must the flow's output and state.
        schedules: how many schedules; schedule ``i`` uses seed ``seed + i``.
        seed: first seed; ``simulate(..., seed=N, schedules=1)`` replays schedule ``N``.
        guarantee: force ``exactly-once`` or ``at-least-once`` (default: drawn per seed).
        raise_on_violation: raise ``AssertionError`` on the first failing schedule's report
            (after running them all) instead of only returning the report.
        store_type: the store class of the faulty runs (``MemoryStore`` or a subclass).
        sink_type: the sink class of the faulty runs (``MemorySink`` or a subclass).
        backend: ``"memory"``, or ``"sqlite"`` / a ``SQLiteBackend`` to run the faulty runs
            on ``SQLiteStore`` with JSON-lines or SQLite-table sinks (the reference always
            runs on memory: the real backends must agree with it).
    """
    parts = inputs if isinstance(inputs, dict) else {"0": list(inputs)}
    parts = {str(p): list(v) for p, v in parts.items()}
    references: dict[str, Outcome] = {}
    report = SimReport()
    started = time.perf_counter()
    name = getattr(build_flow, "__name__", "build_flow")
    for s in range(seed, seed + schedules):
        plan = FaultPlan.draw(s, guarantee=guarantee)
        if plan.guarantee not in references:
            references[plan.guarantee] = _reference(build_flow, parts, plan.guarantee, s)
        forced = f", guarantee={guarantee!r}" if guarantee else ""
        if backend != "memory":
            forced += f", backend={backend!r}"
        replay = f"simulate({name}, inputs, seed={s}, schedules=1{forced})"
        report.add(run_schedule(build_flow, parts, plan, replay=replay,
                                reference=references[plan.guarantee], store_type=store_type,
                                sink_type=sink_type, backend=backend))
    report.wall_seconds = time.perf_counter() - started
    if raise_on_violation:
        report.check()
    return report
